"""The prepare step's command line: ``python -m mile_jax.data.prepare --source=... --tokenizer=... --output=...``.

Exit status: 0 when the store is complete, 2 on a setting or input to fix
(one line on stderr naming it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence

from mile_jax.data import prepare
from mile_jax.data import shards as shards_lib
from mile_jax.data.tokenizer import load_tokenizer
from mile_jax.errors import ConfigError


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="mile-prepare", description=prepare.__doc__.split("\n\n")[0])
  parser.add_argument("--source", required=True, help="as data.source: files:<glob>, tfds:<name>, builtin:pydocs")
  parser.add_argument("--tokenizer", required=True, help="a SentencePiece model (local or gs://)")
  parser.add_argument("--output", required=True, help="the store: a local directory or gs://bucket/path")
  parser.add_argument("--add_bos", type=_bool, default=False)
  parser.add_argument("--add_eos", type=_bool, default=True)
  parser.add_argument("--runner", default="local", help="local, pod, or a Beam runner (DirectRunner, ...)")
  parser.add_argument("--workers", type=int, default=0, help="local and pod runners: processes per host (0: one per core)")
  parser.add_argument("--records_per_shard", type=int, default=shards_lib.RECORDS_PER_SHARD,
                      help="tfds: and builtin: sources: records per unit of work")
  parser.add_argument("--bytes_per_shard", type=int, default=shards_lib.BYTES_PER_SHARD,
                      help="files: sources: an uncompressed .jsonl file larger than this is cut into byte ranges "
                      "of this size, each a unit of work; the store is the same whatever it is")
  for field in dataclasses.fields(shards_lib.Inputs):
    if field.name != "source":
      parser.add_argument(f"--{field.name}", type=_bool if field.type == "bool" else type(field.default),
                          default=field.default)
  args, beam_args = parser.parse_known_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  try:
    if beam_args and args.runner in ("local", "pod"):
      raise ConfigError(f"prepare: unknown arguments {beam_args} (pipeline options go with a Beam --runner)")
    inputs = shards_lib.Inputs(source=args.source, **{
        f.name: getattr(args, f.name) for f in dataclasses.fields(shards_lib.Inputs) if f.name != "source"})
    job = prepare.make_job(inputs, load_tokenizer(args.tokenizer), add_bos=args.add_bos, add_eos=args.add_eos,
                           output=args.output, records_per_shard=args.records_per_shard,
                           bytes_per_shard=args.bytes_per_shard)
    if args.runner == "local":
      manifest = prepare.run_local(job, args.workers)
    elif args.runner == "pod":
      import jax  # pylint: disable=import-outside-toplevel

      jax.distributed.initialize()
      manifest = prepare.run_pod(job, args.workers)
    else:
      from mile_jax.data.prepare import beam  # pylint: disable=import-outside-toplevel

      manifest = beam.run_beam(job, [f"--runner={args.runner}", *beam_args])
  except (ConfigError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  logging.info("token store %s: %s", args.output, json.dumps(manifest.splits))
  return 0


def _bool(text: str) -> bool:
  if text.lower() in ("1", "true", "yes"):
    return True
  if text.lower() in ("0", "false", "no"):
    return False
  raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def run():
  """What ``python -m mile_jax.data.prepare`` runs (``mile-prepare`` runs it through ``mile_jax.prepare_cli``)."""
  sys.exit(main())


if __name__ == "__main__":
  run()
