"""Hugging Face interop: export to transformers, import back, start training from a transformers directory.

transformers' own LlamaForCausalLM (float32, eager attention) is the
independent reference for the weight layout, RoPE convention, grouped heads,
norm epsilon and untied embeddings; sentencepiece is the reference for the
exported tokenizer. In CI (`CI` set) a missing optional package fails the
module instead of skipping it: `.ci/run` installs requirements-eval.txt.
"""

import copy
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import sentencepiece as spm

if os.environ.get("CI"):
  import torch  # noqa: F401  A missing package must fail in CI, not skip.
  import transformers
  import lm_eval  # noqa: F401
else:
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("lm_eval")

import flax.linen as nn  # noqa: E402

from mile_jax import config_lib  # noqa: E402
from mile_jax import data as data_lib  # noqa: E402
from mile_jax import train_lib  # noqa: E402
from mile_jax.core import model as model_lib  # noqa: E402
from mile_jax.core import optim  # noqa: E402
from mile_jax.core import step as step_lib  # noqa: E402
from mile_jax.data import corpus as corpus_lib  # noqa: E402
from mile_jax.data import pipeline as data_pipeline  # noqa: E402
from mile_jax.evaluation import generation  # noqa: E402
from mile_jax.evaluation import lm as lm_lib  # noqa: E402
from mile_jax.evaluation import restore as restore_lib  # noqa: E402
from mile_jax.hf import convert as hf  # noqa: E402
from mile_jax.hf import layout as hf_layout  # noqa: E402
from mile_jax.hf import safetensors_io  # noqa: E402
from mile_jax.run import checkpoint as checkpoint_lib  # noqa: E402
from conftest import make_tiny_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Both sides compute in float32 but accumulate in different orders: about 2^-24 * sqrt(384) = 1.2e-6
# relative per matmul, ~17 matmuls in sequence (random-walk growth ~4x), times the largest logit (~4
# here): ~2e-5. The bound is the one the project promises for exported models (measured 3-5e-6).
LOGIT_TOL = 1e-4
AWKWARD = ("", " ", "   ", "A", " A", "  A", "A  ", "Hello  world", " leading", "trailing  ", "\n", "\n\nx",
           "a\n b\n\n  c", "\t\tx", "naïve café — 日本語", "Ünïcödé ẞ ﬁ Ａ", "😀🧬 bytes", "\x00\x07\x7f", "<s></s><pad>",
           "<0x41> <unk>", "\u2581 \u2581\u2581", "\u200b\u00a0nbsp", "1234567890", "x" * 40, "if x:\n    y = 2\n")


def _random_params(config, seed: int):
  """Parameters large enough that every layout error shows in the logits: kernels N(0, 1/fan_in),
  embeddings N(0, 0.1^2) (so RMSNorm's epsilon matters), norm scales 1 + N(0, 0.2^2)."""
  rng = np.random.default_rng(seed)
  abstract = nn.unbox(model_lib.abstract_params(model_lib.DecoderConfig.from_config(config.model)))

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return (1.0 + 0.2 * rng.standard_normal(leaf.shape)).astype(np.float32)
    if "embedding" in name:
      return (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
    fan_in = leaf.shape[0] * (leaf.shape[1] if "out" in name else 1)
    return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, abstract)


def _write_run(workdir: str, config, params, step: int = 7) -> None:
  """A workdir as train.py leaves it: checkpoint, config.json, tokenizer.model."""
  data = data_lib.make_data(config.data, config.model.vocab_size, config.data.seq_len, config.seed)
  tx, _ = optim.make_optimizer(config.optim, config.train.steps)
  state = step_lib.TrainState(step=np.int32(step), params=params, opt_state=tx.init(params))
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=1, max_to_keep=1,
                                             async_save=False)
  checkpointer.save(step, state, json.loads(config.to_json_best_effort()),
                    {"tokenizer": checkpoint_lib.tokenizer_meta(data.tokenizer.serialized_model())})
  checkpointer.close()
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2))
  with open(os.path.join(workdir, "tokenizer.model"), "wb") as f:
    f.write(data.tokenizer.serialized_model())


