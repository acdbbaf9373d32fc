"""Data: corpora, tokenizer, packing into batches, prefetching."""

from mile_jax.data.builtin import pydocs_documents
from mile_jax.data.packing import PackedDataset
from mile_jax.data.pipeline import DataSplits, Prefetcher, make_data
from mile_jax.data.tokenizer import Tokenizer

__all__ = [
    "DataSplits",
    "PackedDataset",
    "Prefetcher",
    "Tokenizer",
    "make_data",
    "pydocs_documents",
]
