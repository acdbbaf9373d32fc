"""An lm-evaluation-harness model backed by a mile_jax checkpoint.

Where the harness is installed (`pip install -r requirements-eval.txt`),
importing this module registers the model name "mile_jax", so any harness
task runs on a checkpoint:

    import lm_eval
    import mile_jax.evaluation.harness  # registers "mile_jax"
    lm_eval.simple_evaluate(model="mile_jax", model_args="workdir=/tmp/run,step=300,mesh_shape=1;-1;1",
                            tasks=["hellaswag"])

Without the harness the class still works on any objects with an `args`
tuple, which is how the harness hands over its requests.
"""

from typing import Any, Sequence

from mile_jax.evaluation import lm as lm_lib
from mile_jax.evaluation import restore as restore_lib

try:  # The harness is optional.
  from lm_eval.api.model import LM as _Base
  from lm_eval.api.registry import register_model as _register
except ImportError:  # pragma: no cover - depends on the environment
  _Base = object
  _register = None

DEFAULT_MAX_GEN_TOKS = 256


class HarnessLM(_Base):
  """The harness's three request types on a `LanguageModel`.

  Args:
    workdir: a training workdir (or its checkpoints/ or one checkpoints/<step>/).
    step: checkpoint step; default the latest.
    batch_size: rows per forward pass.
    mesh_shape: (data, fsdp, tensor) as a tuple or a string, "1,-1,1" or, inside the
      harness's comma-separated `model_args`, "1;-1;1".
    lm: an already built `LanguageModel` (then the other arguments are ignored).
  """

  def __init__(self, workdir: str = "", step: int | None = None, batch_size: Any = 32,
               mesh_shape: Any = restore_lib.DEFAULT_MESH_SHAPE, lm: lm_lib.LanguageModel | None = None,
               **unused: Any):
    if _Base is not object:
      super().__init__()
    if lm is None:
      if isinstance(mesh_shape, str):
        mesh_shape = tuple(int(s) for s in mesh_shape.strip("()").replace(";", ",").split(",") if s.strip())
      restored = restore_lib.restore(workdir, None if step in (None, "") else int(step), mesh_shape)
      lm = lm_lib.LanguageModel(restored, batch_size=int(batch_size) if str(batch_size).isdigit() else 32)
    self.lm = lm

  def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    """`args` = (context, continuation) -> (log p(continuation | context), is greedy)."""
    return self.lm.loglikelihood([tuple(r.args[:2]) for r in requests])

  def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
    """`args` = (text,) -> log p(text), the whole text scored."""
    return self.lm.loglikelihood_rolling([r.args[0] for r in requests])

  def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
    """`args` = (context, {"until": [...], "max_gen_toks": n, ...}) -> greedy text before a stop."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
      kwargs = dict(r.args[1]) if len(r.args) > 1 and r.args[1] else {}
      until = kwargs.get("until") or []
      until = (until,) if isinstance(until, str) else tuple(until)
      groups.setdefault((until, int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))), []).append(i)
    out = [""] * len(requests)
    for (until, max_gen_toks), ids in groups.items():
      texts = self.lm.generate_until([requests[i].args[0] for i in ids], until, max_gen_toks)
      for i, text in zip(ids, texts):
        out[i] = text
    return out


if _register is not None:  # pragma: no cover - depends on the environment
  _register("mile_jax")(HarnessLM)
