"""Both packed layouts (prefix tree, one segment per request) against one forward pass per request,
and the choice between them by FLOPs and memory (evaluation/layouts.py)."""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
from mile_jax.core import model as model_lib
from mile_jax.core import sharding
from mile_jax.evaluation import layouts
from mile_jax.evaluation import lm as lm_lib
from mile_jax.evaluation import packed_requests as pr
from mile_jax.evaluation.model_on_mesh import ModelOnMesh

EOS = 1
# float32 error model of one request's log-likelihood: every logit passes two blocks and the
# unembedding, each a sum of at most 512 products (the vocabulary; d_ff is 128), so it carries about
# u sqrt(512) relative error per stage, u = 2^-24, on values of up to `scale` (the largest |log p|
# of the request); three stages and n tokens add up at worst linearly. A mask that lets a token read
# a sibling, or a wrong position, moves log p by the order of the logits' spread (0.1 and more here).
U = 2.0 ** -24
PER_TOKEN = 3 * U * np.sqrt(512)


def random_model(seed: int = 0) -> ModelOnMesh:
  """The tiny test model, freshly initialised (init std 0.2: logits spread well beyond rounding), on one device."""
  config = conftest.make_tiny_config(**{"model.init_std": 0.2})
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  rules = sharding.rules_tuple(config.mesh.rules)
  model = model_lib.Decoder(model_lib.DecoderConfig.from_config(config.model))
  with sharding.mesh_context(mesh, rules):
    params = jax.jit(lambda key: nn.unbox(model.init(key, jnp.zeros((1, 8), jnp.int32))["params"]))(
        jax.random.key(seed))
  tokenizer = types.SimpleNamespace(eos_id=EOS, bos_id=0)  # token-level calls only: no text
  return ModelOnMesh(config=config, model=model, params=params, mesh=mesh, rules=rules, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def loaded():
  return random_model()


def log_softmax64(logits):
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def reference(loaded, pairs):
  """(log-likelihood, greedy, margin, scale) per request from one unpadded forward pass each (on a
  right-padded buffer of max_seq_len: causal, so padding cannot change it), float64 log-softmax."""
  apply = jax.jit(lambda p, t: loaded.model.apply({"params": p}, t))
  out = []
  for context, continuation in pairs:
    seq = (list(context) + list(continuation))[-(loaded.max_seq_len + 1):]
    scored = max(0, min(len(continuation), len(seq) - 1))
    if scored == 0:
      out.append((0.0, True, np.inf, 0.0))
      continue
    buffer = np.zeros((1, loaded.max_seq_len), np.int32)
    buffer[0, :len(seq) - 1] = seq[:-1]
    logits = np.asarray(apply(loaded.params, buffer), np.float64)[0]
    rows = log_softmax64(logits)
    at = range(len(seq) - 1 - scored, len(seq) - 1)
    top2 = np.sort(logits[list(at)], axis=-1)[:, -2:]
    out.append((sum(rows[t, seq[t + 1]] for t in at), all(np.argmax(logits[t]) == seq[t + 1] for t in at),
                float(np.min(top2[:, 1] - top2[:, 0])), float(np.abs(rows[list(at)]).max())))
  return out


def requests(rng):
  tokens = lambda n: rng.integers(4, 512, n).tolist()
  context = [EOS] + tokens(9)
  stem = tokens(3)
  pairs = [(context, stem + tokens(3)), (context, stem[:2] + tokens(2)),  # shared first tokens
           (context, stem), (context, stem[:1]),  # choices that are prefixes of another
           (context, stem + tokens(3)), (context, [])]  # and an empty continuation
  pairs.append(pairs[0])  # a duplicate
  long_context = [EOS] + tokens(70)  # longer than max_seq_len (64): cut from the left
  pairs += [(long_context, tokens(5)), (long_context, tokens(4)), ([], tokens(3))]
  for _ in range(6):  # several short documents per row
    c = [EOS] + tokens(int(rng.integers(1, 10)))
    pairs += [(c, tokens(int(rng.integers(1, 5)))) for _ in range(int(rng.integers(1, 4)))]
  return pairs


@pytest.mark.parametrize("layout", ["tree", "segments"])
def test_each_layout_matches_one_forward_pass_per_request(loaded, layout):
  pairs = requests(np.random.default_rng(1))
  lm = lm_lib.LanguageModel(loaded, batch_size=2, progress=False, layout=layout)
  got = lm.loglikelihood_tokens(pairs)
  assert lm.stats["layout"] == layout and lm.stats["batches"] > 1
  for i, ((logp, greedy), (want, want_greedy, margin, scale)) in enumerate(zip(got, reference(loaded, pairs))):
    n = max(1, len(pairs[i][1]))
    tol = n * PER_TOKEN * max(scale, 1.0)
    assert abs(logp - want) <= tol, (i, logp, want, tol)
    if margin > 8 * PER_TOKEN * max(scale, 1.0):  # no near-tie for the top logit
      assert greedy == want_greedy, i
  assert got[6] == got[0]  # the duplicate gets the very same number
  assert got[5] == (0.0, True)


def test_segment_layout_by_hand():
  unit = pr.Unit((5, 6, 7))
  for request, continuation in ((0, (8, 9)), (1, (8, 10)), (2, (11,))):
    unit.add(request, continuation)
  units = pr.one_per_request([unit])
  assert [(u.context, u.members, u.length) for u in units] == [
      ((5, 6, 7), [(0, (8, 9))], 4), ((5, 6, 7), [(1, (8, 10))], 4), ((5, 6, 7), [(2, (11,))], 3)]
  batch = pr.layout([units[:2], units[2:]], width=9, groups=1, scored=8, segments=True)
  x = batch.arrays
  assert "visible_until" not in x
  np.testing.assert_array_equal(x["inputs"], [[5, 6, 7, 8, 5, 6, 7, 8, 0], [5, 6, 7] + [0] * 6])
  np.testing.assert_array_equal(x["positions"], [[0, 1, 2, 3, 0, 1, 2, 3, 0], [0, 1, 2] + [0] * 6])
  np.testing.assert_array_equal(x["segment_ids"], [[1, 1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1] + [0] * 6])
  np.testing.assert_array_equal(x["sources"][0], [2, 3, 6, 7, 11, 0, 0, 0])  # row 1 starts at slot 9
  np.testing.assert_array_equal(x["targets"][0], [8, 9, 8, 10, 11, 0, 0, 0])
  np.testing.assert_array_equal(batch.owner[0], [0, 0, 1, 1, 2, -1, -1, -1])
  with pytest.raises(ValueError, match="one request each"):
    pr.layout([[unit]], width=9, groups=1, scored=8, segments=True)


# The 6.7B model's attention as the issue sizes it: per device (B / dp rows), float32 scores and
# probabilities of (rows, heads, W, W) plus the boolean mask.
CFG_7B = model_lib.DecoderConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                                 d_ff=11008, max_seq_len=2048)


