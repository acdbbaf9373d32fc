"""The Apache Beam runner of ``mile_jax.data.prepare``: the same units of work as a Beam pipeline.

Beam is an optional dependency (``pip install -e ".[prepare]"``), imported
only here. The count, encode and assemble stages each run as one pipeline over their
units (reshuffled, so that a distributed runner spreads them); the set-up
between them and the manifest after them run in the launching process, as
the local runner does, so every runner writes the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

from mile_jax.data import prepare, store
from mile_jax.errors import ConfigError


def _run(units: Sequence, fn, job: prepare.Job, pipeline_args: Sequence[str], label: str) -> None:
  import apache_beam as beam  # pylint: disable=import-outside-toplevel
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=import-outside-toplevel

  with beam.Pipeline(options=PipelineOptions(list(pipeline_args))) as pipeline:
    _ = (pipeline | f"{label} units" >> beam.Create(list(units)) | f"{label} spread" >> beam.Reshuffle()
         | label >> beam.Map(lambda unit: fn(job, unit)))


def run_beam(job: prepare.Job, pipeline_args: Sequence[str]) -> store.Manifest:
  """All the stages, the count, encode and assemble stages on Beam; ``pipeline_args`` as Beam's command line."""
  try:
    import apache_beam  # pylint: disable=import-outside-toplevel,unused-import  # noqa: F401
  except ImportError:
    raise ConfigError('prepare: --runner needs Apache Beam: pip install -e ".[prepare]"') from None
  if (manifest := prepare.finished(job)) is not None:
    prepare.remove_parts(job)
    return manifest
  if job.counted:
    _run(job.counted, prepare.count_shard, job, pipeline_args, "count")
  _run(job.shards, prepare.encode_shard, job, pipeline_args, "encode")
  _run(prepare.create_arrays(job), prepare.assemble_unit, job, pipeline_args, "assemble")
  return prepare.finish(job)
