"""Data: corpora, tokenizer, packing into batches, prefetching."""

from mile_jax.data.builtin import pydocs_documents
from mile_jax.data.corpus import Corpus, load_corpus
from mile_jax.data.mixture import MixedDataset
from mile_jax.data.packing import PackedDataset
from mile_jax.data.pipeline import DataSplits, make_data
from mile_jax.data.prefetch import Prefetcher
from mile_jax.data.tokenizer import Tokenizer

__all__ = [
    "Corpus",
    "DataSplits",
    "MixedDataset",
    "PackedDataset",
    "Prefetcher",
    "Tokenizer",
    "load_corpus",
    "make_data",
    "pydocs_documents",
]
