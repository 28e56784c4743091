"""The one-way data flow of DESIGN.md, enforced on imports.

A module of uniap_jax may import only modules above it in the layout table of
STYLE.md; `solver` stays free of jax so that user cost tables solve without it.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "uniap_jax"

# module -> modules of uniap_jax it may import (STYLE.md, section 2).
ALLOWED = {
    "cluster": set(),
    "graph": set(),
    "hlo": set(),
    "supersequence": set(),
    "strategies": {"graph", "cluster"},
    "cost": {"graph", "cluster", "strategies", "hlo", "supersequence"},
    "profile": {"graph", "cluster", "strategies", "cost", "hlo"},
    "solver": set(),
    "plans": {"cluster"},
    "search": {"graph", "cluster", "strategies", "cost", "solver", "plans"},
    "baselines": {"graph", "cluster", "strategies", "cost", "solver", "plans", "search"},
    "apply": {"plans", "cluster", "hlo", "supersequence"},
    "auto": {"graph", "cluster", "strategies", "cost", "solver", "plans", "search", "apply"},
}
JAX_FREE = {"solver", "cluster", "supersequence"}


def _module_files():
  for path in sorted(PACKAGE.rglob("*.py")):
    rel = path.relative_to(PACKAGE)
    if rel.name == "__init__.py" and len(rel.parts) == 1:
      continue
    yield rel.parts[0].removesuffix(".py"), path


def _imports(path: pathlib.Path) -> set[str]:
  """Absolute module names imported by a file; relative imports resolved against its package."""
  package = ["uniap_jax", *path.relative_to(PACKAGE).parent.parts]
  tree = ast.parse(path.read_text())
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package[: len(package) - node.level + 1]
        if node.module:
          names.add(".".join([*base, node.module]))
        else:
          names.update(".".join([*base, a.name]) for a in node.names)
      elif node.module:
        names.add(node.module)
  return names


def test_every_module_is_in_the_layout_table():
  for name, path in _module_files():
    assert name in ALLOWED, f"{path} is not in the layering table of this test; add it."


@pytest.mark.parametrize("name,path", list(_module_files()), ids=lambda x: str(x))
def test_imports_follow_the_data_flow(name, path):
  internal = set()
  for imp in _imports(path):
    if imp.startswith("uniap_jax."):
      internal.add(imp.split(".")[1])
  internal.discard(name)
  # Plan.apply delegates to apply through a function-local import: the one documented
  # backward edge (STYLE.md).
  if name == "plans":
    internal.discard("apply")
  assert internal <= ALLOWED[name], f"{path} imports {sorted(internal - ALLOWED[name])}"


@pytest.mark.parametrize("name", sorted(JAX_FREE))
def test_jax_free_modules(name):
  paths = [p for n, p in _module_files() if n == name]
  for path in paths:
    bad = {i for i in _imports(path) if i.split(".")[0] in ("jax", "flax", "optax")}
    # cluster.from_devices imports jax lazily inside the function; only module level counts.
    if name == "cluster":
      tree = ast.parse(path.read_text())
      bad = set()
      for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
          mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
          bad.update(m for m in mods if m.split(".")[0] in ("jax", "flax", "optax"))
    assert not bad, f"{path} imports {sorted(bad)} but must not"
