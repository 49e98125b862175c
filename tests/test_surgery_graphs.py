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


# -- 3. any traced model is removed, saved and loaded without its class -----------------------

_USER_MODULE = '''
import flax.linen as nn
import jax.numpy as jnp


class ResNetish(nn.Module):
  """A user's net: a residual add, BatchNorm, a strided conv, a flatten and two dense layers."""
  width: int = 6

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(self.width, (3, 3), use_bias=False)(x)))
    h = nn.relu(nn.Conv(self.width, (3, 3))(x))
    x = nn.relu(x + nn.Conv(self.width, (3, 3))(h))
    x = nn.relu(nn.Conv(2 * self.width, (3, 3), strides=2)(x))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(3)(nn.relu(nn.Dense(7)(x)))
'''


def _import_user_module(tmp_path, name='user_resnetish'):
  (tmp_path / f'{name}.py').write_text(_USER_MODULE)
  sys.path.insert(0, str(tmp_path))
  try:
    module = __import__(name)
  finally:
    sys.path.remove(str(tmp_path))
  sys.modules.pop(name, None)
  return module


def test_a_users_model_goes_trace_remove_save_and_loads_without_its_module(tmp_path):
  user = _import_user_module(tmp_path / '.')
  model = user.ResNetish()
  x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 8, 8, 1)), jnp.float32)
  variables = model.init(jax.random.key(0), x)
  unit_map = structure.trace(model, variables, x)
  rng = np.random.default_rng(3)
  keep = {g.name: rng.random(g.size) < 0.6 for g in unit_map.prunable()}
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', UserWarning)
    small, small_vars, _ = structure.remove(model, variables, unit_map, keep)
    masked = structure.zero(variables, unit_map, keep)
  assert models.count_params(small_vars['params']) < models.count_params(variables['params'])
  logits = small.apply(small_vars, x, train=False)
  _close(logits, model.apply(masked, x, train=False))
  structure.save_compact(tmp_path / 'compact', small, small_vars, input_shape=(8, 8, 1))
  np.save(tmp_path / 'x.npy', np.asarray(x))
  np.save(tmp_path / 'logits.npy', np.asarray(logits))
  (tmp_path / 'user_resnetish.py').unlink()               # the user's class is gone
  script = textwrap.dedent(f'''
      import numpy as np
      from dessilbi_jax import structure
      model, variables = structure.load_compact({str(tmp_path / 'compact')!r})
      x = np.load({str(tmp_path / 'x.npy')!r})
      out = np.asarray(model.apply(variables, x, train=False))
      np.testing.assert_array_equal(out, np.load({str(tmp_path / 'logits.npy')!r}))
      assert model.apply(variables, np.concatenate([x, x]), train=False).shape == (6, 3)
      print('ok')
  ''')
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, timeout=300)
  assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr[-2000:]