def _configs():
  default = config_lib.base_config()  # configs/default.py: 4 layers, d_model 128, 4 heads, vocabulary 1024.
  gqa = make_tiny_config(**{"model.n_heads": 4, "model.n_kv_heads": 2, "model.rope_theta": 1000.0,
                            "model.norm_eps": 1e-2, "data.add_bos": True})
  return {"default": default, "gqa": gqa}


@pytest.fixture(scope="module", params=["default", "gqa"])
def exported(request, tmp_path_factory):
  """(config, original params, restored run, export directory, transformers model)."""
  config = _configs()[request.param]
  root = tmp_path_factory.mktemp(f"hf_{request.param}")
  params = _random_params(config, seed=1)
  _write_run(str(root / "run"), config, params)
  hf.export(str(root / "run"), str(root / "hf"))
  restored = restore_lib.restore(str(root / "run"), mesh_shape=(1, 1, 1), devices=jax.devices()[:1])
  model = transformers.AutoModelForCausalLM.from_pretrained(str(root / "hf"), attn_implementation="eager",
                                                            dtype=torch.float32)
  model.eval()
  return config, params, restored, str(root / "hf"), model


def _our_logits(restored, tokens):
  with restored.context():
    return np.asarray(restored.model.apply({"params": restored.params}, tokens))


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens, np.int64))).logits.numpy()


def _tokens(config, seed=0):
  return np.random.default_rng(seed).integers(0, config.model.vocab_size, (3, 48)).astype(np.int32)


def test_exported_model_gives_our_logits(exported):
  config, _, restored, hf_dir, model = exported
  with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
    written = json.load(f)
  # transformers 5 reads rope_parameters, transformers 4 and vLLM the top-level rope_theta.
  assert written["rope_theta"] == written["rope_parameters"]["rope_theta"] == config.model.rope_theta
  assert written["tie_word_embeddings"] is False and written["num_key_value_heads"] == config.model.n_kv_heads
  tokens = _tokens(config)
  ours, theirs = _our_logits(restored, tokens), _hf_logits(model, tokens)
  assert np.abs(ours).max() > 1.0  # logits large enough for the bound to mean something
  assert np.abs(ours - theirs).max() <= LOGIT_TOL, np.abs(ours - theirs).max()


def _meta_permutation(weight, heads):
  """The row permutation transformers' conversion script applies to Meta's q/k weights."""
  rows, cols = weight.shape
  return weight.reshape(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def test_rope_layout_error_is_detected(exported):
  """Negative control: q/k rows permuted as for Meta's interleaved RoPE must fail the comparison by far."""
  config, _, restored, _, model = exported
  tokens = _tokens(config)
  permuted = copy.deepcopy(model)
  for layer in permuted.model.layers:
    attn = layer.self_attn
    with torch.no_grad():
      attn.q_proj.weight.copy_(_meta_permutation(attn.q_proj.weight, config.model.n_heads))
      attn.k_proj.weight.copy_(_meta_permutation(attn.k_proj.weight, config.model.n_kv_heads))
  assert np.abs(_our_logits(restored, tokens) - _hf_logits(permuted, tokens)).max() > 100 * LOGIT_TOL


def test_greedy_generations_are_equal(exported):
  config, _, restored, _, model = exported
  prompts = np.random.default_rng(2).integers(4, config.model.vocab_size, (2, 8))
  eos = restored.tokenizer.eos_id
  with torch.no_grad():
    out = model.generate(torch.tensor(prompts), attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                         max_new_tokens=16, do_sample=False)[:, prompts.shape[1]:].tolist()
  with restored.context():
    ours = generation.GreedyGenerator(restored.model.cfg, restored.mesh).generate(
        restored.params, prompts.tolist(), 16, done=lambda t: t[-1] == eos)
  theirs = [row[:row.index(eos) + 1] if eos in row else row for row in out]
  assert ours == theirs
  assert sum(len(row) for row in ours) > 16  # not both ended at once


def _tree_equal(a, b):
  flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x.view(np.uint32), y.view(np.uint32)), \
        jax.tree_util.keystr(path)


