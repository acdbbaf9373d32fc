"""eval.py's restore reads only the parameters, onto any mesh; the perplexity's
row-level standard error against float64 NumPy."""

import io
import json
import os
import shutil
import subprocess
import sys
import types

from absl import flags
import jax
import numpy as np
import pytest
import tensorstore as ts

import conftest
from mile_jax import eval_cli
from mile_jax import train_lib
from mile_jax.core import model as model_lib
from mile_jax.core import optim
from mile_jax.core import sharding
from mile_jax.core import step as step_lib
from mile_jax.errors import ConfigError
from mile_jax.evaluation import perplexity
from mile_jax.evaluation import restore as restore_lib
from mile_jax.evaluation import runner
from mile_jax.evaluation.errors import EvalError
from mile_jax.run import checkpoint as checkpoint_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(workdir, config, the trained TrainState as NumPy) of a real tiny run."""
  workdir = str(tmp_path_factory.mktemp("run"))
  config = conftest.make_tiny_config(**{"train.steps": STEPS, "checkpoint.every_steps": STEPS,
                                        "optim.warmup_steps": 2})
  state = train_lib.Trainer(config, workdir, devices=jax.devices()[:1]).run()
  return workdir, config, jax.device_get(state)


def _assert_trees_equal(got, expected):
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(jax.device_get(g)), np.asarray(e))


def _abstract_state(config, mesh):
  model = model_lib.Decoder(model_lib.DecoderConfig.from_config(config.model))
  tx, _ = optim.make_optimizer(config.optim, config.train.steps)
  abstract, shardings = step_lib.state_shardings(model, tx, mesh, sharding.rules_tuple(config.mesh.rules),
                                                  config.data.seq_len)
  return abstract, shardings


@pytest.mark.parametrize("mesh_shape, count", [((1, 1, 1), 1), ((1, 4, 2), 8), ((2, 2, 2), 8)])
def test_params_restore_exactly_onto_any_mesh(trained, mesh_shape, count):
  workdir, config, state = trained
  restored = restore_lib.restore(workdir, mesh_shape=mesh_shape, devices=jax.devices()[:count])
  assert restored.step == STEPS
  _assert_trees_equal(restored.params, state.params)
  _, shardings = _abstract_state(config, restored.mesh)
  for leaf, expected in zip(jax.tree.leaves(restored.params), jax.tree.leaves(shardings.params)):
    assert leaf.sharding.is_equivalent_to(expected, leaf.ndim)
  assert len(restored.params["lm_head"]["kernel"].sharding.device_set) == count


def _stored_values(state_dir):
  """{key: (file, offset, length)} of the array chunks stored out of line in
  the `state` item's OCDBT database (small values are inlined in its b-tree)."""
  base = ts.KvStore.open(f"file://{state_dir}/").result()
  root = ts.ocdbt.dump(base).result()["versions"][-1]
  assert root["root_height"] == 0  # One b-tree node holds every key of a checkpoint this small.
  out = {}
  for entry in ts.ocdbt.dump(base, root["root"]["location"]).result()["entries"]:
    if "indirect_value" in entry:  # "value:<prefix>:<file>:<offset>:<length>"
      _, prefix, name, offset, length = entry["indirect_value"].split(":")
      out[entry["key"]] = (os.path.join(state_dir, prefix, name), int(offset), int(length))
  return out


def test_optimizer_state_is_never_read(trained, tmp_path):
  workdir, config, state = trained
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy)
  state_dir = os.path.join(copy, "checkpoints", str(STEPS), "state")
  stored = _stored_values(state_dir)
  opt_chunks = [where for key, where in stored.items() if key.startswith(b"opt_state.")]
  # AdamW's first and second moments of every large parameter are stored out of line.
  assert len(opt_chunks) >= 2 * sum(1 for k in stored if k.startswith(b"params."))
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  abstract, shardings = _abstract_state(config, mesh)
  full = checkpoint_lib.abstract_with_shardings(abstract, shardings)
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(copy, "checkpoints"), every_steps=1, max_to_keep=100,
                                             async_save=False)
  _assert_trees_equal(checkpointer.restore(STEPS, full).opt_state, state.opt_state)  # Intact, it loads.
  for path, offset, length in opt_chunks:
    with open(path, "r+b") as f:
      f.seek(offset)
      f.write(b"\xff" * length)
  with pytest.raises(Exception):  # The full state no longer restores...
    checkpointer.restore(STEPS, full)
  # ...but the parameters do, exactly: no byte of the optimizer state was read.
  _assert_trees_equal(restore_lib.restore(copy, mesh_shape=(1, 1, 1), devices=jax.devices()[:1]).params,
                      state.params)