def test_a_damaged_exported_model_is_named_in_one_line(tmp_path):
  class Small(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2)(nn.relu(nn.Dense(3)(x)))

  x = jnp.ones((2, 4))
  variables = Small().init(jax.random.key(0), x)
  directory = tmp_path / 'compact'
  description = structure.save_compact(directory, Small(), variables, input_shape=(4,))
  assert description['model'] is None and description['output_shape'] == [2]
  loaded, loaded_vars = structure.load_compact(directory)
  np.testing.assert_array_equal(loaded.apply(loaded_vars, x), Small().apply(variables, x))
  with pytest.raises(ValueError, match='eval mode only'):
    loaded.apply(loaded_vars, x, train=True)
  program = directory / 'apply.jaxexport'
  blob = bytearray(program.read_bytes())
  blob[len(blob) // 2] ^= 0xFF
  program.write_bytes(bytes(blob))
  with pytest.raises(ValueError, match=r'apply.jaxexport differs from what was saved') as info:
    structure.load_compact(directory)
  assert '\n' not in str(info.value)
  program.unlink()
  with pytest.raises(ValueError, match=r'apply.jaxexport \(the exported program\) is missing'):
    structure.load_compact(directory)


# -- 2. units whose zero output is not zero: folded into the readers' biases, or refused ----------

class Activated(nn.Module):
  activation: str = 'sigmoid'

  @nn.compact
  def __call__(self, x, train=False):
    act = {'sigmoid': nn.sigmoid, 'softplus': nn.softplus, 'relu_plus_one': lambda h: nn.relu(h + 1.0),
           'relu': nn.relu, 'gelu': nn.gelu, 'tanh': jnp.tanh, 'elu': nn.elu}[self.activation]
    h = act(nn.Conv(5, (3, 3), padding='VALID')(x))
    h = act(nn.BatchNorm(use_running_average=not train)(nn.Conv(6, (3, 3), padding='VALID', use_bias=False)(h)))
    h = act(nn.Dense(7)(h.reshape((h.shape[0], -1))))
    return nn.Dense(3)(h)


@pytest.mark.parametrize('activation', ['sigmoid', 'softplus', 'relu_plus_one', 'relu', 'gelu', 'tanh', 'elu'])
def test_removed_units_that_emit_a_constant_are_folded_exactly(activation):
  model = Activated(activation)
  x = jnp.asarray(np.random.default_rng(4).normal(size=(3, 8, 8, 2)), jnp.float32)
  variables = model.init(jax.random.key(1), x)
  variables = jax.tree.map(lambda a: a + 0.3 if a.ndim == 1 else a, variables)  # non-zero biases, means, vars
  unit_map = structure.trace(model, variables, x)
  keep = {'Conv_0': np.arange(5) % 2 == 0, 'Conv_1': np.arange(6) < 4, 'Dense_0': np.arange(7) % 3 != 1}
  small, small_vars, _ = structure.remove(model, variables, unit_map, keep)
  _close(small.apply(small_vars, x, train=False), model.apply(structure.zero(variables, unit_map, keep), x,
                                                               train=False))


def test_a_constant_a_padded_conv_would_read_is_refused_with_the_op_named():
  class PaddedSigmoid(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.sigmoid(nn.Conv(4, (3, 3))(x))
      return nn.Dense(2)(nn.Conv(3, (3, 3))(h).mean(axis=(1, 2)))

  model = PaddedSigmoid()
  x = jnp.ones((1, 6, 6, 1))
  variables = model.init(jax.random.key(0), x)
  unit_map = structure.trace(model, variables, x)
  with pytest.raises(structure.InexactRemovalError, match=r'`logistic` at .*test_surgery_graphs.py:\d+.*Conv_1, '
                                                          r'a zero-padded convolution'):
    structure.remove(model, variables, unit_map, {'Conv_0': np.arange(4) != 2})


# -- 4. depthwise convolutions, channel slices and splits, nn.Sequential ----------------------

class MobileBlock(nn.Module):
  """MobileNet's inverted residual: expand (1x1) -> depthwise 3x3 -> project (1x1), BatchNorm and ReLU6."""

  @nn.compact
  def __call__(self, x, train=False):
    norm = lambda h: nn.BatchNorm(use_running_average=not train)(h)
    h = nn.relu6(norm(nn.Conv(8, (1, 1), use_bias=False)(x)))
    h = nn.relu6(norm(nn.Conv(8, (3, 3), feature_group_count=8, use_bias=False)(h)))
    x = x + norm(nn.Conv(4, (1, 1), use_bias=False)(h))
    return nn.Dense(3)(x.mean(axis=(1, 2)))


def test_a_depthwise_conv_is_tied_to_its_input_channels_and_removed_with_them():
  model = MobileBlock()
  x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 6, 6, 4)), jnp.float32)
  variables = model.init(jax.random.key(0), x)
  variables = jax.tree.map(lambda a: a + 0.2 if a.ndim == 1 else a, variables)
  unit_map = structure.trace(model, variables, x)
  expand = unit_map['Conv_0']
  assert {s.path for s in expand.producers} == {('Conv_0', 'kernel'), ('Conv_1', 'kernel')}
  keep = {'Conv_0': np.arange(8) % 3 != 0}
  small, small_vars, _ = structure.remove(model, variables, unit_map, keep)
  assert small_vars['params']['Conv_1']['kernel'].shape == (3, 3, 1, 5)
  _close(small.apply(small_vars, x, train=False), model.apply(structure.zero(variables, unit_map, keep), x,
                                                               train=False))


def test_nn_sequential_is_traced_without_apply_kwargs():
  model = nn.Sequential([nn.Dense(5), nn.relu, nn.Dense(2)])
  x = jnp.ones((2, 3))
  variables = model.init(jax.random.key(0), x)
  unit_map = structure.trace(model, variables, x)
  assert [g.name for g in unit_map.prunable()] == ['layers_0'] and unit_map.eval_kwargs == {}
  small, small_vars, _ = structure.remove(model, variables, unit_map, {'layers_0': np.arange(5) < 2})
  _close(small.apply(small_vars, x), model.apply(structure.zero(variables, unit_map, {'layers_0': np.arange(5) < 2}),
                                                 x))


# -- bad models: named errors ----------------------------------------------------------------

