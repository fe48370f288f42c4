"""Structure rules of the package, checked on the source (ast), so that they stay true:

- no import circle inside hybrid_jax: no module imports, at any level (function-level imports
  count), a module that imports it back, directly or through a chain;
- tests/ and benchmarks/ use only public names of hybrid_jax modules (no `module._private`).

Run by hand: python -m pytest -q tests/test_code_structure.py
"""

import ast
import os
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "hybrid_jax"


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(REPO).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _package_modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in (REPO / PACKAGE).rglob("*.py")}


def _imported_modules(path: pathlib.Path, modules: set[str]) -> set[str]:
  """hybrid_jax modules that `path` imports anywhere in its body (`from a import b` counts as
  a.b when that is a module, else as a)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith(PACKAGE):
          found.add(alias.name)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and (
        node.module.startswith(PACKAGE)):
      for alias in node.names:
        candidate = f"{node.module}.{alias.name}"
        found.add(candidate if candidate in modules else node.module)
  return {m for m in found if m in modules}


def _import_graph() -> dict[str, set[str]]:
  modules = _package_modules()
  names = set(modules)
  # A package's __init__ importing nothing is the common case; importing `hybrid_jax.x.y` also
  # runs hybrid_jax/x/__init__.py, which is not an edge of interest unless that file imports.
  return {name: _imported_modules(path, names) - {name} for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One cycle per strongly connected component with more than one module (Tarjan)."""
  index, low, on_stack, stack, out = {}, {}, set(), [], []
  counter = [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_cycle_finder_finds_a_planted_cycle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
  assert _cycles(graph) == [["a", "b", "c"]]
  assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_inside_the_package():
  graph = _import_graph()
  assert len(graph) > 40 and graph["hybrid_jax.trainer"], "the graph was not read"
  cycles = _cycles(graph)
  details = [" <-> ".join(c) + ": " + "; ".join(f"{m} imports {sorted(graph[m] & set(c))}"
                                                for m in c) for c in cycles]
  assert not cycles, "import circles:\n" + "\n".join(details)


def _private_uses(path: pathlib.Path, modules: set[str]) -> list[str]:
  """`alias._name` where alias is a hybrid_jax module imported in `path`."""
  tree = ast.parse(path.read_text(), str(path))
  aliases = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE):
      for alias in node.names:
        if alias.name.startswith("_"):
          aliases.setdefault("<from-import>", []).append(f"{node.module}.{alias.name}")
        if f"{node.module}.{alias.name}" in modules:
          aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name in modules and alias.asname:
          aliases[alias.asname] = alias.name
  found = [f"{path.relative_to(REPO)}: from-import of {name}"
           for name in aliases.pop("<from-import>", [])]
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in aliases and node.attr.startswith("_")
        and not node.attr.startswith("__")):
      found.append(f"{path.relative_to(REPO)}:{node.lineno}: {aliases[node.value.id]}.{node.attr}")
  return found


def test_tests_and_benchmarks_use_no_private_names_of_other_modules():
  modules = set(_package_modules())
  files = [p for d in ("tests", "benchmarks") for p in (REPO / d).rglob("*.py")]
  assert len(files) > 30
  found = [use for p in files for use in _private_uses(p, modules)]
  assert not found, "private names used from outside their module:\n" + "\n".join(found)


def test_private_name_finder_sees_a_planted_use(tmp_path):
  planted = REPO / "tests" / f"_planted_{os.getpid()}.py"
  planted.write_text("from hybrid_jax import losses\nx = losses._to_chunks\n")
  try:
    assert _private_uses(planted, set(_package_modules())) == [
        f"tests/{planted.name}:2: hybrid_jax.losses._to_chunks"]
  finally:
    planted.unlink()


def test_modules_the_tests_import_live_in_one_process():
  """Command-line modules define absl flags at import; two that define the same name cannot live
  in one process, and pytest imports every module any test imports into one: import them all."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  package = set(_package_modules())
  imported = set()
  for path in (REPO / "tests").rglob("*.py"):
    imported |= _imported_modules(path, package)
  code = "import importlib, sys\nfor m in sys.argv[1:]:\n  importlib.import_module(m)\n"
  result = subprocess.run([sys.executable, "-c", code, *sorted(imported)], cwd=REPO,
                          capture_output=True, text=True, check=False, timeout=300)
  assert len(imported) > 30 and result.returncode == 0, result.stderr[-2000:]
