"""One process of tests/test_eval_multiprocess.py: scores the test requests with a freshly
initialised tiny model in a 2-process runtime, on the global mesh and on its own devices.

    python tests/eval_processes_worker.py COORDINATOR_ADDRESS PROCESS_ID OUTPUT_JSON
"""

import json
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mile_jax import config_lib  # noqa: E402
from mile_jax.core import model as model_lib  # noqa: E402
from mile_jax.core import sharding  # noqa: E402
from mile_jax.evaluation import lm as lm_lib  # noqa: E402
from mile_jax.evaluation.model_on_mesh import ModelOnMesh  # noqa: E402

EOS = 1


def tiny_config():
  """conftest.make_tiny_config's model, with init std 0.2 (logits spread beyond rounding)."""
  c = config_lib.base_config()
  c.model.update(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64,
                 init_std=0.2)
  return c


def model_on(mesh, seed: int = 0) -> ModelOnMesh:
  """The model with seed `seed`'s parameters, replicated over `mesh`."""
  config = tiny_config()
  rules = sharding.rules_tuple(config.mesh.rules)
  model = model_lib.Decoder(model_lib.DecoderConfig.from_config(config.model))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  with sharding.mesh_context(mesh, rules):
    params = jax.jit(lambda key: nn.unbox(model.init(key, jnp.zeros((1, 8), jnp.int32))["params"]),
                     out_shardings=replicated)(jax.random.key(seed))
  return ModelOnMesh(config=config, model=model, params=params, mesh=mesh, rules=rules,
                     tokenizer=types.SimpleNamespace(eos_id=EOS, bos_id=0))


def requests(seed: int = 3):
  """Multiple-choice-shaped token requests: documents of 1 to 4 choices, some contexts past max_seq_len."""
  rng = np.random.default_rng(seed)
  pairs = []
  for doc in range(24):
    context = [EOS] + rng.integers(4, 512, int(rng.integers(2, 30 if doc % 6 else 80))).tolist()
    pairs += [(context, rng.integers(4, 512, int(rng.integers(1, 8))).tolist())
              for _ in range(int(rng.integers(1, 5)))]
  pairs.append(([EOS, 7], []))  # nothing to score
  return pairs


def score(mesh, batch_size: int = 8):
  """[(log-likelihood as float.hex, greedy)] per request, and the call's stats."""
  lm = lm_lib.LanguageModel(model_on(mesh), batch_size=batch_size, progress=False)
  return [(float(x).hex(), bool(g)) for x, g in lm.loglikelihood_tokens(requests())], lm.stats


def prompts(seed: int = 5):
  """Token prompts of 1 to 40 tokens, for generation."""
  rng = np.random.default_rng(seed)
  return [[EOS] + rng.integers(4, 512, int(rng.integers(0, 40))).tolist() for _ in range(21)]


def generate(mesh, batch_size: int = 4):
  """Greedy tokens per prompt (at most 6; a row stops at a token divisible by 5), and the number of
  batches this process generated."""
  lm = lm_lib.LanguageModel(model_on(mesh), batch_size=batch_size, progress=False)
  real, calls = lm._generator.generate, []  # pylint: disable=protected-access

  def counted(*args, **kwargs):
    calls.append(1)
    return real(*args, **kwargs)
  lm._generator.generate = counted  # pylint: disable=protected-access
  return lm.generate_tokens(prompts(), 6, lambda tokens: tokens[-1] % 5 == 0), len(calls)


def main(address: str, index: int, output: str):
  jax.distributed.initialize(coordinator_address=address, num_processes=2, process_id=index)
  assert jax.process_count() == 2 and len(jax.devices()) == 4 and len(jax.local_devices()) == 2
  spanning, spanning_stats = score(sharding.make_mesh((4, 1, 1), jax.devices()))
  local, local_stats = score(sharding.make_mesh((2, 1, 1), jax.local_devices()))
  generated, generated_batches = generate(sharding.make_mesh((2, 1, 1), jax.local_devices()))
  generated_spanning, _ = generate(sharding.make_mesh((4, 1, 1), jax.devices()))
  with open(output, "w", encoding="utf-8") as f:
    json.dump({"spanning": spanning, "local": local, "spanning_tokens": spanning_stats["tokens"],
               "local_tokens": local_stats["tokens"], "batches": local_stats["batches"],
               "generated": generated, "generated_batches": generated_batches,
               "generated_spanning": generated_spanning}, f)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
