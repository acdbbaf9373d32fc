"""Hugging Face transformers interop: export a run as a LLaMA directory, import one as a run.

    python -m mile_jax.hf export --workdir DIR [--step N] --out HF_DIR [--dtype float32|bfloat16]
    python -m mile_jax.hf import --hf_dir HF_DIR --workdir DIR [--step N] [--config FILE --config.x=...]

On several hosts, run the same command on each with --coordinator_address,
--num_processes and --process_id (or $JAX_COORDINATOR_ADDRESS, ... as
train.py and eval.py; `process_flags`): `export` is written once, by process
0, and is complete when the command returns on any process.

`export` writes what `AutoModelForCausalLM.from_pretrained(HF_DIR)` and
`AutoTokenizer.from_pretrained(HF_DIR)` load without extra code: config.json
(LlamaConfig), model.safetensors (sharded with an index above
--max_shard_mb; the parameters read from the checkpoint's files one array at a
time, so host memory stays near the largest array, see `exporter`), generation_config.json, and the run's SentencePiece model
both as it is (tokenizer.model) and as a fast tokenizer (tokenizer.json, see
`hf_tokenizer`). It needs the `tokenizers` package (the `eval` extra:
`pip install -e ".[eval]"`).

`import` writes a checkpoint at step --step (default 0) of a transformers
LLaMA directory into a new workdir, with config.json and tokenizer.model, so
that eval.py evaluates it and train.py continues from it (the optimizer
state is fresh). The model settings come from the directory's config.json,
and `data.add_bos` from its `bos_token_id` (the token that started the
model's documents, which eval.py puts before every request); the rest from
--config (default: `config_lib.base_config()`). Training can
also start from such a directory directly: `--config.init.from_hf=HF_DIR`.

Only weight layouts are converted (`hf_layout`); nothing from transformers
or torch runs here. Exit status: 0 done; 2 bad input, with one line on
stderr (`HF error: ...`, `Config error: ...`, `Eval error: ...`).
"""

import os
import sys
import types
from typing import Any

from mile_jax import requirements_check
requirements_check.require()  # Before the imports below: a missing package is one line, not a traceback.
from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from mile_jax import config_lib
from mile_jax import process_flags
from mile_jax import train_lib
from mile_jax.data import tokenizer as tokenizer_lib
from mile_jax.evaluation.errors import EvalError
from mile_jax.hf import exporter
from mile_jax.hf import importer
from mile_jax.hf import layout as hf_layout
from mile_jax.hf.layout import HFError
from mile_jax.run import checkpoint as checkpoint_lib
from mile_jax.run import workdir as workdir_lib

DTYPES = exporter.DTYPES
# LlamaConfig's bos_token_id where config.json has none.
LLAMA_BOS_ID = 1


def _require(module: str, command: str):
  try:
    return __import__(module)
  except ImportError:
    raise HFError(f"{command} needs {requirements_check.install_hint(module)}") from None


def export(workdir: str, out: str, step: int | None = None, dtype: str = "float32",
           max_shard_bytes: int = 5 << 30) -> list[str]:
  """Writes the checkpoint at `step` (default latest) of the run at `workdir` as a
  transformers LLaMA directory `out` (which must not exist or be empty), one saved
  array at a time (`exporter`). Returns the files written (none on processes other than 0).

  Raises:
    HFError, EvalError: naming the flag, file or directory to fix.
  """
  _require("tokenizers", "export")
  return exporter.export(workdir, out, step, dtype, max_shard_bytes)


def _starts_with_bos(hf: dict, tokenizer, where: str) -> bool:
  """`data.add_bos` of the model: whether config.json's `bos_token_id` is the SentencePiece model's
  BOS (else its EOS, which also starts documents when `data.add_bos` is off; null: EOS)."""
  bos = hf.get("bos_token_id", LLAMA_BOS_ID)
  if bos is not None and tokenizer.bos_id >= 0 and bos == tokenizer.bos_id:
    return True
  if bos is None or bos == tokenizer.eos_id:
    return False
  raise HFError(f"--hf_dir: {where} has bos_token_id={bos!r}, which is neither BOS ({tokenizer.bos_id}) nor EOS "
                f"({tokenizer.eos_id}) of {tokenizer.model_path or 'the tokenizer'}; the start token cannot be set")


