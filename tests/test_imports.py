"""Dependencies inside mile_jax point one way: no module imports, directly or
through others, a module that imports it, and no layer imports one above it
(read from the source, nothing is imported)."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "mile_jax"


def _modules() -> dict[str, str]:
  """{dotted name: file} of every module and package of mile_jax."""
  out = {}
  for directory, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
    for name in files:
      if name.endswith(".py"):
        dotted = os.path.relpath(os.path.join(directory, name), ROOT)[:-3].replace(os.sep, ".")
        out[dotted.removesuffix(".__init__")] = os.path.join(directory, name)
  return out


def import_graph() -> dict[str, set[str]]:
  """{module: modules it imports}, at any depth of its code (function bodies too).

  Importing `a.b.c` also runs the packages `a.b` and `a` first, except those
  that hold the importing module (they are already running).
  """
  modules = _modules()
  graph = {m: set() for m in modules}
  for module, path in modules.items():
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
          base = f"{parent}.{base}" if base else parent
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
      else:
        continue
      for name in names:
        while name and name not in modules:
          name = name.rpartition(".")[0]
        while name.startswith(PACKAGE) and name != module:
          if not (module == name or module.startswith(name + ".")):
            graph[module].add(name)
          name = name.rpartition(".")[0]
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """A list of modules each importing the next and the last the first, or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node):
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        return path[path.index(nxt):]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_the_checker_finds_a_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c"]
  assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles_in_mile_jax():
  graph = import_graph()
  assert "mile_jax.data.corpus" in graph["mile_jax.config_lib"]  # the graph sees imports at all
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) + find_cycle(graph)[:1])


def test_the_error_type_is_at_the_bottom():
  graph = import_graph()
  assert graph["mile_jax.errors"] == set()
  for module in ("mile_jax.data.corpus", "mile_jax.data.packing", "mile_jax.data.pipeline",
                 "mile_jax.data.text_files", "mile_jax.data.tfds_sources", "mile_jax.data.tokenizer",
                 "mile_jax.config_lib"):
    assert "mile_jax.errors" in graph[module], module


# The layers of mile_jax, lowest first. A module may import modules of lower tiers and of its own
# group; two groups of one tier are independent of each other. A name stands for a module and,
# if it is a package, everything in it (the longest name that matches decides).
LAYERS = [
    {"the error type": ["mile_jax.errors"],
     "the check for missing packages": ["mile_jax.requirements_check"]},
    {"the method and the step": ["mile_jax.core"],
     "data": ["mile_jax.data"]},
    {"Hugging Face formats": ["mile_jax.hf.layout", "mile_jax.hf.safetensors_io", "mile_jax.hf.tokenizer",
                              "mile_jax.hf.saved_arrays"]},
    {"the config": ["mile_jax.config_lib", "mile_jax.config_files"]},
    {"what keeps a run alive": ["mile_jax.run"]},
    {"evaluation": ["mile_jax.evaluation"]},
    {"the training loop": ["mile_jax.train_lib"]},
    {"command-line programs": ["mile_jax.train_cli", "mile_jax.eval_cli", "mile_jax.plan", "mile_jax.eval_plan",
                               "mile_jax.process_flags",
                               "mile_jax.hf.convert", "mile_jax.hf.exporter", "mile_jax.hf.importer",
                               "mile_jax.hf.__main__",
                               "mile_jax.generate", "mile_jax.prepare_cli"],
     "experiments": ["mile_jax.experiments"]},
]
# Packages whose __init__ imports nothing of mile_jax: importing one of their modules runs them,
# so they belong to no layer.
NAMESPACES = {"mile_jax", "mile_jax.core", "mile_jax.run", "mile_jax.hf"}


def layer_of(module: str, layers=LAYERS) -> tuple[int, str] | None:
  """(tier, group) of a module by the longest matching name in `layers`, or None."""
  best = None
  for tier, groups in enumerate(layers):
    for group, names in groups.items():
      for name in names:
        if (module == name or module.startswith(name + ".")) and (best is None or len(name) > best[0]):
          best = (len(name), tier, group)
  return best and best[1:]


def upward_imports(graph: dict[str, set[str]], layers=LAYERS) -> list[str]:
  """'a (group) imports b (group)' for every import that is not of a lower tier or the same group."""
  out = []
  for module, imported in sorted(graph.items()):
    if module in NAMESPACES:
      continue
    tier, group = layer_of(module, layers)
    for other in sorted(imported - NAMESPACES):
      other_tier, other_group = layer_of(other, layers)
      if other_tier > tier or (other_tier == tier and other_group != group):
        out.append(f"{module} ({group}) imports {other} ({other_group})")
  return out


def test_every_module_has_a_layer_and_namespaces_import_nothing():
  graph = import_graph()
  assert [m for m in graph if m not in NAMESPACES and layer_of(m) is None] == []
  assert {m: graph[m] for m in NAMESPACES} == {m: set() for m in NAMESPACES}


def test_the_layer_checker_sees_an_upward_import():
  graph = import_graph()
  graph["mile_jax.core.losses"] = graph["mile_jax.core.losses"] | {"mile_jax.run.checkpoint"}
  graph["mile_jax.data.packing"] = graph["mile_jax.data.packing"] | {"mile_jax.core.model"}
  assert upward_imports(graph) == [
      "mile_jax.core.losses (the method and the step) imports mile_jax.run.checkpoint (what keeps a run alive)",
      "mile_jax.data.packing (data) imports mile_jax.core.model (the method and the step)"]


def test_no_layer_imports_a_higher_one():
  assert upward_imports(import_graph()) == []