def _import(hf_dir, config):
  cfg = model_lib.DecoderConfig.from_config(config.model)
  views = hf_layout.load_params(hf_dir, nn.unbox(model_lib.abstract_params(cfg)), cfg.n_layers, cfg.head_dim)
  return jax.tree.map(lambda v: np.asarray(v, np.float32), views)


def test_import_gives_back_the_same_bits(exported, tmp_path):
  config, params, _, hf_dir, model = exported
  _tree_equal(_import(hf_dir, config), params)
  # The same weights saved by transformers itself, sharded: our reader against the reference writer.
  model.save_pretrained(str(tmp_path / "resaved"), max_shard_size="100KB")
  assert os.path.isfile(tmp_path / "resaved" / "model.safetensors.index.json")
  _tree_equal(_import(str(tmp_path / "resaved"), config), params)


def test_exported_tokenizer_encodes_as_sentencepiece(exported):
  config, _, restored, hf_dir, _ = exported
  sp = spm.SentencePieceProcessor(model_file=os.path.join(hf_dir, "tokenizer.model"))
  tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
  start = sp.bos_id() if config.data.add_bos else sp.eos_id()
  corpus = corpus_lib.load_corpus(config.data, data_pipeline.resolve_cache_dir(config.data.cache_dir))
  for text in list(AWKWARD) + list(corpus.validation):  # and the held-out documents, whole
    ids = sp.encode(text)
    assert tokenizer.encode(text, add_special_tokens=False) == ids, text
    assert tokenizer.encode(text) == [start] + ids, text
    assert tokenizer.decode(ids) == sp.decode(ids), text
  assert tokenizer.bos_token_id == start and tokenizer.eos_token_id == sp.eos_id()
  assert tokenizer.pad_token_id == sp.pad_id()


def test_sharded_and_bfloat16_exports(exported, tmp_path):
  config, params, restored, _, model = exported
  run = restored.workdir
  hf.export(run, str(tmp_path / "sharded"), max_shard_bytes=64 << 10)
  files = os.listdir(tmp_path / "sharded")
  assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
  sharded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "sharded"), dtype=torch.float32)
  reference = model.state_dict()
  assert sharded.state_dict().keys() == reference.keys()
  assert all(torch.equal(v, reference[k]) for k, v in sharded.state_dict().items())
  hf.export(run, str(tmp_path / "bf16"), dtype="bfloat16")
  half = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16"), dtype="auto")
  assert half.dtype == torch.bfloat16
  q = params["layer_0"]["attention"]["query"]["kernel"]  # (D, N, H) -> (N*H, D), rounded by torch
  expected = torch.tensor(np.ascontiguousarray(q.reshape(q.shape[0], -1).T)).to(torch.bfloat16)
  assert torch.equal(half.model.layers[0].self_attn.q_proj.weight, expected)


def test_init_from_hf_names_every_mismatch(exported, tmp_path):
  config, _, _, hf_dir, _ = exported
  good = config.copy_and_resolve_references()
  good.init.from_hf = hf_dir
  config_lib.validate(good)
  bad = good.copy_and_resolve_references()
  bad.model.update(n_layers=config.model.n_layers + 1, rope_theta=5e5, n_kv_heads=1)
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(bad)
  message = str(e.value)
  assert "\n" not in message and message.startswith("init.from_hf: ")
  for field, value in (("n_layers", config.model.n_layers), ("rope_theta", config.model.rope_theta),
                       ("n_kv_heads", config.model.n_kv_heads)):
    assert f"model.{field}={value!r} there" in message and f"--config.model.{field}={value}" in message
  assert "d_model" not in message
  # No tokenizer.model and no data.tokenizer_path; then a feature the decoder lacks.
  bare = tmp_path / "bare"
  bare.mkdir()
  for name in ("config.json", "model.safetensors"):
    os.symlink(os.path.join(hf_dir, name), bare / name)
  good.init.from_hf = str(bare)
  with pytest.raises(config_lib.ConfigError, match="no tokenizer.model.*set data.tokenizer_path"):
    config_lib.validate(good)
  with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
    hf_config = json.load(f)
  os.unlink(bare / "config.json")
  (bare / "config.json").write_text(json.dumps({**hf_config, "attention_bias": True}))
  good.data.tokenizer_path = os.path.join(hf_dir, "tokenizer.model")
  with pytest.raises(config_lib.ConfigError, match="unsupported attention_bias=true"):
    config_lib.validate(good)


