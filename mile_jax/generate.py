"""The text generation command: `mile-generate` or `python -m mile_jax.generate`.

    mile-generate --workdir DIR --prompt "Return the number of" --max_new_tokens 32
    mile-generate --workdir DIR --prompts_file prompts.txt --temperature 0.8 --top_p 0.95 --seed 1

Restores the checkpoint at --step (default the latest) of the run in --workdir
as eval.py does (parameters only), puts the token that started every training
document before each prompt (BOS if the run set data.add_bos, else EOS: the
token the exported Hugging Face tokenizer adds), and continues the prompts in
batches of --batch_size: greedily (--temperature 0, the default) or by
sampling from the logits divided by --temperature, cut to --top_k ids and the
--top_p nucleus (mile_jax.evaluation.generation). A continuation ends at EOS,
before the first --stop string, or after --max_new_tokens tokens.

Exit status: 0 done; 2 a flag, prompt file or checkpoint to fix (one line on
stderr, before anything compiles); 1 anything else.
"""

import dataclasses
import functools
import json
import sys
from typing import Sequence

from mile_jax import requirements_check
requirements_check.require()  # Before the imports below: a missing package is one line, not a traceback.

from absl import app  # noqa: E402
from absl import flags
from absl import logging

from mile_jax import config_files
from mile_jax.core import sharding
from mile_jax.evaluation import generation
from mile_jax.evaluation import restore as restore_lib
from mile_jax.evaluation import scoring
from mile_jax.evaluation.errors import EvalError

INT32_MAX = (1 << 31) - 1


@dataclasses.dataclass(frozen=True)
class Options:
  """What to generate from which checkpoint (the command's flags)."""
  workdir: str
  prompts: tuple[str, ...] = ()  # --prompt, in order, before the file's
  prompts_file: str = ""  # one prompt per line; empty lines are skipped
  step: int | None = None  # default the latest checkpoint
  max_new_tokens: int = 64
  temperature: float = 0.0  # 0 = greedy
  top_k: int = 0  # 0 = every id
  top_p: float = 1.0  # 1 = every id
  seed: int = 0
  stop: tuple[str, ...] = ()  # stop strings, cut from the output
  batch_size: int = 8  # prompts per forward pass (rounded up to the mesh's data-parallel size)
  mesh_shape: tuple[int, ...] = restore_lib.DEFAULT_MESH_SHAPE


@dataclasses.dataclass
class Completion:
  """One prompt's continuation."""
  prompt: str
  text: str  # the continuation, without EOS and cut before the first stop string
  tokens: list[int]  # the new token ids, the EOS included when the continuation ended there
  finish: str  # "eos", "stop" or "length"


def check(options: Options) -> None:
  """EvalError naming the flag, for any setting that cannot work (nothing is read or compiled)."""
  if not options.workdir:
    raise EvalError("--workdir: required (a training workdir with checkpoints)")
  if not options.prompts and not options.prompts_file:
    raise EvalError("--prompt or --prompts_file: no prompt given; pass --prompt TEXT (repeatable) or a file of "
                    "one prompt per line")
  if options.max_new_tokens < 1:
    raise EvalError(f"--max_new_tokens: must be at least 1, got {options.max_new_tokens}")
  if not options.temperature >= 0:
    raise EvalError(f"--temperature: must be >= 0 (0 = greedy), got {options.temperature}")
  if options.top_k < 0:
    raise EvalError(f"--top_k: must be >= 0 (0 = no limit), got {options.top_k}")
  if not 0 < options.top_p <= 1:
    raise EvalError(f"--top_p: must be in (0, 1] (1 = no limit), got {options.top_p}")
  if not 0 <= options.seed <= INT32_MAX:
    raise EvalError(f"--seed: must be in [0, {INT32_MAX}], got {options.seed}")
  if options.batch_size < 1:
    raise EvalError(f"--batch_size: must be at least 1, got {options.batch_size}")


