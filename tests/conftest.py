"""Shared fixtures."""

import jax
import pytest


@pytest.fixture(scope='module')
def rbg_keys():
  """'rbg' PRNG keys for a module: threefry takes ~9 s to compile ResNet-20's init on a 2-core CPU, 'rbg' ~2 s."""
  previous = jax.config.jax_default_prng_impl
  jax.config.update('jax_default_prng_impl', 'rbg')
  yield
  jax.config.update('jax_default_prng_impl', previous)
