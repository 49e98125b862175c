"""Every example in the library's docstrings runs and prints what it shows."""

import doctest
import importlib

import pytest

MODULES = ['optimizer', 'prox', 'grouping', 'path', 'baselines', 'checkpoint', 'train', 'plots', 'l0', 'constraints', 'weight_gates', 'l0_training',
           'data.pipeline', 'data.datasets']   # models: tests/test_models.py


@pytest.mark.parametrize('name', MODULES)
def test_docstring_examples_run(name):
  module = importlib.import_module(f'dessilbi_jax.{name}')
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0