def read_prompts(options: Options) -> list[str]:
  """--prompt values, then the non-empty lines of --prompts_file (line ends removed)."""
  prompts = list(options.prompts)
  if options.prompts_file:
    try:
      with open(options.prompts_file, encoding="utf-8") as f:
        lines = [line.rstrip("\r\n") for line in f]
    except (OSError, UnicodeDecodeError) as e:
      why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
      raise EvalError(f"--prompts_file: cannot read {options.prompts_file} ({why})") from None
    from_file = [line for line in lines if line]
    if not from_file:
      raise EvalError(f"--prompts_file: {options.prompts_file} holds no prompt (one per line; empty lines are "
                      f"skipped)")
    prompts += from_file
  return prompts


def _check_length(max_new_tokens: int, max_seq_len: int) -> None:
  if max_new_tokens >= max_seq_len:
    raise EvalError(f"--max_new_tokens: must be below the model's max_seq_len ({max_seq_len}) so that some prompt "
                    f"fits, got {max_new_tokens}")


def start_token(restored: restore_lib.Restored) -> int:
  """The token before every prompt: the one that started each training document."""
  tokenizer = restored.tokenizer
  return tokenizer.bos_id if restored.config.data.get("add_bos", False) else tokenizer.eos_id


def _continuation_text(tokenizer, body: list[int], new: list[int]) -> str:
  """The text `new` adds after `body` (decoded together, so a piece's leading space is kept)."""
  head, whole = tokenizer.decode(body), tokenizer.decode(body + new)
  return whole[len(head):] if whole.startswith(head) else tokenizer.decode(new)


@functools.lru_cache(maxsize=8)
def _sampler(model_config, mesh, temperature: float, top_k: int, top_p: float) -> generation.Sampler:
  """One sampler (and its compiled programs) per model and filter; the seed is an input of its programs."""
  return generation.Sampler(model_config, mesh, generation.Sampling(temperature, top_k, top_p))