def import_config(hf_dir: str, config=None):
  """`config` (default the base config) with the directory's model settings, `data.add_bos` from its
  `bos_token_id`, and `init.from_hf`; the directory, its weights and its tokenizer checked.

  Raises:
    HFError: naming --hf_dir, the file or the setting to fix.
  """
  try:
    hf = hf_layout.read_config(hf_dir)
  except HFError as e:
    raise HFError(f"--hf_dir: {e}") from None
  where = os.path.join(hf_dir, hf_layout.CONFIG_FILE)
  problems = hf_layout.unsupported(hf)
  if problems:
    raise HFError(f"--hf_dir: {where}: unsupported {'; '.join(problems)}")
  default = config is None
  config = config_lib.base_config() if default else config.copy_and_resolve_references()
  config.model.update(hf_layout.model_fields(hf))
  if default:
    config.data.seq_len = min(config.data.seq_len, config.model.max_seq_len)
  try:
    hf_layout.check_directory(hf_dir, config.model)
  except HFError as e:
    raise HFError(f"--hf_dir: {e}") from None
  tokenizer_path = config.data.tokenizer_path or hf_layout.tokenizer_path(hf_dir)
  if not tokenizer_path:
    raise HFError(f"--hf_dir: {hf_dir} has no {hf_layout.TOKENIZER_FILE}; set --config.data.tokenizer_path to the "
                  "SentencePiece model these weights were trained with")
  try:
    tokenizer = tokenizer_lib.load_tokenizer(tokenizer_path)
  except (OSError, RuntimeError) as e:  # SentencePiece raises RuntimeError for a file that is not its model.
    raise HFError(f"{tokenizer_path}: not a SentencePiece model ({type(e).__name__}); set "
                  "--config.data.tokenizer_path to the SentencePiece model these weights were trained with") from None
  if tokenizer.vocab_size != config.model.vocab_size:
    raise HFError(f"{tokenizer_path} has {tokenizer.vocab_size} pieces but {where} has "
                  f"vocab_size={config.model.vocab_size}")
  config.data.add_bos = _starts_with_bos(hf, tokenizer, where)
  config.init.from_hf = os.path.abspath(hf_dir)
  return config


def import_hf(hf_dir: str, workdir: str, config=None, step: int = 0, echo=print) -> str:
  """Writes the directory's weights as checkpoint `step` of a new run in `workdir`
  (with a fresh optimizer state), plus its config.json and tokenizer.model.
  Returns the checkpoint's path.

  Raises:
    HFError, ConfigError: naming the directory, file or setting to fix.
  """
  if step < 0:
    raise HFError(f"--step: must be >= 0, got {step}")
  config = import_config(hf_dir, config)
  trainer = train_lib.Trainer(config, workdir, echo=echo)
  if trainer.checkpointer.latest_step() is not None:
    raise HFError(f"--workdir: {trainer.workdir} already has checkpoints; choose a new directory")
  config = trainer.config
  tokenizer = tokenizer_lib.load_tokenizer(config.data.tokenizer_path)
  meta = {"data": {"next_batch_step": step, "seed": config.seed},
          "tokenizer": checkpoint_lib.tokenizer_meta(tokenizer.serialized_model())}
  path = importer.write_checkpoint(trainer, hf_dir, step, meta, echo=echo)
  if jax.process_index() == 0:
    workdir_lib.path(trainer.workdir, "config.json").write_text(config.to_json_best_effort(indent=2))
    workdir_lib.path(trainer.workdir, "tokenizer.model").write_bytes(tokenizer.serialized_model())
  return path


_FLAGS: dict[str, Any] = {}


def _define_flags() -> None:
  """The command's flags, defined when it runs: importing this module defines none, so the
  library functions above can be imported beside other commands' flags."""
  if _FLAGS:
    return
  _FLAGS.update(
      workdir=flags.DEFINE_string("workdir", None, "export: the run to export; import: the new run's directory."),
      step=flags.DEFINE_integer("step", None, "export: checkpoint step (default latest); import: the step to "
                                "write the checkpoint at (default 0)."),
      out=flags.DEFINE_string("out", None, "export: the transformers directory to write (new or empty)."),
      dtype=flags.DEFINE_string("dtype", "float32", f"export: dtype of the saved weights: {' or '.join(DTYPES)}."),
      max_shard_mb=flags.DEFINE_float("max_shard_mb", 5120, "export: largest safetensors file (MiB) before "
                                        "the weights are split into shards with an index."),
      hf_dir=flags.DEFINE_string("hf_dir", None, "import: a transformers LLaMA directory (config.json, "
                                 "model.safetensors or its sharded index, tokenizer.model)."),
      config=config_flags.DEFINE_config_file("config", None, "import: a config file for the non-model settings."))
  process_flags.define_flags(__name__)


def main(argv):
  f = types.SimpleNamespace(**{name: holder.value for name, holder in _FLAGS.items()})
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  command = argv[1] if len(argv) > 1 else ""
  try:
    if command == "export" and len(argv) == 2:
      if not f.workdir or not f.out:
        raise HFError("export needs --workdir and --out")
      process_flags.join()
      files = export(f.workdir, f.out, f.step, f.dtype, int(f.max_shard_mb * (1 << 20)))
      if jax.process_index() == 0:  # The one that wrote them.
        print(f"Wrote {os.path.abspath(f.out)}: {', '.join(files)}")
    elif command == "import" and len(argv) == 2:
      if not f.hf_dir or not f.workdir:
        raise HFError("import needs --hf_dir and --workdir")
      process_flags.join()
      path = import_hf(f.hf_dir, f.workdir, f.config, f.step or 0)
      print(f"Wrote {path}")
    else:
      raise HFError(f"usage: python -m mile_jax.hf export|import [flags]; got {' '.join(argv[1:]) or 'nothing'}")
  except HFError as e:
    print(f"HF error: {e}", file=sys.stderr)
    sys.exit(2)
  except EvalError as e:  # Before ConfigError, of which it is a kind.
    print(f"Eval error: {e}", file=sys.stderr)
    sys.exit(2)
  except config_lib.ConfigError as e:
    print(f"Config error: {e}", file=sys.stderr)
    sys.exit(2)


def run():
  """`python -m mile_jax.hf`'s entry point."""
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
