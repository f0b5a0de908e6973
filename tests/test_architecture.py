"""The import graph: the engine stands alone, and no module imports itself in a circle.

Parses every module of the package (the folders ``pyproject.toml`` maps to
import names) with ``ast``, including imports inside functions, and checks:

* ``fedjax_sim/`` (the engine) imports none of ``algorithms/``, ``data/`` or
  ``launch/``: it takes built objects (``fedjax_sim.simulation.simulate``);
  building from a config lives in ``fedjax_sim.launch.experiment``;
* the module graph has no cycle (an algorithm module importing the
  ``fedjax_sim.algorithms`` package that imports it is one).
"""
import ast
import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTSIDE_ENGINE = ("fedjax_sim.algorithms", "fedjax_sim.data", "fedjax_sim.launch")


def _modules() -> dict[str, str]:
  """Import name -> file, for every .py file of every mapped package folder."""
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    package_dir = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
  mods = {}
  for pkg, folder in package_dir.items():
    for name in os.listdir(os.path.join(ROOT, folder)):
      if name.endswith(".py"):
        mods[pkg if name == "__init__.py" else f"{pkg}.{name[:-3]}"] = os.path.join(
            ROOT, folder, name)
  return mods


def import_graph() -> dict[str, set[str]]:
  """Module -> the package modules it imports (anywhere in its body)."""
  mods = _modules()

  def resolve(name: str) -> str:  # the longest module prefix of a dotted name
    while name and name not in mods:
      name = name.rpartition(".")[0]
    return name

  graph = {}
  for mod, path in mods.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    deps = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        deps |= {resolve(a.name) for a in node.names if a.name.startswith("fedjax_sim")}
      elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fedjax_sim"):
        for a in node.names:  # `from pkg import submodule` imports the submodule
          full = f"{node.module}.{a.name}"
          deps.add(full if full in mods else resolve(node.module))
    graph[mod] = deps - {mod, ""}
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def engine_violations(graph: dict[str, set[str]]) -> dict[str, list[str]]:
  """Engine module -> the algorithm / data / launch modules it imports (only non-empty)."""
  out = {m: sorted(d for d in deps if d.startswith(OUTSIDE_ENGINE))
         for m, deps in graph.items() if not m.startswith(OUTSIDE_ENGINE)}
  return {m: d for m, d in out.items() if d}


def test_the_graph_sees_the_package():
  graph = import_graph()
  assert {"fedjax_sim.round", "fedjax_sim.algorithms.fedavg", "fedjax_sim.data.pipeline",
          "fedjax_sim.launch.main"} <= set(graph)
  # Function-local imports count: the CLI imports the experiment builder inside a function.
  assert "fedjax_sim.launch.experiment" in graph["fedjax_sim.launch.main"]


def test_engine_imports_no_algorithm_data_or_launch_module():
  bad = engine_violations(import_graph())
  assert not bad, f"engine modules import outside the engine: {bad}"


def test_no_import_cycles():
  found = cycles(import_graph())
  assert not found, f"import cycles: {found}"


def test_the_checks_can_fail():
  """A planted engine -> launch import is both a violation and a cycle."""
  graph = import_graph()
  assert "fedjax_sim.round" in graph["fedjax_sim.launch.experiment"]
  graph["fedjax_sim.round"] = graph["fedjax_sim.round"] | {"fedjax_sim.launch.experiment"}
  assert engine_violations(graph) == {"fedjax_sim.round": ["fedjax_sim.launch.experiment"]}
  assert any({"fedjax_sim.round", "fedjax_sim.launch.experiment"} <= set(c)
             for c in cycles(graph))
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