def test_imported_run_scores_as_the_harness_does(exported, tmp_path):
  """`hf import` takes the start token from config.json's bos_token_id (BOS in the "gqa" export, as
  in a LLaMA's; EOS in the "default" one), so eval.py's log-likelihoods on the imported checkpoint
  are lm-eval's hf backend's on the directory (whose tokenizer prepends that token)."""
  from lm_eval.api.instance import Instance  # pylint: disable=import-outside-toplevel
  from lm_eval.models.huggingface import HFLM  # pylint: disable=import-outside-toplevel
  config, _, _, hf_dir, _ = exported
  hf.import_hf(hf_dir, str(tmp_path / "imported"), echo=lambda *a: None)
  restored = restore_lib.restore(str(tmp_path / "imported"), mesh_shape=(1, 1, 1), devices=jax.devices()[:1])
  with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
    bos = json.load(f)["bos_token_id"]
  assert restored.config.data.add_bos == config.data.add_bos == (bos == restored.tokenizer.bos_id)
  pairs = [("The cat sat on", " the mat"), ("Hello", " world, and more words"), ("a b c", " d"), ("x", " y")]
  model = lm_lib.LanguageModel(restored, batch_size=4, progress=False)
  ours = model.loglikelihood(pairs)
  harness = HFLM(pretrained=hf_dir, batch_size=4, device="cpu", dtype="float32")
  theirs = harness.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)],
                                 disable_tqdm=True)
  model.prefix = [restored.tokenizer.eos_id if config.data.add_bos else restored.tokenizer.bos_id]
  other_start = model.loglikelihood(pairs)  # negative control: the other start token
  for (context, continuation), (a, greedy_a), (b, greedy_b), (c, _) in zip(pairs, ours, theirs, other_start):
    # Each token's log-probability is off by at most twice the largest logit difference.
    tol = 2 * LOGIT_TOL * len(model.encode_pair(context, continuation)[1])
    assert abs(a - b) <= tol and greedy_a == greedy_b, (context, a, b)
  assert max(abs(b - c) for (b, _), (c, _) in zip(theirs, other_start)) > 100 * LOGIT_TOL


def test_import_writes_the_state_a_run_from_the_directory_starts_with(exported, tmp_path, gcs_bucket):
  """The streamed checkpoint (a local workdir) and the whole-state one (a bucket) each restore to the
  train state `init.from_hf` builds from the directory: its parameters, zero moments, counts, step."""
  config, _, _, hf_dir, _ = exported
  quiet = lambda *a: None  # noqa: E731
  start = config.copy_and_resolve_references()
  start.init.from_hf = hf_dir
  trainer = train_lib.Trainer(start, str(tmp_path / "reference"), echo=quiet)
  reference = jax.device_get(trainer.initial_state())
  target = checkpoint_lib.abstract_with_shardings(trainer.abstract_state, trainer.state_shardings)
  for workdir in (str(tmp_path / "imported"), f"{gcs_bucket}/imported"):
    path = hf.import_hf(hf_dir, workdir, config=config, step=4, echo=quiet)
    checkpointer = checkpoint_lib.Checkpointer(os.path.dirname(path), every_steps=1, max_to_keep=1)
    assert checkpointer.all_steps() == [4]
    restored = jax.device_get(checkpointer.restore(4, target))
    assert int(restored.step) == 4
    _tree_equal(restored.params, reference.params)
    _tree_equal(restored.opt_state, reference.opt_state)
    assert jax.tree.structure(restored) == jax.tree.structure(reference)


