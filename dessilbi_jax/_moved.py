"""Old import paths of modules that moved into the layer folders, kept for one release.

``import dessilbi_jax.optimizer`` (and ``from dessilbi_jax import optimizer``)
still gives :mod:`dessilbi_jax.core.optimizer`, with a ``DeprecationWarning``
naming the new path. Nothing imports a module before it is asked for.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    'dessilbi_jax.grouping': 'dessilbi_jax.core.grouping',
    'dessilbi_jax.prox': 'dessilbi_jax.core.prox',
    'dessilbi_jax.optimizer': 'dessilbi_jax.core.optimizer',
    'dessilbi_jax.cpu_schedule': 'dessilbi_jax.core.cpu_schedule',
    'dessilbi_jax.target_density': 'dessilbi_jax.core.target_density',
    'dessilbi_jax.path': 'dessilbi_jax.core.path',
    'dessilbi_jax.constraints': 'dessilbi_jax.l0.constraints',
    'dessilbi_jax.weight_gates': 'dessilbi_jax.l0.weight_gates',
    'dessilbi_jax.unit_gates': 'dessilbi_jax.l0.unit_gates',
    'dessilbi_jax.checkpoint': 'dessilbi_jax.train.checkpoint',
    'dessilbi_jax.plots': 'dessilbi_jax.train.plots',
    'dessilbi_jax.structure.compact': 'dessilbi_jax.train.compact',
}


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Finds an old module name and hands back the module at its new place."""

  def __init__(self):
    self._specs = {}

  def find_spec(self, name, path=None, target=None):
    del path, target
    if name not in MOVED:
      return None
    return importlib.util.spec_from_loader(name, self)

  def create_module(self, spec):
    new = MOVED[spec.name]
    warnings.warn(f'{spec.name} moved to {new}; import it from there (the old path goes in the next release)',
                  DeprecationWarning, stacklevel=3)
    module = importlib.import_module(new)
    self._specs[spec.name] = module.__spec__
    return module

  def exec_module(self, module):
    # The import system stamped the old name's spec on the module; give it back its own.
    module.__spec__ = self._specs.pop(module.__spec__.name, module.__spec__)


def install() -> None:
  if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
    sys.meta_path.append(_MovedFinder())
