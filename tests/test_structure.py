"""Tests of the unit map: tracing, removal, zeroing, widening, gating and counting."""

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dessilbi_jax as dl
from dessilbi_jax import models
from dessilbi_jax import structure
from dessilbi_jax.structure.unit_map import new_extent


@pytest.fixture(autouse=True, scope='module')
def _rbg_keys():
  previous = jax.config.jax_default_prng_impl
  jax.config.update('jax_default_prng_impl', 'rbg')
  yield
  jax.config.update('jax_default_prng_impl', previous)


def _apply(model, variables, x, **kwargs):
  """``model.apply`` jitted at XLA's lowest optimization level: a third of the compile time, same maths."""
  fn = jax.jit(lambda v, inputs: model.apply(v, inputs, **kwargs))
  return fn.lower(variables, x).compile(compiler_options={'xla_backend_optimization_level': 0})(variables, x)


def _random_variables(model, input_shape, seed=0):
  """Random params and running statistics (not init's mean 0 / var 1, so batch norm does something)."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))

  def fill(path, leaf):
    name = str(path[-1].key)
    if name == 'var':
      value = rng.uniform(0.5, 1.5, leaf.shape)
    elif name == 'mean':
      value = rng.normal(0.0, 0.3, leaf.shape)
    elif len(leaf.shape) > 1:
      value = rng.normal(0.0, 1.0 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape)
    else:
      value = rng.normal(0.5, 0.3, leaf.shape)
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def _random_keep(unit_map, seed, empty_blocks=0.3):
  rng = np.random.default_rng(seed)
  keep = {}
  for group in unit_map.prunable():
    mask = rng.random(group.size) < 0.5
    if group.block is not None and rng.random() < empty_blocks:
      mask[:] = False
    keep[group.name] = mask
  return keep


# -- models written only for these tests ------------------------------------------------------

class ResidualFlatten(nn.Module):
  """conv -> (conv, relu, conv) + skip -> relu -> flatten -> dense -> dense: biases, no batch norm."""
  stream: int = 4
  inner: int = 3
  hidden: int = 6
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Conv(self.stream, (3, 3))(x))
    y = nn.relu(nn.Conv(self.inner, (3, 3))(x))
    x = nn.relu(x + nn.Conv(self.stream, (3, 3))(y))
    hidden = nn.relu(nn.Dense(self.hidden)(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.num_classes)(hidden)


def _residual_flatten_rule(model, unit_map, sources):
  return model.clone(stream=len(sources['Conv_0']), inner=len(sources['Conv_1']), hidden=len(sources['Dense_0']))


class ConcatNorm(nn.Module):
  """Two convs concatenated along the channels, one batch norm on the result, mean pooling."""
  left: int = 3
  right: int = 5

  @nn.compact
  def __call__(self, x, train=False):
    both = jnp.concatenate([nn.Conv(self.left, (3, 3))(x), nn.Conv(self.right, (1, 1))(x)], axis=-1)
    both = nn.relu(nn.BatchNorm(use_running_average=not train)(both))
    return nn.Dense(4)(jnp.mean(both, axis=(1, 2)))


def _concat_rule(model, unit_map, sources):
  group = unit_map['Conv_0']
  _, left = new_extent(0, model.left, group.size, sources['Conv_0'])
  _, right = new_extent(model.left, model.right, group.size, sources['Conv_0'])
  return model.clone(left=len(left), right=len(right))


# (name, model factory, input shape, rebuild rule or None for the zoo's)
MODELS = [
    ('mlp', lambda: models.get_model('mlp', 10, (8, 8, 1)), (8, 8, 1), None),
    ('lenet5', lambda: models.get_model('lenet5', 10, (8, 8, 1)), (8, 8, 1), None),
    ('conv1d', lambda: models.get_model('conv1d', 10, (40, 1)), (40, 1), None),
    ('vgg16', lambda: models.get_model('vgg16', 10, (32, 32, 3)), (32, 32, 3), None),
    ('resnet20', lambda: models.get_model('resnet20', 10, (8, 8, 3)), (8, 8, 3), None),
    ('resnet56', lambda: models.get_model('resnet56', 10, (8, 8, 3)), (8, 8, 3), None),
    ('resnet18', lambda: models.get_model('resnet18', 10, (32, 32, 3)), (32, 32, 3), None),
    ('resnet50', lambda: models.get_model('resnet50', 10, (32, 32, 3)), (32, 32, 3), None),
    ('residual_flatten', ResidualFlatten, (6, 6, 2), _residual_flatten_rule),
    ('concat_norm', ConcatNorm, (5, 5, 2), _concat_rule),
]
_IDS = [case[0] for case in MODELS]


@functools.lru_cache(maxsize=None)
def _case(name):
  _, factory, input_shape, rule = next(case for case in MODELS if case[0] == name)
  model = factory()
  variables = _random_variables(model, input_shape)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, *input_shape)), jnp.float32)
  return model, variables, x, structure.trace(model, variables, x, rebuild=rule)


# -- the map the structure implies, written from each model's definition ------------------------

def _layer(kernel, ndim, *, bias=False, bn=None, size, offset=0, collection_bn=True):
  """A producer kernel with its bias or batch norm (``bn``: the norm module's path)."""
  layer = tuple(kernel.split('/'))
  out = {('params', kernel + '/kernel', ndim - 1, 'producer', offset, size, 1, ())}
  if bias:
    out.add(('params', kernel + '/bias', 0, 'bias', offset, size, 1, layer))
  if bn:
    out |= {('params', f'{bn}/scale', 0, 'norm', offset, size, 1, layer),
            ('params', f'{bn}/bias', 0, 'norm', offset, size, 1, layer),
            ('batch_stats', f'{bn}/mean', 0, 'norm', offset, size, 1, layer),
            ('batch_stats', f'{bn}/var', 0, 'norm', offset, size, 1, layer)}
  return out


def _reads(kernel, ndim, size, offset=0, repeat=1):
  return {('params', kernel + '/kernel', ndim - 2 if ndim > 2 else 0, 'consumer', offset, size, repeat, ())}


def _summary(unit_map):
  return {g.name: (g.size, g.prunable, g.block,
                   frozenset((s.collection, '/'.join(s.path), s.axis, s.role, s.offset, s.size, s.repeat, s.layer)
                             for s in g.slices))
          for g in unit_map.groups}


def _sequential(layers, input_size, input_repeat=1):
  """layers: (module, kernel ndim, width, bias?, batch-norm module, repeat into the next) in order."""
  first, first_ndim = layers[0][0], layers[0][1]
  expected = {'input': (input_size, False, None, frozenset(_reads(first, first_ndim, input_size, repeat=input_repeat)))}
  for (module, ndim, width, bias, bn, repeat), following in zip(layers, layers[1:] + [None]):
    slices = _layer(module, ndim, bias=bias, bn=bn, size=width)
    if following is None:  # the classifier: never units
      expected[module] = (width, False, None, frozenset(slices))
    else:
      expected[module] = (width, True, None, frozenset(slices | _reads(following[0], following[1], width,
                                                                        repeat=repeat)))
  return expected


def _expected_map(name):
  dense = lambda module, width, repeat=1: (module, 2, width, True, None, repeat)
  if name == 'mlp':
    return _sequential([dense('Dense_0', 300), dense('Dense_1', 100), dense('Dense_2', 10)], 1, 64)
  if name == 'lenet5':  # 8x8 -> pool 4x4 -> pool 2x2: the dense layer reads 2·2 positions per channel
    return _sequential([('Conv_0', 4, 6, True, None, 1), ('Conv_1', 4, 16, True, None, 4), dense('Dense_0', 120),
                        dense('Dense_1', 84), dense('Dense_2', 10)], 1)
  if name == 'conv1d':  # lengths 40 -> 19 -> 10 -> 5
    return _sequential([('Conv_0', 3, 25, True, None, 1), ('Conv_1', 3, 25, True, None, 1),
                        ('Conv_2', 3, 25, True, None, 5), dense('Dense_0', 10)], 1)
  if name == 'vgg16':
    return _sequential([(f'Conv_{i}', 4, w, False, f'BatchNorm_{i}', 1) for i, w in enumerate(models.VGG16.widths)]
                       + [dense('Dense_0', 10)], 3)
  if name in ('resnet20', 'resnet56'):
    return _cifar_resnet_map({'resnet20': 3, 'resnet56': 9}[name], (16, 32, 64))
  if name in ('resnet18', 'resnet50'):
    return _resnet_map(name == 'resnet50', (2, 2, 2, 2) if name == 'resnet18' else (3, 4, 6, 3))
  if name == 'residual_flatten':
    stream = (_layer('Conv_0', 4, bias=True, size=4) | _layer('Conv_2', 4, bias=True, size=4)
              | _reads('Conv_1', 4, 4) | _reads('Dense_0', 2, 4, repeat=36))
    return {'input': (2, False, None, frozenset(_reads('Conv_0', 4, 2))),
            'Conv_0': (4, True, None, frozenset(stream)),
            'Conv_1': (3, True, None, frozenset(_layer('Conv_1', 4, bias=True, size=3) | _reads('Conv_2', 4, 3))),
            'Dense_0': (6, True, None, frozenset(_layer('Dense_0', 2, bias=True, size=6) | _reads('Dense_1', 2, 6))),
            'Dense_1': (3, False, None, frozenset(_layer('Dense_1', 2, bias=True, size=3)))}
  assert name == 'concat_norm'
  norm = {(c, f'BatchNorm_0/{leaf}', 0, 'norm', 0, 8, 1, ())
          for c, leaf in (('params', 'scale'), ('params', 'bias'), ('batch_stats', 'mean'), ('batch_stats', 'var'))}
  both = (_layer('Conv_0', 4, bias=True, size=3) | _layer('Conv_1', 4, bias=True, size=5, offset=3) | norm
          | _reads('Dense_0', 2, 8))
  return {'input': (2, False, None, frozenset(_reads('Conv_0', 4, 2) | _reads('Conv_1', 4, 2))),
          'Conv_0': (8, True, None, frozenset(both)),
          'Dense_0': (4, False, None, frozenset(_layer('Dense_0', 2, bias=True, size=4)))}


def _cifar_resnet_map(blocks, widths):
  # Option-A pads centre stage s - 1 inside stage s: ranges within the last stage's channels.
  starts = [0] * len(widths)
  for s in range(len(widths) - 1, 0, -1):
    starts[s - 1] = starts[s] + (widths[s] - widths[s - 1]) // 2
  stream = _layer('Conv_0', 4, bn='BatchNorm_0', size=widths[0], offset=starts[0])
  expected = {'input': (3, False, None, frozenset(_reads('Conv_0', 4, 3)))}
  index = 0
  for stage, width in enumerate(widths):
    for block in range(blocks):
      b = f'BasicBlock_{index}'
      reads_from = stage - 1 if stage > 0 and block == 0 else stage
      stream |= _reads(f'{b}/Conv_0', 4, widths[reads_from], starts[reads_from])
      stream |= _layer(f'{b}/Conv_1', 4, bn=f'{b}/BatchNorm_1', size=width, offset=starts[stage])
      expected[f'{b}/Conv_0'] = (width, True, b, frozenset(
          _layer(f'{b}/Conv_0', 4, bn=f'{b}/BatchNorm_0', size=width) | _reads(f'{b}/Conv_1', 4, width)))
      index += 1
  stream |= _reads('Dense_0', 2, widths[-1])
  expected['Conv_0'] = (widths[-1], True, None, frozenset(stream))
  expected['Dense_0'] = (10, False, None, frozenset(_layer('Dense_0', 2, bias=True, size=10)))
  return expected


def _resnet_map(bottleneck, stage_sizes):
  prefix, expansion = ('BottleneckBlock', 4) if bottleneck else ('BasicBlock', 1)
  inner = ('Conv_0', 'Conv_1') if bottleneck else ('Conv_0',)
  last, last_bn = ('Conv_2', 'BatchNorm_2') if bottleneck else ('Conv_1', 'BatchNorm_1')
  expected = {'input': (3, False, None, frozenset(_reads('Conv_0', 4, 3)))}
  current_name, current = 'Conv_0', _layer('Conv_0', 4, bn='BatchNorm_0', size=64)
  current_width, index = 64, 0
  for stage, base in enumerate((64, 128, 256, 512)):
    width = expansion * base
    for block in range(stage_sizes[stage]):
      b = f'{prefix}_{index}'
      current |= _reads(f'{b}/Conv_0', 4, current_width)
      if block == 0 and (stage > 0 or bottleneck):  # a projection: a new stream begins
        current |= _reads(f'{b}/shortcut_conv', 4, current_width)
        expected[current_name] = (current_width, True, None, frozenset(current))
        current_name, current_width = f'{b}/shortcut_conv', width
        current = _layer(f'{b}/shortcut_conv', 4, bn=f'{b}/shortcut_bn', size=width)
      current |= _layer(f'{b}/{last}', 4, bn=f'{b}/{last_bn}', size=width)
      for i, conv in enumerate(inner):
        reader = inner[i + 1] if i + 1 < len(inner) else last
        expected[f'{b}/{conv}'] = (base, True, b, frozenset(
            _layer(f'{b}/{conv}', 4, bn=f'{b}/BatchNorm_{i}', size=base) | _reads(f'{b}/{reader}', 4, base)))
      index += 1
  current |= _reads('Dense_0', 2, current_width)
  expected[current_name] = (current_width, True, None, frozenset(current))
  expected['Dense_0'] = (10, False, None, frozenset(_layer('Dense_0', 2, bias=True, size=10)))
  return expected


@pytest.mark.parametrize('name', _IDS)
def test_traced_map_is_the_map_the_structure_implies(name):
  model, variables, x, _ = _case(name)
  traced = structure.trace(model, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables), x,
                           rebuild=lambda *a: None)
  got, expected = _summary(traced), _expected_map(name)
  assert sorted(got) == sorted(expected)
  for group in expected:
    assert got[group] == expected[group], group
