"""Every example in the library's docstrings runs and prints what it shows."""

import doctest
import importlib
import pkgutil

import pytest

import dessilbi_jax

# Every module of the package; models' examples run in tests/test_models.py.
MODULES = sorted(m.name for m in pkgutil.walk_packages(dessilbi_jax.__path__, 'dessilbi_jax.')
                 if m.name not in ('dessilbi_jax.models.networks', 'dessilbi_jax.__main__'))
# Modules whose docstrings must show an example (the public entry points).
MUST_HAVE_EXAMPLES = {'dessilbi_jax.core.optimizer', 'dessilbi_jax.core.prox', 'dessilbi_jax.core.grouping', 'dessilbi_jax.core.path',
                      'dessilbi_jax.baselines.gmp', 'dessilbi_jax.train.checkpoint', 'dessilbi_jax.train',
                      'dessilbi_jax.train.config', 'dessilbi_jax.train.plots', 'dessilbi_jax.data.pipeline',
                      'dessilbi_jax.data.datasets', 'dessilbi_jax.structure.unit_map', 'dessilbi_jax.structure.trace',
                      'dessilbi_jax.structure.surgery', 'dessilbi_jax.structure.count',
                      'dessilbi_jax.growth.rule', 'dessilbi_jax.core.target_density'}


def test_every_listed_module_exists():
  assert MUST_HAVE_EXAMPLES <= set(MODULES), sorted(MUST_HAVE_EXAMPLES - set(MODULES))


@pytest.mark.parametrize('name', MODULES)
def test_docstring_examples_run(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0
  if name in MUST_HAVE_EXAMPLES:
    assert result.attempted > 0
