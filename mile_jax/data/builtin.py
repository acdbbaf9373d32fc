"""The built-in offline corpus ``builtin:pydocs``.

English prose that every Python installation carries, so that training and
tests need no download: the docstrings of the standard-library modules and
the pydoc help topics. Modules are read with :mod:`ast` and never imported,
because importing some of them has side effects (``antigravity`` opens a
browser, ``this`` prints).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import sysconfig
from collections.abc import Sequence

Document = tuple[str, str]  # (document id, text)

# Directory names under the stdlib root that hold no standard-library prose
# worth training on, or are not part of the standard library at all.
_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
)
MIN_DOCUMENT_CHARS = 200


def _module_name(root: str, path: str) -> str:
  """Dotted module name of ``path`` relative to the stdlib ``root``."""
  rel = os.path.relpath(path, root)[: -len(".py")]
  parts = rel.split(os.sep)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _definitions(node: ast.AST):
  """Modules, classes and functions under ``node``, in source order.

  Expressions are not descended into: they hold no docstrings and make up
  most of the tree, so skipping them saves most of the walk.
  """
  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
    yield node
  for child in ast.iter_child_nodes(node):
    if not isinstance(child, ast.expr):
      yield from _definitions(child)


def _docstrings(source: str) -> list[str]:
  """Docstrings of a module's source, module first, then in source order."""
  out = []
  for node in _definitions(ast.parse(source)):
    doc = ast.get_docstring(node, clean=True)
    if doc and doc.strip():
      out.append(doc.strip())
  return out


def _module_documents(root: str) -> list[Document]:
  """One document per stdlib module: its docstrings joined by blank lines."""
  docs = []
  for dirpath, dirnames, filenames in os.walk(root):
    # Package directories are identifiers; this also skips things like
    # ``config-3.11-x86_64-linux-gnu`` and ``site-packages``.
    dirnames[:] = sorted(
        d for d in dirnames if d not in _SKIP_DIRS and d.isidentifier()
    )
    for filename in sorted(filenames):
      if not filename.endswith(".py") or not filename[:-3].isidentifier():
        continue
      path = os.path.join(dirpath, filename)
      try:
        with open(path, "rb") as f:
          strings = _docstrings(f.read().decode("utf-8"))
      except (SyntaxError, UnicodeDecodeError, ValueError):
        continue  # a file this interpreter cannot parse holds no usable prose
      docs.append((_module_name(root, path), "\n\n".join(strings)))
  return docs


def _topic_documents() -> list[Document]:
  """One document per pydoc help topic (``help('FORMATTING')`` and so on)."""
  # Safe to import: a data-only module.
  from pydoc_data.topics import topics

  return [(f"topic:{name}", topics[name].strip()) for name in sorted(topics)]


@functools.cache
def _pydocs_documents_cached() -> tuple[Document, ...]:
  root = sysconfig.get_paths()["stdlib"]
  docs = _module_documents(root) + _topic_documents()
  docs = [(i, t) for i, t in docs if len(t) >= MIN_DOCUMENT_CHARS]
  docs.sort(key=lambda d: d[0])
  return tuple(docs)


def pydocs_documents() -> list[Document]:
  """The ``builtin:pydocs`` corpus as ``(id, text)`` pairs, sorted by id.

  Module documents are named by their dotted module name (``json.decoder``),
  topic documents ``topic:<name>``. Documents shorter than
  ``MIN_DOCUMENT_CHARS`` characters are dropped. The result is deterministic
  for a given Python installation and cached for the life of the process.
  """
  return list(_pydocs_documents_cached())


def _unit_hash(doc_id: str) -> float:
  """A stable number in [0, 1) from a document id (same on every run)."""
  digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def split_documents(
    docs: Sequence[Document], val_fraction: float
) -> tuple[list[Document], list[Document]]:
  """Hold out documents for validation by a stable hash of their id.

  A document goes to validation when the hash of its id falls below
  ``val_fraction``, so the assignment of a document never depends on which
  other documents are present or their order. Order within each split is
  the input order.

  Returns:
    ``(train_docs, val_docs)``.
  """
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
  train, val = [], []
  for doc in docs:
    (val if _unit_hash(doc[0]) < val_fraction else train).append(doc)
  return train, val