def test_working_bytes_by_hand():
  rows, w, s = 4, 2048, 64
  activations = rows * w * (4 * 4096 + 3 * 11008) * 4  # float32 compute by default
  logits = s * 32000 * 8
  xla = layouts.working_bytes(CFG_7B, attention="xla", rows=rows, width=w, scored=s)
  assert xla == activations + rows * 32 * w * w * 8 + rows * w * w + logits
  assert layouts.working_bytes(CFG_7B, attention="splash", rows=rows, width=w, scored=s) == (
      activations + rows * 32 * w * 4 + logits)
  # Tensor parallelism divides the heads.
  assert layouts.working_bytes(CFG_7B, attention="xla", rows=rows, width=w, scored=s, heads_shards=4) == (
      activations + rows * 8 * w * w * 8 + rows * w * w + logits)


def test_choose_takes_the_tree_where_it_fits_and_segments_where_it_does_not():
  cfg = model_lib.DecoderConfig.from_config(conftest.make_tiny_config().model)
  rng = np.random.default_rng(2)
  # Documents of four long choices after a long context: the tree saves most tokens.
  pairs = []
  for _ in range(16):
    context = [EOS] + rng.integers(4, 512, 40).tolist()
    pairs += [(context, rng.integers(4, 512, 6).tolist()) for _ in range(4)]
  groups, _ = pr.make_groups(pairs, 64)
  device = layouts.Device(memory_bytes=None, rows_shards=1, heads_shards=1, segment_attention="splash")
  options = layouts.candidates(groups, 8, 64, cfg, device)
  tree = min((c for c in options if not c.segments), key=lambda c: c.flops)
  segments = min((c for c in options if c.segments), key=lambda c: c.flops)
  assert tree.flops < segments.flops
  assert layouts.choose(groups, 8, 64, cfg, device).name == "tree"  # no limit: the fewest FLOPs
  # A budget between the segments' bytes and the smallest tree's: the segment layout.
  smallest_tree = min(c.working_bytes for c in options if not c.segments)
  assert segments.working_bytes < smallest_tree
  budget = (segments.working_bytes + smallest_tree) / 2
  chosen = layouts.choose(groups, 8, 64, cfg, layouts.Device(budget, 1, 1, "splash"))
  assert chosen.name == "segments" and chosen.working_bytes <= budget
  # Nothing fits: the smallest.
  least = layouts.choose(groups, 8, 64, cfg, layouts.Device(1.0, 1, 1, "splash"))
  assert least.working_bytes == min(c.working_bytes for c in options)
  # On XLA's kernel the segment layout saves no memory: the tree is chosen whatever the budget allows.
  xla = layouts.Device(smallest_tree, 1, 1, "xla")
  assert layouts.choose(groups, 8, 64, cfg, xla).name == "tree"
