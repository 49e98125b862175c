"""The package's layers: imports run one way, from a higher layer to a lower one, and never in a cycle.

Read from the source with ``ast`` (no module is imported), every import
counted, inside functions too, except those under ``if TYPE_CHECKING:``.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'dessilbi_jax'

# Lower number, lower layer; a module may import its own layer and those below it.
LAYERS = {
    'core': 0, 'models': 0, 'data': 0,
    'baselines': 1,
    'structure': 2,
    'l0': 3,
    'train': 4,
    'growth': 5,
    'cli': 6, '__main__': 6,
}
FACADE = 'dessilbi_jax'          # the top __init__: dl.dessilbi, dl.support, ...
EXEMPT = {'dessilbi_jax._moved'}  # the old import paths (imports nothing at import time)


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _is_type_checking(node) -> bool:
  return isinstance(node, ast.If) and 'TYPE_CHECKING' in ast.unparse(node.test)


def _imports(path: pathlib.Path, known: set[str]) -> set[str]:
  """The modules of the package that ``path`` imports (a ``from X import name`` of a submodule counts it)."""
  tree = ast.parse(path.read_text())
  found = set()

  def visit(node):
    if _is_type_checking(node):
      return
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.split('.')[0] == FACADE)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split('.')[0] == FACADE:
      for alias in node.names:
        sub = f'{node.module}.{alias.name}'
        found.add(sub if sub in known else node.module)
    for child in ast.iter_child_nodes(node):
      visit(child)

  visit(tree)
  return found


def _graph():
  files = {_module_name(p): p for p in PACKAGE.rglob('*.py')}
  return {name: _imports(path, set(files)) - {name} for name, path in files.items()}


def _layer(module: str):
  if module == FACADE:
    return None
  return LAYERS[module.split('.')[1]]


def test_every_module_has_a_layer():
  unknown = sorted(m for m in _graph() if m != FACADE and m not in EXEMPT and m.split('.')[1] not in LAYERS)
  assert not unknown, f'modules outside every layer (add their folder to LAYERS): {unknown}'


def test_no_upward_import():
  graph = _graph()
  facade_layer = max(_layer(m) for m in graph[FACADE] if m not in EXEMPT)
  upward = []
  for module, imported in graph.items():
    if module == FACADE or module in EXEMPT:
      continue
    for target in imported:
      if target in EXEMPT:
        upward.append((module, target))
        continue
      target_layer = facade_layer if target == FACADE else _layer(target)
      if target_layer > _layer(module):
        upward.append((module, target))
  assert not upward, f'imports from a lower layer to a higher one: {sorted(upward)}'


def test_no_import_cycle():
  graph = _graph()
  # A package's __init__ imports its own modules; a module importing its package's __init__
  # (``from dessilbi_jax import train`` inside dessilbi_jax/train/) closes a cycle, and is caught.
  cycles = []
  state = {}

  def visit(node, stack):
    state[node] = 'open'
    for nxt in sorted(graph.get(node, ())):
      if nxt not in graph:
        continue
      if state.get(nxt) == 'open':
        cycles.append(stack[stack.index(nxt):] + [nxt])
      elif nxt not in state:
        visit(nxt, stack + [nxt])
    state[node] = 'done'

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])
  assert not cycles, 'import cycles:\n' + '\n'.join(' -> '.join(c) for c in cycles)


def test_the_check_sees_an_upward_import(tmp_path):
  """The checker itself: a lower-layer file importing a higher layer is reported."""
  fake = tmp_path / 'dessilbi_jax' / 'core'
  fake.mkdir(parents=True)
  (fake / 'bad.py').write_text('def f():\n  from dessilbi_jax import train\n')
  assert _imports(fake / 'bad.py', set()) == {'dessilbi_jax'}
  (fake / 'bad.py').write_text('from dessilbi_jax.train import loop\n')
  assert _imports(fake / 'bad.py', {'dessilbi_jax.train.loop'}) == {'dessilbi_jax.train.loop'}
  (fake / 'ok.py').write_text('from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n  from dessilbi_jax import train\n')
  assert _imports(fake / 'ok.py', set()) == set()


@pytest.mark.parametrize('old,new', [('optimizer', 'core.optimizer'), ('checkpoint', 'train.checkpoint'),
                                     ('unit_gates', 'l0.unit_gates')])
def test_old_import_paths_still_work(old, new):
  import importlib
  import sys
  import warnings
  sys.modules.pop(f'dessilbi_jax.{old}', None)   # imported before in this process: import it afresh
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    module = importlib.import_module(f'dessilbi_jax.{old}')
  assert module is importlib.import_module(f'dessilbi_jax.{new}')
  assert module.__spec__.name == f'dessilbi_jax.{new}'
  assert any(f'dessilbi_jax.{new}' in str(w.message) for w in caught if issubclass(w.category, DeprecationWarning))