def _edit_config(workdir, **model):
  path = os.path.join(workdir, "config.json")
  with open(path, encoding="utf-8") as f:
    config = json.load(f)
  config["model"].update(model)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(config, f)


def test_another_models_config_is_named(trained, tmp_path):
  workdir, config, _ = trained
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy)
  _edit_config(copy, n_layers=3)
  with pytest.raises(EvalError, match=r"config.json: checkpoint .*/checkpoints/4 was saved by a different model "
                     r"\(model.n_layers=2 there, 3 in config.json\)"):
    restore_lib.restore(copy, mesh_shape=(1, 1, 1), devices=jax.devices()[:1])
  # Without the settings to compare, the first differing parameter is named.
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(copy, "checkpoints"), every_steps=1, max_to_keep=100)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  abstract, shardings = _abstract_state(conftest.make_tiny_config(**{"model.d_ff": 96}), mesh)
  with pytest.raises(ConfigError, match=r"holds other parameters than this model "
                     r"\(params/layer_0/mlp/down/kernel has shape \(128, 64\) there, \(96, 64\) in this model\)"):
    checkpointer.restore_params(STEPS, checkpoint_lib.abstract_with_shardings(abstract.params, shardings.params))


def test_a_run_trained_with_splash_is_scored_with_this_machines_kernel(trained, tmp_path):
  workdir, _, state = trained
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy)
  _edit_config(copy, attention="splash")  # As a TPU run saves it; interpreted on CPU it would crawl.
  restored = restore_lib.restore(copy, mesh_shape=(1, 1, 1), devices=jax.devices()[:1])
  assert restored.model.cfg.attention == "auto"
  _assert_trees_equal(jax.device_get(restored.params), state.params)


def test_damaged_checkpoint_is_one_clear_error(trained, tmp_path):
  workdir, _, _ = trained
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy)
  os.remove(os.path.join(copy, "checkpoints", str(STEPS), "state", "_METADATA"))
  with pytest.raises(EvalError, match=r"checkpoint .*/checkpoints/4 cannot be read \(.*\); pass another --step"):
    restore_lib.restore(copy, mesh_shape=(1, 1, 1), devices=jax.devices()[:1])