def _without_lm_head(hf_dir, root, tie: bool) -> str:
  """A copy of the directory without lm_head.weight whose config.json has tie_word_embeddings=`tie`."""
  out = root / f"tie_{tie}"
  tensors = {k: v for k, v in safetensors_io.read_dir(hf_dir).items() if k != "lm_head.weight"}
  safetensors_io.write_dir(str(out), tensors, 1 << 30)
  with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
    (out / "config.json").write_text(json.dumps({**json.load(f), "tie_word_embeddings": tie}))
  shutil.copy(os.path.join(hf_dir, "tokenizer.model"), out / "tokenizer.model")
  return str(out)


def test_a_missing_lm_head_is_the_embedding_only_when_tied(exported, tmp_path):
  config, params, _, hf_dir, _ = exported
  untied, tied = _without_lm_head(hf_dir, tmp_path, False), _without_lm_head(hf_dir, tmp_path, True)
  line = (f"{untied}: lm_head.weight is missing but config.json has tie_word_embeddings=false (the output layer "
          "is not the embedding); the weights are incomplete")
  bad = config.copy_and_resolve_references()
  bad.init.from_hf = untied
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(bad)
  assert str(e.value) == f"init.from_hf: {line}"
  with pytest.raises(hf_layout.HFError) as e:  # where training reads the weights
    _import(untied, config)
  assert str(e.value) == line
  with pytest.raises(hf_layout.HFError) as e:
    hf.import_hf(untied, str(tmp_path / "run"), echo=lambda *a: None)
  assert str(e.value) == f"--hf_dir: {line}" and not os.path.exists(tmp_path / "run")
  good = config.copy_and_resolve_references()
  good.init.from_hf = tied
  config_lib.validate(good)
  loaded = _import(tied, config)
  assert np.array_equal(loaded["lm_head"]["kernel"], params["embed"]["embedding"].T)


def test_bad_export_and_import_input_is_one_line_and_writes_nothing(exported, tmp_path):
  config, _, restored, hf_dir, _ = exported
  (tmp_path / "file").write_text("")
  out = str(tmp_path / "file" / "hf")
  with pytest.raises(hf_layout.HFError, match=f"^--out: {out} cannot be created \\({tmp_path / 'file'} is not a "
                     "writable directory\\)$"):
    hf.export(restored.workdir, out)
  for mib in (0, -1):
    with pytest.raises(hf_layout.HFError, match=f"^--max_shard_mb: must be a positive number of MiB, got {mib}$"):
      hf.export(restored.workdir, str(tmp_path / "out"), max_shard_bytes=mib << 20)
  assert not os.path.exists(tmp_path / "out")
  # A tokenizer.model that is not a SentencePiece model; then config.json's start token in neither.
  bad = tmp_path / "bad_tokenizer"
  bad.mkdir()
  for name in ("config.json", "model.safetensors"):
    os.symlink(os.path.join(hf_dir, name), bad / name)
  (bad / "tokenizer.model").write_text("not a model")
  run = str(tmp_path / "run")
  with pytest.raises(hf_layout.HFError) as e:
    hf.import_hf(str(bad), run)
  assert str(e.value) == (f"{bad}/tokenizer.model: not a SentencePiece model (RuntimeError); set "
                          "--config.data.tokenizer_path to the SentencePiece model these weights were trained with")
  os.unlink(bad / "tokenizer.model")
  with pytest.raises(hf_layout.HFError, match="^--hf_dir: .* has no tokenizer.model; set --config.data.tokenizer_path"):
    hf.import_hf(str(bad), run)
  os.symlink(os.path.join(hf_dir, "tokenizer.model"), bad / "tokenizer.model")
  with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
    hf_config = json.load(f)
  os.unlink(bad / "config.json")
  (bad / "config.json").write_text(json.dumps({**hf_config, "bos_token_id": 7}))
  with pytest.raises(hf_layout.HFError, match="^--hf_dir: .*config.json has bos_token_id=7, which is neither BOS"):
    hf.import_hf(str(bad), run)
  os.unlink(bad / "model.safetensors")
  with pytest.raises(hf_layout.HFError, match=f"^--hf_dir: {bad}: no model.safetensors"):
    hf.import_hf(str(bad), run)
  assert not os.path.exists(run)


