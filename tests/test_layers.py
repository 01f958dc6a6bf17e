"""The import rules of sslm_jax, read from the code itself.

The layer order is written once, in sslm_jax/__init__.py's docstring; these tests read it there
and check every import in sslm_jax/ against it, function-level imports included:
- a module imports only its own package and the layers listed before it;
- no module imports itself back through a cycle;
- only data/ imports TensorFlow, and every module that does not
  reach it through its top-level imports really loads without it;
- a function-level import says why it is one (a comment on its line or the line above);
- no module uses another module's private (`_name`) names.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sslm_jax"
TENSORFLOW = ("tensorflow", "tensorflow_datasets")
# Libraries a module imports inside a function for their cost; the comment says so.
COSTLY = (*TENSORFLOW, "torch", "transformers", "apache_beam", "tensorboardX")


@dataclasses.dataclass(frozen=True)
class Import:
  source: str  # importing module
  target: str  # imported module (sslm_jax's) or top-level library name
  line: int
  in_function: bool
  commented: bool


def modules(package: pathlib.Path) -> dict[str, pathlib.Path]:
  """Dotted module name -> file, for every .py under `package` (a package is its __init__)."""
  found = {}
  for path in sorted(package.rglob("*.py")):
    parts = path.relative_to(package.parent).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    found[".".join(parts)] = path
  return found


def _resolve(name: str, known: dict) -> str:
  """The longest known module prefix of `name` (`pkg.mod.attr` -> `pkg.mod`), else `name`."""
  while name and name not in known:
    name = name.rpartition(".")[0]
  return name


def _function_nodes(tree: ast.Module) -> set[int]:
  inside = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      inside.update(id(n) for n in ast.walk(node) if n is not node)
  return inside


def _commented(lines: list[str], index: int) -> bool:
  """A comment on the import's line, or just above the run of import lines it belongs to."""
  if "#" in lines[index]:
    return True
  index -= 1
  while index >= 0 and lines[index].strip().startswith(("import ", "from ")):
    index -= 1
  return index >= 0 and lines[index].strip().startswith("#")


def imports(package: pathlib.Path) -> list[Import]:
  """Every import statement under `package`, resolved to its modules."""
  known = modules(package)
  root = package.name
  found = []
  for name, path in known.items():
    text = path.read_text()
    lines = text.split("\n")
    tree = ast.parse(text)
    inside = _function_nodes(tree)
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        if node.level:  # relative: resolve against this module's package
          base = name.split(".")[: len(name.split(".")) - node.level + is_package]
          module = ".".join(base + ([node.module] if node.module else []))
        else:
          module = node.module or ""
        targets = [f"{module}.{a.name}" for a in node.names]
      else:
        continue
      commented = _commented(lines, node.lineno - 1)
      for target in targets:
        if target.split(".")[0] == root:
          target = _resolve(target, known)
        else:
          target = target.split(".")[0]
        if target and target != name:
          found.append(Import(name, target, node.lineno, id(node) in inside, commented))
  return found


def layer_order(init: pathlib.Path) -> list[str]:
  """The layers named in the package docstring, lowest first."""
  doc = ast.get_docstring(ast.parse(init.read_text()), clean=False) or ""
  block = doc.partition("Layers, lowest first")[2].split("\n\n")[1]
  return [m.group(1) for m in re.finditer(r"^  ([a-z_]+) {2,}", block, re.M)]


def layer(module: str, order: list[str]) -> int:
  """Index in `order` of a module's package; modules at the package root come last."""
  parts = module.split(".")
  if len(parts) > 1 and parts[1] in order:
    return order.index(parts[1])
  return len(order)


def against_order(found: list[Import], order: list[str]) -> list[str]:
  return sorted(
    f"{i.source}:{i.line} imports {i.target}"
    for i in found
    if i.target.split(".")[0] == i.source.split(".")[0]
    and layer(i.target, order) > layer(i.source, order)
  )