def test_eval_py_names_a_damaged_tokenizer_and_a_bad_batch_size(trained, tmp_path):
  workdir, _, _ = trained
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  model = (copy / "tokenizer.model").read_bytes()
  (copy / "tokenizer.model").write_bytes(model[:len(model) // 2])  # Cut short, as by a full disk.
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  commands = {"tokenizer": ["--workdir", str(copy)], "batch": ["--workdir", workdir, "--batch_size", "0"]}
  procs = {name: subprocess.Popen([sys.executable, "eval.py", *args], cwd=ROOT, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name, args in commands.items()}
  results = {name: (proc.communicate(timeout=120)[1], proc.returncode) for name, proc in procs.items()}
  assert results["tokenizer"] == (
      f"Eval error: {copy}/tokenizer.model is not a readable SentencePiece model (it cannot be parsed); copy the "
      "run's tokenizer back: every checkpoint's meta holds it (mile_jax.run.checkpoint.tokenizer_bytes)\n", 2)
  assert results["batch"] == ("Eval error: --batch_size: must be >= 1, got 0\n", 2)


def _eval_cli(args, capsys) -> tuple[str, int]:
  """(stderr, exit status) of eval.py's main on `args`, in this process (no compilation cache)."""
  flags.FLAGS.unparse_flags()
  try:
    eval_cli.main(flags.FLAGS(["eval.py", "--compilation_cache_dir=", *args]))
    code = 0
  except SystemExit as e:
    code = e.code
  finally:
    flags.FLAGS.unparse_flags()
  return capsys.readouterr().err, code


def test_eval_py_turns_bad_files_and_flags_into_one_line(trained, tmp_path, capsys):
  workdir, _, _ = trained
  garbled = tmp_path / "garbled"
  shutil.copytree(workdir, garbled)
  (garbled / "config.json").write_text('{"model": {"vocab_size": 512,')  # Cut short.
  counts = (garbled / "token_counts.npy").read_bytes()
  (garbled / "token_counts.npy").write_bytes(counts[:len(counts) // 2])
  cases = {
      ("--workdir", workdir, "--mesh_shape", "a,b,c"):
          "--mesh_shape: expected three integers (data, fsdp, tensor) such as 1,-1,1, got a,b,c",
      ("--workdir", str(garbled)):
          f"{garbled}/config.json is not valid JSON (line 1 column 30: Expecting property name enclosed in double "
          "quotes); copy back the config.json that train.py wrote for this run (each checkpoint saves it too: "
          "mile_jax.run.checkpoint.Checkpointer.restore_config)",
      ("--workdir", workdir, "--output", str(tmp_path)):
          f"--output: {tmp_path} is a directory; give the path of a JSON file to write",
      ("--compare", workdir, "--compare", workdir):
          f"--compare: {workdir} has no eval.py results yet (none in {workdir}/eval); run eval.py --workdir "
          f"{workdir} first",
      ("--workdir", workdir, "--ppl_batches", "-1"):
          "--ppl_batches: must be >= 0 (0 = the whole validation split), got -1",
      ("--workdir", workdir, "--max_gen_toks", "-1"): "--max_gen_toks: must be >= 1, got -1",
  }
  for args, message in cases.items():
    assert _eval_cli(args, capsys) == (f"Eval error: {message}\n", 2), args
  shutil.copy(os.path.join(workdir, "config.json"), garbled / "config.json")  # Only token_counts.npy is bad now.
  err, code = _eval_cli(("--workdir", str(garbled), "--tasks", "buckets"), capsys)
  assert code == 2 and err.startswith(f"Eval error: {garbled}/token_counts.npy is not a readable NumPy array")
  assert not os.path.exists(os.path.join(workdir, "eval"))  # nothing written


def test_a_tokenizer_of_another_size_is_named(trained, tmp_path):
  workdir, _, _ = trained
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  (copy / "tokenizer.model").write_bytes(b"")  # Parses, as a model of no pieces.
  with pytest.raises(EvalError, match=rf"^{copy}/tokenizer.model has 0 pieces, the run's model.vocab_size is 512; "):
    restore_lib.restore(str(copy), mesh_shape=(1, 1, 1), devices=jax.devices()[:1])


def test_data_errors_name_where_the_setting_came_from(trained):
  workdir, _, _ = trained
  restored = restore_lib.restore(workdir, mesh_shape=(1, 1, 1), devices=jax.devices()[:1])
  text_dataset = runner._text_dataset  # pylint: disable=protected-access
  with pytest.raises(EvalError, match=r"^--ppl_source='nope': data.source: 'nope' is not a source"):
    text_dataset(restored, runner.EvalOptions(workdir=workdir, ppl_source="nope"))
  restored.config.data.source = "builtin:other"
  with pytest.raises(EvalError, match=rf"^{workdir}/config.json: data.source: 'builtin:other' is not a source"):
    text_dataset(restored, runner.EvalOptions(workdir=workdir))


def _ratio_se64(y, n):
  """float64 reference: se of sum(y)/sum(n) with rows as independent clusters."""
  y, n = np.asarray(y, np.float64), np.asarray(n, np.float64)
  r = y.sum() / n.sum()
  m = y.size
  return np.sqrt(m / (m - 1) * np.sum((y - r * n) ** 2)) / n.sum()


def _sums_from_rows(row_ce, row_tokens, batches):
  """`evaluate`'s sums, accumulated batch by batch from known per-row values."""
  totals = None
  for y, n in zip(np.array_split(row_ce, batches), np.array_split(row_tokens, batches)):
    sums = {"ce_sum": y.sum(0), "ce_sq_sum": np.zeros(y.shape[1]), "entropy_sum": np.zeros(y.shape[1]),
            "tokens": n.sum(0), **perplexity.row_moments(y, n)}
    totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
  return totals


def test_row_stderr_matches_float64_ratio_estimator():
  # By hand: rows (y, n) = (2, 1), (6, 2), (4, 1): ce 3, residuals -1, 0, 1, var = 3/2 * 2 / 16.
  hand = perplexity.summarize(_sums_from_rows(np.array([[2.0], [6.0], [4.0]]), np.array([[1.0], [2.0], [1.0]]), 2))
  assert hand["ce"] == 3.0
  np.testing.assert_allclose(hand["ce_stderr_rows"], np.sqrt(3 / 16), rtol=1e-12)
  np.testing.assert_allclose(hand["perplexity_stderr_rows"], np.exp(3.0) * np.sqrt(3 / 16), rtol=1e-12)
  rng = np.random.default_rng(0)
  row_tokens = rng.integers(0, 40, size=(96, 3)).astype(np.float64)
  row_ce = row_tokens * rng.uniform(2.0, 8.0, size=(96, 1)) + rng.normal(0, 3, size=(96, 3))
  sums = _sums_from_rows(row_ce, row_tokens, batches=5)
  for k in range(3):
    got = perplexity.summarize(sums, k)
    np.testing.assert_allclose(got["ce"], row_ce[:, k].sum() / row_tokens[:, k].sum(), rtol=1e-12)
    np.testing.assert_allclose(got["ce_stderr_rows"], _ratio_se64(row_ce[:, k], row_tokens[:, k]), rtol=1e-9)
  np.testing.assert_allclose(perplexity.summarize(sums)["ce_stderr_rows"],
                             _ratio_se64(row_ce.sum(1), row_tokens.sum(1)), rtol=1e-9)


def test_row_stderr_covers_correlated_tokens_where_the_token_one_does_not():
  """Tokens share a per-row level (as tokens of one document do): over 4000 draws
  the spread of the mean matches the row-level error, not the token-level one."""
  rng = np.random.default_rng(1)
  draws, rows, length = 4000, 32, 16
  ce = rng.normal(3.0, 1.0, (draws, rows, 1)) + rng.normal(0.0, 1.0, (draws, rows, length))
  means = ce.mean(axis=(1, 2))
  one = ce[0]
  sums = _sums_from_rows(one.sum(1, keepdims=True), np.full((rows, 1), float(length)), batches=4)
  sums["ce_sq_sum"] = np.array([np.sum(one ** 2)])
  got = perplexity.summarize(sums)
  spread = means.std(ddof=1)  # true se: sqrt((1 + 1/16) / 32) = 0.182
  assert abs(got["ce_stderr_rows"] / spread - 1) < 0.35
  assert got["ce_stderr"] < 0.5 * spread  # tokens as independent: sqrt(2 / 512) = 0.0625


def test_evaluate_row_sums_match_the_model_in_float64(trained):
  workdir, _, _ = trained
  restored = restore_lib.restore(workdir, mesh_shape=(1, 1, 1), devices=jax.devices()[:1])
  dataset = runner._text_dataset(restored, runner.EvalOptions(workdir=workdir, batch_size=4))  # pylint: disable=protected-access
  got = perplexity.summarize(perplexity.evaluate(restored, dataset, batch_size=4, max_batches=2))
  row_ce, row_tokens = [], []
  for step in range(2):
    batch = dataset.batch(step, 4)
    z = np.asarray(restored.model.apply({"params": restored.params}, batch["inputs"]), np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0] * batch["mask"]
    row_ce.append(ce.sum(1))
    row_tokens.append(np.asarray(batch["mask"], np.float64).sum(1))
  row_ce, row_tokens = np.concatenate(row_ce), np.concatenate(row_tokens)
  np.testing.assert_allclose(got["ce"], row_ce.sum() / row_tokens.sum(), rtol=1e-5)
  np.testing.assert_allclose(got["ce_stderr_rows"], _ratio_se64(row_ce, row_tokens), rtol=1e-3)


class _FirstRows:
  """The first `rows` rows of `dataset` as a validation split of their own; its batches
  read on past them (as a packed split reads its next epoch), which must not count."""

  def __init__(self, dataset, rows):
    self.dataset, self.rows_per_epoch = dataset, rows

  def batch(self, step, global_batch_size, process_index=0, process_count=1):
    return self.dataset.batch(step, global_batch_size, process_index, process_count)


def test_perplexity_scores_every_row_when_the_batches_do_not_divide_them(trained):
  workdir, _, _ = trained
  restored = restore_lib.restore(workdir, mesh_shape=(1, 1, 1), devices=jax.devices()[:1])
  dataset = runner._text_dataset(restored, runner.EvalOptions(workdir=workdir))  # pylint: disable=protected-access
  rows = 11  # batches of 4: 4, 4 and 3 rows
  sums = perplexity.evaluate(restored, _FirstRows(dataset, rows), batch_size=4, progress=False)
  got = perplexity.summarize(sums)
  # float64 reference over all 11 rows at once.
  batch = dataset.batch(0, rows)
  z = np.asarray(restored.model.apply({"params": restored.params}, batch["inputs"]), np.float64)
  z = z - z.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  mask = np.asarray(batch["mask"], np.float64)
  ce = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0] * mask
  assert got["tokens"] == mask.sum() == rows * 32
  assert np.max(sums["rows"]) == rows
  # float32 logits and a float32 log-softmax over V = 512 against float64: a few 2^-24 relative per
  # token; summed over 352 tokens in float32 on the device, about sqrt(352) times that.
  np.testing.assert_allclose(got["ce"], ce.sum() / mask.sum(), rtol=1e-5)
  np.testing.assert_allclose(got["ce_stderr_rows"], _ratio_se64(ce.sum(1), mask.sum(1)), rtol=1e-3)
  # --ppl_batches 2 takes the two whole batches only.
  two = perplexity.summarize(perplexity.evaluate(restored, _FirstRows(dataset, rows), batch_size=4, max_batches=2,
                                                 progress=False))
  assert two["tokens"] == 8 * 32
  np.testing.assert_allclose(two["ce"], ce[:8].sum() / mask[:8].sum(), rtol=1e-5)


def test_a_mesh_of_several_processes_feeds_each_its_share(monkeypatch):
  device = lambda p: types.SimpleNamespace(process_index=p)
  mesh = lambda *processes: types.SimpleNamespace(devices=np.array([device(p) for p in processes]))
  share = perplexity._process_share  # pylint: disable=protected-access
  monkeypatch.setattr(jax, "process_index", lambda: 1)  # process 1 of a run of 3
  monkeypatch.setattr(jax, "process_count", lambda: 3)
  assert share(mesh(0, 0, 1, 1)) == (1, 2)
  assert share(mesh(1, 1)) == (0, 1)  # eval.py's mesh of this process's devices: the whole batch


def test_restore_defaults_to_this_process_devices(trained, monkeypatch):
  workdir, _, _ = trained
  monkeypatch.setattr(jax, "local_devices", lambda: jax.devices()[:2])  # as one process of a run of four
  restored = restore_lib.restore(workdir, mesh_shape=(1, -1, 1))
  assert list(restored.mesh.devices.flat) == jax.devices()[:2]


def _copy_run(workdir, tmp_path):
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  return copy


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[:len(raw) // 2], r" is not a readable NumPy array of token counts \(EOF: reading array data"),
    (lambda raw: raw[:20], r" is not a readable NumPy array of token counts \(EOF: reading array header"),
    (lambda raw: b"", r" is not a readable NumPy array of token counts \(it does not start with the .npy header\)"),
    (lambda raw: b"garbage" * 9, r" is not a readable NumPy array of token counts \(it does not start with the .npy"),
    (lambda raw: _npy(np.arange(10)), r": expected 512 token counts \(model.vocab_size\), found shape \(10,\)"),
    (lambda raw: _npy(np.full(512, 0.5)), r": expected integer token counts, found dtype float64"),
    (lambda raw: _npy(np.zeros(512, np.int64)), r": expected non-negative token counts with a positive sum, found "
                                                r"smallest 0, sum 0"),
])
def test_token_counts_errors_name_the_file_before_the_model_loads(trained, tmp_path, monkeypatch, damage, message):
  workdir, _, _ = trained
  copy = _copy_run(workdir, tmp_path)
  path = copy / "token_counts.npy"
  path.write_bytes(damage(path.read_bytes()))
  monkeypatch.setattr(restore_lib, "restore", lambda *a, **k: pytest.fail("the model was loaded"))
  with pytest.raises(EvalError, match=rf"^{path}{message}.*; copy the run's token_counts.npy back"):
    runner.evaluate(runner.EvalOptions(workdir=str(copy), tasks="buckets"))


def _npy(array):
  buffer = io.BytesIO()
  np.save(buffer, array)
  return buffer.getvalue()


def test_a_config_json_that_is_not_a_config_is_named(trained, tmp_path):
  workdir, _, _ = trained
  copy = _copy_run(workdir, tmp_path)
  for text, message in (("not json", r"is not valid JSON \(line 1 column 1: Expecting value\)"),
                        ("[1, 2]", r"is not a run's config \(a JSON object with a 'model' section\)")):
    (copy / "config.json").write_text(text)
    with pytest.raises(EvalError, match=rf"^{copy}/config.json {message}; copy back the config.json"):
      restore_lib.restore(str(copy), mesh_shape=(1, 1, 1), devices=jax.devices()[:1])


def test_an_unwritable_output_is_found_before_the_model_loads(trained, tmp_path, monkeypatch):
  workdir, _, _ = trained
  monkeypatch.setattr(restore_lib, "restore", lambda *a, **k: pytest.fail("the model was loaded"))
  (tmp_path / "file").write_text("")
  for output in (str(tmp_path), str(tmp_path / "file" / "r.json")):
    with pytest.raises(EvalError, match="^--output: "):
      runner.evaluate_and_report(runner.EvalOptions(workdir=workdir, output=output), echo=lambda _: None)
