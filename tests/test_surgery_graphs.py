"""Surgery on graphs users write: the keep rule, units whose zero output is not zero, any traced model out.

Each case compares the removed network's logits with the masked network's
(the weights times their masks, or :func:`structure.zero`): equal to 1e-5
relative, or the library refuses with the op named.
"""

import os
import subprocess
import sys
import textwrap
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dessilbi_jax import models
from dessilbi_jax import structure

pytestmark = pytest.mark.usefixtures('rbg_keys')   # conftest.py: fast init of the large models


def _close(a, b, rtol=1e-5):
  a, b = np.asarray(a), np.asarray(b)
  scale = max(float(np.max(np.abs(b))), 1.0)
  assert np.max(np.abs(a - b)) <= rtol * scale, f'max |difference| {np.max(np.abs(a - b))} at scale {scale}'


def _masked_weights(variables, weight_masks):
  params = jax.tree.map(lambda w, m: w if m is None else w * m, variables['params'], weight_masks,
                        is_leaf=lambda m: m is None)
  return {**variables, 'params': params}


def _all_weights(variables):
  return jax.tree.map(lambda w: np.ones(np.shape(w), bool), variables['params'])


# -- 1. the keep rule: a unit is dead only when no live layer reads it ----------------------------

class TwoHeads(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    h = nn.relu(nn.Dense(6)(x))
    return jnp.concatenate([nn.Dense(3)(h), nn.Dense(2)(h)], axis=-1)


def test_a_layer_read_by_one_of_two_heads_is_kept():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 4)), jnp.float32)
  model = TwoHeads()
  variables = model.init(jax.random.key(0), x)
  unit_map = structure.trace(model, variables, x)
  weight_masks = _all_weights(variables)
  weight_masks['Dense_2']['kernel'][:] = False                     # the second head reads nothing
  weight_masks['Dense_1']['kernel'][4, :] = False                  # unit 4: read by neither head
  keep = structure.keep_from_weights(unit_map, weight_masks)
  np.testing.assert_array_equal(keep['Dense_0'], np.arange(6) != 4)
  masked = _masked_weights(variables, weight_masks)
  small, small_vars, _ = structure.remove(model, masked, unit_map, keep)
  assert small_vars['params']['Dense_1']['kernel'].shape == (5, 3)
  _close(small.apply(small_vars, x), model.apply(masked, x))


def test_a_chain_whose_reader_is_dead_dies_with_it():
  """Dense_1's outputs are read by nobody: Dense_1 reads nothing, so Dense_0 feeds nothing either."""

  class Chain(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.Dense(4)(x))
      h = nn.relu(nn.Dense(3)(h))
      return nn.Dense(2)(h) + nn.Dense(2)(x)

  x = jnp.ones((2, 5))
  model = Chain()
  variables = model.init(jax.random.key(0), x)
  unit_map = structure.trace(model, variables, x)
  weight_masks = _all_weights(variables)
  weight_masks['Dense_2']['kernel'][:] = False
  keep = structure.keep_from_weights(unit_map, weight_masks)
  assert not keep['Dense_1'].any() and not keep['Dense_0'].any()


def test_resnet20_with_one_block_out_of_the_support_keeps_the_stream_and_drops_the_block():
  model = models.get_model('resnet20', 10, (8, 8, 3))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 8, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), x)
  unit_map = structure.trace(model, variables, x)
  support = jax.tree.map(lambda w: np.ones(np.shape(w), bool) if np.ndim(w) > 1 else None, variables['params'])
  support['BasicBlock_1']['Conv_0']['kernel'][:] = False
  keep = structure.keep_from_weights(unit_map, support)
  small, small_vars, _ = structure.remove(model, variables, unit_map, keep)
  assert small.widths == (16, 32, 64)
  assert small.block_widths[1] == 0 and all(w > 0 for i, w in enumerate(small.block_widths) if i != 1)
  dense = models.count_params(variables['params'])
  block = sum(int(np.size(a)) for a in jax.tree.leaves(variables['params']['BasicBlock_1']))
  assert models.count_params(small_vars['params']) == dense - block
  masked = structure.zero(variables, unit_map, keep)
  _close(small.apply(small_vars, x, train=False), model.apply(masked, x, train=False))