def cycles(found: list[Import]) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan), each sorted."""
  graph: dict[str, set[str]] = {}
  for i in found:
    graph.setdefault(i.source, set())
    if i.target.split(".")[0] == i.source.split(".")[0]:
      graph[i.source].add(i.target)
  index, low, stack, on_stack, result = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
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
        result.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return sorted(result)


@pytest.fixture(scope="module")
def found() -> list[Import]:
  return imports(PACKAGE)


@pytest.fixture(scope="module")
def order() -> list[str]:
  return layer_order(PACKAGE / "__init__.py")


def test_the_layer_order_names_every_package(order):
  packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
  assert len(order) == len(set(order)), order
  assert packages | {"errors"} == set(order), (
    f"sslm_jax/__init__.py's layer list {order} must name each package once: {sorted(packages)}"
  )


def test_no_module_imports_against_the_layer_order(found, order):
  assert against_order(found, order) == []


def test_no_import_cycles(found):
  assert cycles(found) == []


def test_only_data_imports_tensorflow(found):
  importers = {i.source for i in found if i.target in TENSORFLOW}
  stray = sorted(m for m in importers if not m.startswith("sslm_jax.data."))
  assert importers and stray == []


def test_function_level_imports_say_why(found):
  """Kept inside a function only for cost (TensorFlow, torch, a model), and the comment says so;
  an import moved there to dodge a cycle is what the layer order forbids."""
  silent = sorted(
    f"{i.source}:{i.line} {i.target}"
    for i in found
    if i.in_function and not i.commented and (i.target.startswith("sslm_jax") or i.target in COSTLY)
  )
  assert silent == []


def private_uses(package: pathlib.Path) -> list[str]:
  """`module._name` and `from module import _name` across modules of `package`."""
  root = package.name
  found = []
  for name, path in modules(package).items():
    tree = ast.parse(path.read_text())
    aliases = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == root:
        for a in node.names:
          aliases.add(a.asname or a.name)
          if a.name.startswith("_") and not a.name.startswith("__"):
            found.append(f"{name}:{node.lineno} {node.module}.{a.name}")
      elif isinstance(node, ast.Import):
        aliases.update(a.asname or a.name for a in node.names if a.name.split(".")[0] == root)
    for node in ast.walk(tree):
      if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in aliases
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
      ):
        found.append(f"{name}:{node.lineno} {node.value.id}.{node.attr}")
  return sorted(found)


def test_no_private_name_is_used_across_modules():
  assert private_uses(PACKAGE) == []


def _top_level_closure(found: list[Import]) -> dict[str, set[str]]:
  graph: dict[str, set[str]] = {}
  for i in found:
    if not i.in_function:
      graph.setdefault(i.source, set()).add(i.target)
  closure = {}
  for start in graph:
    seen, todo = set(), [start]
    while todo:
      for target in graph.get(todo.pop(), ()):
        if target not in seen:
          seen.add(target)
          todo.append(target)
    closure[start] = seen
  return closure


def test_modules_that_do_not_reach_tensorflow_load_without_it(found, order):
  """Derived from the imports, not a hand list: every module of the layers whose top-level
  imports never reach TensorFlow is imported in one process (the commands define absl flags and
  are left out), and TensorFlow must not have been loaded."""
  closure = _top_level_closure(found)
  free = sorted(
    m
    for m, reached in closure.items()
    if layer(m, order) < len(order) and not reached & set(TENSORFLOW)
  )
  assert "sslm_jax.training.loop" in free and "sslm_jax.inference.language_model" in free
  code = (
    "import sys\n"
    f"for m in {free!r}: __import__(m)\n"
    f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {TENSORFLOW!r})\n"
    "print(bad)\n"
    "sys.exit(1 if bad else 0)\n"
  )
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr


def _write(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
  for name, text in files.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  return root / "pkg"


def test_the_checks_catch_what_they_check(tmp_path):
  pkg = _write(
    tmp_path,
    {
      "pkg/__init__.py": '"""Layers, lowest first:\n\n  low     a\n  high    b\n"""\n',
      "pkg/low/__init__.py": "",
      "pkg/low/a.py": "from pkg.low import b\n",
      "pkg/low/b.py": "def f():\n  from pkg.high import c\n",
      "pkg/high/__init__.py": "",
      "pkg/high/c.py": "from pkg.low import a\nimport tensorflow\na._hidden()\n",
    },
  )
  found = imports(pkg)
  order = layer_order(pkg / "__init__.py")
  assert order == ["low", "high"]
  assert against_order(found, order) == ["pkg.low.b:2 imports pkg.high.c"]
  assert cycles(found) == [["pkg.high.c", "pkg.low.a", "pkg.low.b"]]
  silent = [i for i in found if i.in_function and not i.commented]
  assert [(i.source, i.target) for i in silent] == [("pkg.low.b", "pkg.high.c")]
  assert {i.source for i in found if i.target == "tensorflow"} == {"pkg.high.c"}
  assert private_uses(pkg) == ["pkg.high.c:3 a._hidden"]