def _logged(workdir, step):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [r for r in map(json.loads, f) if r["step"] == step and r["split"] == "train"][-1]


@pytest.mark.slow
def test_training_continues_from_an_exported_then_imported_run(tmp_path):
  """A run exported at step 2 and imported at step 2 logs the original's loss at step 3; and
  `init.from_hf` starts a run from exactly those parameters with a fresh optimizer."""
  quiet = lambda *a: None  # noqa: E731
  config = make_tiny_config()
  original, imported, hf_dir = str(tmp_path / "original"), str(tmp_path / "imported"), str(tmp_path / "hf")
  trainer = train_lib.Trainer(config, original, echo=quiet)
  trainer.run(until_step=2)
  hf.export(original, hf_dir)
  hf.import_hf(hf_dir, imported, config=config, step=2, echo=quiet)
  trainer.run(until_step=3)  # resumes from its own step 2
  train_lib.Trainer(config, imported, echo=quiet).run(until_step=3)
  theirs, ours = _logged(original, 3), _logged(imported, 3)
  assert ours["loss"] == theirs["loss"] and ours["ce"] == theirs["ce"]

  trained = restore_lib.restore(original, step=2, mesh_shape=(1, 1, 1), devices=jax.devices()[:1])
  fresh = config.copy_and_resolve_references()
  fresh.init.from_hf = hf_dir
  trainer = train_lib.Trainer(fresh, str(tmp_path / "fresh"), echo=quiet)
  state = trainer.initial_state()
  assert trainer.config.data.tokenizer_path == os.path.join(hf_dir, "tokenizer.model")
  assert int(state.step) == 0
  _tree_equal(jax.device_get(state.params), jax.device_get(trained.params))
  moments = [x for x in jax.tree.leaves(jax.device_get(state.opt_state)) if np.ndim(x) > 0]
  assert moments and all(not np.any(x) for x in moments)


@pytest.mark.slow
def test_command_line(tmp_path):
  config = make_tiny_config()
  run, out, imported = str(tmp_path / "run"), str(tmp_path / "hf"), str(tmp_path / "imported")
  params = _random_params(config, seed=4)
  _write_run(run, config, params)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}

  def cli(*args):
    return subprocess.run([sys.executable, "-m", "mile_jax.hf", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
  done = cli("export", "--workdir", run, "--out", out)
  assert done.returncode == 0, done.stderr
  assert transformers.AutoConfig.from_pretrained(out).num_key_value_heads == config.model.n_kv_heads
  again = cli("export", "--workdir", run, "--out", out)
  assert again.returncode == 2
  assert again.stderr.strip().splitlines()[-1] == f"HF error: --out: {out} exists and is not an empty directory; " \
      "choose a new one"
  for flag, line in (("--dtype=float16", "--dtype: must be one of float32, bfloat16, got 'float16'"),
                     ("--max_shard_mb=-1", "--max_shard_mb: must be a positive number of MiB, got -1")):
    refused = cli("export", "--workdir", run, "--out", str(tmp_path / "other"), flag)
    assert (refused.returncode, refused.stderr) == (2, f"HF error: {line}\n"), refused.stderr[-2000:]
  done = cli("import", "--hf_dir", out, "--workdir", imported)
  assert done.returncode == 0, done.stderr
  restored = restore_lib.restore(imported, mesh_shape=(1, 1, 1), devices=jax.devices()[:1])
  assert restored.step == 0 and restored.config.model.n_kv_heads == config.model.n_kv_heads
  _tree_equal(jax.device_get(restored.params), params)