def generate(restored: restore_lib.Restored, prompts: Sequence[str], options: Options) -> list[Completion]:
  """The continuation of each prompt (see the module docstring); prompts longer
  than `model.max_seq_len - max_new_tokens` keep their last tokens."""
  _check_length(options.max_new_tokens, restored.max_seq_len)
  tokenizer, eos = restored.tokenizer, restored.tokenizer.eos_id
  max_prompt = restored.max_seq_len - options.max_new_tokens
  bodies = [tokenizer.encode(p) for p in prompts]
  rows = [([start_token(restored)] + body)[-max_prompt:] for body in bodies]
  for i, (prompt, row, body) in enumerate(zip(prompts, rows, bodies)):
    if len(row) < len(body) + 1:
      print(f"prompt {i + 1} ({prompt[:40]!r}...): kept its last {len(row)} of {len(body) + 1} tokens "
            f"(model.max_seq_len {restored.max_seq_len} - --max_new_tokens {options.max_new_tokens})",
            file=sys.stderr)
  stops = [s for s in options.stop if s]

  def done(tokens: list[int]) -> bool:
    return tokens[-1] == eos or any(s in tokenizer.decode(tokens) for s in stops)

  generator = _sampler(restored.model.cfg, restored.mesh, options.temperature, options.top_k, options.top_p)
  dp = sharding.data_parallel_size(restored.mesh)
  width = -(-options.batch_size // dp) * dp
  completions = []
  with restored.context():
    for first in range(0, len(rows), width):
      batch = rows[first:first + width]
      ids = list(range(first, first + len(batch)))
      fill = -len(batch) % dp  # filler rows, discarded: the batch must split over the data-parallel axes
      outputs = generator.generate(restored.params, batch + [batch[-1]] * fill, options.max_new_tokens,
                                   done=done, row_ids=ids + [ids[-1]] * fill, seed=options.seed)
      for i, new in zip(ids, outputs):
        ended = bool(new) and new[-1] == eos
        text = _continuation_text(tokenizer, bodies[i], new[:-1] if ended else new)
        cut = scoring.truncate_at_stop(text, stops)
        finish = "stop" if cut != text else "eos" if ended else "length"
        completions.append(Completion(prompts[i], cut, new, finish))
  return completions


def run_command(options: Options, output_format: str = "text") -> list[Completion]:
  """Checks the options, reads the prompts, restores the run and prints each completion."""
  check(options)
  prompts = read_prompts(options)
  workdir, _, _ = restore_lib.locate(options.workdir, options.step)
  config, _ = restore_lib.load_config(workdir)
  _check_length(options.max_new_tokens, config.model.max_seq_len)
  restored = restore_lib.restore(options.workdir, options.step, options.mesh_shape)
  completions = generate(restored, prompts, options)
  for i, c in enumerate(completions):
    if output_format == "jsonl":
      print(json.dumps({"prompt": c.prompt, "completion": c.text, "tokens": c.tokens, "finish": c.finish},
                       ensure_ascii=False))
    else:
      print(f"--- {i + 1} ({c.finish}, {len(c.tokens)} tokens) ---\n{c.prompt}{c.text}")
  return completions


def unescape(text: str) -> str:
  r"""`text` with the escapes \n, \t and \\ replaced by what they stand for."""
  out, i = [], 0
  while i < len(text):
    pair = text[i:i + 2]
    if pair in ("\\n", "\\t", "\\\\"):
      out.append({"\\n": "\n", "\\t": "\t", "\\\\": "\\"}[pair])
      i += 2
    else:
      out.append(text[i])
      i += 1
  return "".join(out)


_FLAGS: dict[str, flags.FlagHolder] = {}


def define_flags() -> None:
  """The command's flags, defined when it runs rather than on import: importing this module beside another
  program's (mile_jax.hf.convert also has --workdir and --step) must not define a flag twice."""
  if _FLAGS:
    return
  _FLAGS.update(
      workdir=flags.DEFINE_string("workdir", None, "A training workdir, its checkpoints/ or one checkpoints/<step>/."),
      step=flags.DEFINE_integer("step", None, "Checkpoint step; default the latest."),
      prompt=flags.DEFINE_multi_string("prompt", None, "A prompt (repeatable)."),
      prompts_file=flags.DEFINE_string("prompts_file", "",
                                       "A UTF-8 file of prompts, one per line (empty lines skipped)."),
      max_new_tokens=flags.DEFINE_integer("max_new_tokens", 64, "Most new tokens per prompt."),
      temperature=flags.DEFINE_float("temperature", 0.0,
                                     "0 = greedy; > 0 samples from softmax(logits / temperature)."),
      top_k=flags.DEFINE_integer("top_k", 0, "Sample among the k most probable tokens; 0 = all."),
      top_p=flags.DEFINE_float("top_p", 1.0, "Sample within the nucleus of this probability, in (0, 1]; 1 = all."),
      seed=flags.DEFINE_integer("seed", 0, "Sampling seed: the same seed and prompts give the same samples."),
      stop=flags.DEFINE_multi_string("stop", None, r"A stop string (repeatable; \n, \t and \\ are read as "
                                     "escapes): the continuation ends before it."),
      batch_size=flags.DEFINE_integer("batch_size", 8, "Prompts per forward pass."),
      mesh_shape=flags.DEFINE_list("mesh_shape", ["1", "-1", "1"],
                                   "(data, fsdp, tensor) mesh over this machine's devices."),
      output_format=flags.DEFINE_enum("output_format", "text", ["text", "jsonl"],
                                      "text: each prompt and its continuation; jsonl: one JSON object per prompt "
                                      "(prompt, completion, tokens, finish)."))


def main(argv):
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    value = {name: holder.value for name, holder in _FLAGS.items()}
    try:
      mesh_shape = tuple(int(s) for s in value["mesh_shape"])
    except ValueError:
      raise EvalError(f"--mesh_shape: expected integers like 1,-1,1, got {','.join(value['mesh_shape'])}") from None
    options = Options(
        workdir=value["workdir"] or "", prompts=tuple(value["prompt"] or ()), prompts_file=value["prompts_file"],
        step=value["step"], max_new_tokens=value["max_new_tokens"], temperature=value["temperature"],
        top_k=value["top_k"], top_p=value["top_p"], seed=value["seed"],
        stop=tuple(unescape(s) for s in value["stop"] or ()), batch_size=value["batch_size"], mesh_shape=mesh_shape)
    run_command(options, value["output_format"])
  except EvalError as e:
    print(f"Generate error: {e}", file=sys.stderr)
    sys.exit(2)


def run():
  """The `mile-generate` console script (and what `python -m mile_jax.generate` runs)."""
  define_flags()
  config_files.present_as_main(__name__, __doc__)
  app.run(main)


if __name__ == "__main__":
  run()