def test_python_control_flow_on_an_array_names_the_users_line():
  class Branchy(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Dense(4)(x)
      if h.sum() > 0:   # the user's line
        h = nn.relu(h)
      return nn.Dense(2)(h)

  x = jnp.ones((1, 3))
  variables = Branchy().init(jax.random.key(0), x)
  with pytest.raises(structure.UntraceableError, match=r'test_surgery_graphs.py:\d+ \(if h.sum\(\) > 0:'):
    structure.trace(Branchy(), variables, x)


def test_an_empty_user_block_and_an_empty_model_are_counted_and_removed():
  class EmptyBlock(nn.Module):
    width: int = 0

    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.Dense(self.width, kernel_init=nn.initializers.zeros)(x))
      return x + nn.Dense(x.shape[-1], kernel_init=nn.initializers.zeros)(h)

  class WithEmpty(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = EmptyBlock()(nn.relu(nn.Dense(3)(x)))
      return nn.Dense(2)(h)

  x = jnp.ones((2, 4))
  model = WithEmpty()
  variables = model.init(jax.random.key(0), x)
  unit_map = structure.trace(model, variables, x)
  assert unit_map['EmptyBlock_0/Dense_0'].size == 0
  keep = {'Dense_0': np.array([True, False, True])}
  # Dense_0 4·2 + 2, the empty block 0 + 0 and its (0, 2) reader 0 + 2, Dense_1 2·2 + 2; MACs 8 + 0 + 0 + 4.
  assert structure.count(unit_map, variables, keep) == (18, 12)
  small, small_vars, _ = structure.remove(model, variables, unit_map, keep)
  _close(small.apply(small_vars, x), model.apply(structure.zero(variables, unit_map, keep), x))

  class Identity(nn.Module):
    @nn.compact
    def __call__(self, x):
      return x

  unit_map = structure.trace(Identity(), {}, x)
  assert structure.count(unit_map, {}) == (0, 0) and not unit_map.prunable()


# -- 5. nnx: the optimizer helpers on the model, the structure API through nnx.bridge -------------

def test_nnx_models_prune_by_order_and_go_through_the_structure_api_by_the_bridge(tmp_path):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from flax.nnx import bridge  # pylint: disable=g-import-not-at-top
  import dessilbi_jax as dl  # pylint: disable=g-import-not-at-top

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
      self.norm = nnx.BatchNorm(4, use_running_average=True, rngs=rngs)
      self.head = nnx.Linear(4 * 6 * 6, 3, rngs=rngs)

    def __call__(self, x):
      return self.head(nnx.relu(self.norm(self.conv(x))).reshape(x.shape[0], -1))

  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, dl.dessilbi(0.05, mu=20.0, lambdas=0.0), wrt=nnx.Param)
  pruned = dl.prune_by_order(model, optimizer, 0.5)
  kernel = np.asarray(pruned['conv']['kernel'])
  assert int(np.sum(np.abs(kernel).sum(axis=(0, 1, 2)) == 0)) == 2        # half the 4 filters zeroed
  nnx.update(model, pruned)

  with pytest.raises(ValueError, match=r'nnx module. Wrap its class: model = flax.nnx.bridge.to_linen\(Net'):
    structure.trace(model, {}, jnp.ones((1, 6, 6, 1)))
  linen = bridge.to_linen(Net)
  x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 6, 6, 1)), jnp.float32)
  variables = linen.init(jax.random.key(0), x)
  unit_map = structure.trace(linen, variables, x)
  keep = {'conv': np.array([True, False, True, False])}
  small, small_vars, _ = structure.remove(linen, variables, unit_map, keep)
  assert small_vars['params']['head']['kernel'].shape == (2 * 6 * 6, 3)
  logits = small.apply(small_vars, x)
  _close(logits, linen.apply(structure.zero(variables, unit_map, keep), x))
  structure.save_compact(tmp_path / 'compact', small, small_vars, input_shape=(6, 6, 1))
  loaded, loaded_vars = structure.load_compact(tmp_path / 'compact')
  np.testing.assert_array_equal(loaded.apply(loaded_vars, x, train=False), logits)


def test_static_channel_slices_and_splits_are_followed_and_kept_whole():
  class Parts(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.Dense(6)(x))
      a, b = jnp.split(h, [2], axis=-1)
      first = nn.Dense(3)(h[..., :4])
      return first + nn.Dense(3)(a) + nn.Dense(3)(b) + nn.Dense(3)(nn.relu(nn.Dense(5)(x)))

  x = jnp.ones((2, 4))
  model = Parts()
  variables = model.init(jax.random.key(0), x)
  unit_map = structure.trace(model, variables, x)
  sliced = unit_map['Dense_0']
  assert not sliced.prunable and 'static channel slice or split' in sliced.reason
  readers = sorted((s.path[0], s.offset, s.size) for s in sliced.slices if s.role == 'consumer')
  assert readers == [('Dense_1', 0, 4), ('Dense_2', 0, 2), ('Dense_3', 2, 4)]
  keep = {'Dense_5': np.arange(5) != 1}                            # the other branch is still cut
  small, small_vars, _ = structure.remove(model, variables, unit_map, keep)
  _close(small.apply(small_vars, x), model.apply(structure.zero(variables, unit_map, keep), x))
