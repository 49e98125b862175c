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


pytestmark = pytest.mark.usefixtures('rbg_keys')   # conftest.py: fast init of the large models


def _compiled(fn, *args):
  """``jax.jit(fn)`` compiled at XLA's lowest optimization level: a third of the compile time, same maths."""
  return jax.jit(fn).lower(*args).compile(compiler_options={'xla_backend_optimization_level': 0})


_APPLY_CACHE = {}


def _apply(model, variables, x):
  """Eval-mode logits, compiled once per model and variable shapes."""
  key = (id(model), str(jax.tree.map(lambda a: (a.shape, a.dtype), variables)), x.shape)
  if key not in _APPLY_CACHE:
    _APPLY_CACHE[key] = (model, _compiled(lambda v, inputs: model.apply(v, inputs, train=False), variables, x))
  return _APPLY_CACHE[key][1](variables, x)


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


# -- remove == zero, and the counts ------------------------------------------------------------

@pytest.mark.parametrize('name', _IDS)
def test_removed_network_computes_the_zeroed_one_and_counts_match(name):
  model, variables, x, unit_map = _case(name)
  keep = _random_keep(unit_map, seed=3)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # a layer of a random mask may keep its one unit
    small, small_vars, _ = structure.remove(model, variables, unit_map, keep)
    masked = structure.zero(variables, unit_map, keep)
    params, macs = structure.count(unit_map, variables, keep)
  removed_logits = np.asarray(_apply(small, small_vars, x))
  masked_logits = np.asarray(_apply(model, masked, x))
  np.testing.assert_allclose(removed_logits, masked_logits, rtol=1e-5, atol=1e-5 * np.abs(masked_logits).max())
  # The masked network is not the dense one (the test would pass trivially on an empty mask).
  assert not np.allclose(masked_logits, np.asarray(_apply(model, variables, x)), rtol=1e-3)
  assert params == models.count_params(small_vars['params'])
  assert macs == models.count_flops(small, x.shape[1:])
  if name.startswith('resnet'):
    assert any(not keep[g.name].any() for g in unit_map.groups if g.block), 'the masks empty some block'


def test_streams_are_kept_whole_when_not_cut_and_round_to_rounds_up():
  model, variables, x, unit_map = _case('resnet20')
  keep = _random_keep(unit_map, seed=4, empty_blocks=0)
  small, small_vars, _ = structure.remove(model, variables, unit_map, keep, cut_streams=False, round_to=4)
  assert small.widths == (16, 32, 64)
  kept = [int(keep[f'BasicBlock_{b}/Conv_0'].sum()) for b in range(9)]
  assert small.block_widths == tuple(min(-(-k // 4) * 4, w) for k, w in zip(kept, (16,) * 3 + (32,) * 3 + (64,) * 3))
  masked = structure.zero(variables, unit_map, keep, cut_streams=False, round_to=4)
  np.testing.assert_allclose(_apply(small, small_vars, x), _apply(model, masked, x), rtol=1e-5, atol=1e-6)


def test_a_layer_losing_every_unit_keeps_one_and_says_so():
  model, variables, x, unit_map = _case('lenet5')
  with pytest.warns(UserWarning, match="'Conv_1' would lose all its 16 units"):
    small, _, _ = structure.remove(model, variables, unit_map, {'Conv_1': np.zeros(16, bool)})
  assert small.widths == (6, 1, 120, 84)


def test_an_emptied_block_is_the_identity():
  model, variables, x, unit_map = _case('resnet20')
  keep = {'BasicBlock_4/Conv_0': np.zeros(32, bool)}
  small, small_vars, _ = structure.remove(model, variables, unit_map, keep)
  assert small.block_widths[4] == 0 and 'BasicBlock_4' not in small_vars['params']
  np.testing.assert_allclose(_apply(small, small_vars, x), _apply(model, structure.zero(variables, unit_map, keep), x),
                             rtol=1e-5, atol=1e-6)


# -- optimizer state ---------------------------------------------------------------------------

def _loss(model, variables, x, labels, train):
  if train and 'batch_stats' in variables:
    logits, _ = model.apply(variables, x, train=True, mutable=['batch_stats'])
  else:
    logits = model.apply(variables, x, train=False)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _steps(model, variables, tx, state, x, labels, steps=2, masks=None):
  """``steps`` updates; with ``masks`` (a masked retrain) the params are masked after each."""
  def step(params, state):
    grads = jax.grad(lambda p: _loss(model, {**variables, 'params': p}, x, labels, True))(params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    return (params if masks is None else jax.tree.map(jnp.multiply, params, masks)), state
  params = variables['params']
  step = _compiled(step, params, state)
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def test_optimizer_state_is_sliced_like_the_params():
  model, variables, x, unit_map = _case('lenet5')
  labels = jnp.arange(2) % 10
  tx = optax.chain(dl.dessilbi(0.1, mu=1.0, lambdas=0.01, groups={'Dense_0/kernel': 'neuron'}), optax.scale_by_adam())
  _, state = _steps(model, variables, tx, tx.init(variables['params']), x, labels)
  keep = _random_keep(unit_map, seed=5)
  _, small_vars, small_state = structure.remove(model, variables, unit_map, keep, state)
  c0, c1, d0, d1 = (np.flatnonzero(keep[n]) for n in ('Conv_0', 'Conv_1', 'Dense_0', 'Dense_1'))
  rows = (np.arange(4)[:, None] * 16 + c1[None, :]).reshape(-1)  # 2x2 positions of the flattened map
  rows.sort()
  for tree, new in ((dl.z(state), dl.z(small_state)), (state[1].mu, small_state[1].mu)):
    np.testing.assert_array_equal(new['Conv_1']['kernel'], np.asarray(tree['Conv_1']['kernel'])[:, :, c0][..., c1])
    np.testing.assert_array_equal(new['Dense_0']['kernel'], np.asarray(tree['Dense_0']['kernel'])[np.ix_(rows, d0)])
    np.testing.assert_array_equal(new['Dense_1']['kernel'], np.asarray(tree['Dense_1']['kernel'])[np.ix_(d0, d1)])
  # Per-group state: the filter kernel's entry steps (1, 1, 1, O) and the neuron kind's (1, O).
  np.testing.assert_array_equal(dl.entry_step(small_state)['Conv_1']['kernel'],
                                np.asarray(dl.entry_step(state)['Conv_1']['kernel'])[..., c1])
  assert dl.entry_step(small_state)['Dense_0']['kernel'].shape == (1, len(d0))
  assert dl.entry_step(small_state)['Conv_0']['bias'] is None  # None leaves stay None
  assert int(small_state[0].count) == int(state[0].count) == 2
  assert jax.tree.structure(small_vars['params']) == jax.tree.structure(dl.z(small_state), is_leaf=lambda v: v is None)


def _assert_same_trees(a, b, what):
  is_none = lambda v: v is None
  assert jax.tree.structure(a, is_leaf=is_none) == jax.tree.structure(b, is_leaf=is_none), what
  for (path, u), v in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_array_equal(u, v, err_msg=f'{what} {jax.tree_util.keystr(path)}')


def test_surgery_on_a_lean_state_is_surgery_on_the_stored_one():
  """remove and widen slice a lean state (store_gamma=False: Γ None, κ and λ scalars on lasso leaves)
  like the stored one: Γ rebuilt from the sliced Z and s is the stored Γ sliced, and a step after
  removing gives the same numbers from either state."""
  model, variables, x, unit_map = _case('residual_flatten')
  labels = jnp.arange(2) % 3
  make = lambda store: dl.dessilbi(0.1, mu=1.0, kappa=1.3, lambdas=0.01, groups={'Dense_0/kernel': 'neuron'},
                                   store_gamma=store)
  txs = {store: make(store) for store in (True, False)}
  runs = {store: _steps(model, variables, tx, tx.init(variables['params']), x, labels, steps=3)
          for store, tx in txs.items()}
  _assert_same_trees(runs[True][0], runs[False][0], 'W')
  trained = {**variables, 'params': runs[True][0]}
  states = (runs[True][1], runs[False][1])   # both sliced in one call: any tree of optax states is
  assert states[1].gamma_kappa['Dense_1']['kernel'] is not None   # a lasso leaf
  keep = _random_keep(unit_map, seed=5)
  small, small_vars, removed = structure.remove(model, trained, unit_map, keep, states)
  _, _, widened = structure.widen(model, trained, unit_map, {g.name: 2 for g in unit_map.prunable()},
                                  jax.random.key(3), states)
  for op, (stored, lean) in (('remove', removed), ('widen', widened)):
    assert all(g is None for g in jax.tree.leaves(lean.gamma, is_leaf=lambda v: v is None))
    for helper in (dl.gamma, dl.z, dl.entry_step, dl.support):
      _assert_same_trees(helper(stored), helper(lean), f'{op}: {helper.__name__}')
    _assert_same_trees(stored.gamma_scale, lean.gamma_scale, f'{op}: s')
    _assert_same_trees(stored.trace, lean.trace, f'{op}: b')
    assert lean.gamma_kappa['Dense_1']['kernel'] == states[1].gamma_kappa['Dense_1']['kernel']
    assert any(bool(np.any(s)) for s in jax.tree.leaves(dl.support(lean)))
  assert dl.sparsity_summary(small_vars['params'], removed[0]) == dl.sparsity_summary(small_vars['params'], removed[1])
  after = {store: _steps(small, small_vars, txs[store], st, x, labels, steps=1) for store, st in zip((True, False), removed)}
  _assert_same_trees(after[True][0], after[False][0], 'W after a step')
  _assert_same_trees(dl.gamma(after[True][1]), dl.gamma(after[False][1]), 'Γ after a step')


@pytest.mark.parametrize('name', ['lenet5', 'resnet20'])
def test_a_dessilbi_step_on_the_removed_network_is_the_step_on_the_masked_one(name):
  model, variables, x, unit_map = _case(name)
  labels = jnp.arange(2) % 10
  keep = _random_keep(unit_map, seed=6)
  masks = structure.unit_masks(variables, unit_map, keep, inputs=True)
  masked = jax.tree.map(lambda v, m: v * m, variables, masks)
  tx = dl.dessilbi(0.1, mu=1.0, lambdas=0.01)
  small, small_vars, small_state = structure.remove(model, masked, unit_map, keep, tx.init(masked['params']))
  # An emptied block's last batch norm would learn a bias from the stream's gradient: masks hold it at 0.
  full_params, _ = _steps(model, masked, tx, tx.init(masked['params']), x, labels, masks=masks['params'])
  small_params, _ = _steps(small, small_vars, tx, small_state, x, labels)
  # The kept units of the masked network, cut out of it, are the removed network's.
  _, cut, _ = structure.remove(model, {**masked, 'params': full_params}, unit_map, keep)
  for a, b in zip(jax.tree.leaves(cut['params']), jax.tree.leaves(small_params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert not np.allclose(jax.tree.leaves(small_params)[0], jax.tree.leaves(small_vars['params'])[0])


# -- widen and gate ----------------------------------------------------------------------------

@pytest.mark.parametrize('name', _IDS)
def test_widened_network_computes_the_same_and_keeps_old_values(name):
  model, variables, x, unit_map = _case(name)
  tx = dl.dessilbi(0.1, mu=1.0)
  state = tx.init(variables['params'])
  state = state._replace(entry_step=jax.tree.map(lambda e: None if e is None else e + 3, state.entry_step,
                                                 is_leaf=lambda e: e is None))
  grow = {g.name: 2 + i % 2 for i, g in enumerate(unit_map.prunable())}
  wide, wide_vars, wide_state = structure.widen(model, variables, unit_map, grow, jax.random.key(1), state)
  np.testing.assert_allclose(_apply(wide, wide_vars, x), _apply(model, variables, x), rtol=1e-5, atol=1e-6)
  old_units = {g.name: np.arange(g.size + grow.get(g.name, 0)) < g.size for g in unit_map.groups}
  new_map = structure.trace(wide, wide_vars, x, rebuild=unit_map.rebuild)
  # Removing the new units again gives the old variables to the bit, and the old state.
  _, back, back_state = structure.remove(wide, wide_vars, new_map, old_units, wide_state)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(back_state), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  # New state: zero; new entry steps: -1 (never entered).
  for group in new_map.prunable():
    for s in group.producers:
      new = ~old_units[group.name][s.offset:s.offset + s.size]
      entry = dl.entry_step(wide_state)
      for part in s.path:
        entry = entry[part]
      if entry is not None:
        assert np.all(np.take(np.asarray(entry), np.flatnonzero(new), axis=s.axis) == -1)
      momentum = wide_state.trace
      for part in s.path:
        momentum = momentum[part]
      assert np.all(np.take(np.asarray(momentum), np.flatnonzero(new), axis=s.axis) == 0)


@pytest.mark.parametrize('name', ['lenet5', 'resnet20'])
def test_a_dessilbi_step_after_widening_is_the_unwidened_step_on_the_old_units(name):
  # The new units' fan-out is zero, so the loss, and every old weight's gradient, are those of the old
  # network; their own state starts at zero. The step, cut back to the old units, is the old step (after
  # it the new fan-out is no longer zero, and the networks part).
  model, variables, x, unit_map = _case(name)
  labels = jnp.arange(2) % 10
  tx = dl.dessilbi(0.1, mu=1.0, lambdas=0.01)
  old_params, old_state = _steps(model, variables, tx, tx.init(variables['params']), x, labels, steps=1)
  grow = {g.name: 3 for g in unit_map.prunable()}
  wide, wide_vars, wide_state = structure.widen(model, variables, unit_map, grow, jax.random.key(2),
                                                tx.init(variables['params']))
  wide_params, wide_state = _steps(wide, wide_vars, tx, wide_state, x, labels, steps=1)
  new_map = structure.trace(wide, wide_vars, x, rebuild=unit_map.rebuild)
  old_units = {g.name: np.arange(g.size + grow.get(g.name, 0)) < g.size for g in unit_map.groups}
  _, back, back_state = structure.remove(wide, {**wide_vars, 'params': wide_params}, new_map, old_units, wide_state)
  for a, b in zip(jax.tree.leaves(back['params']), jax.tree.leaves(old_params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(dl.gamma(back_state)), jax.tree.leaves(dl.gamma(old_state))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert not np.allclose(jax.tree.leaves(wide_params)[0], jax.tree.leaves(wide_vars['params'])[0])


@pytest.mark.filterwarnings('ignore:Unit group')  # a random mask may empty one conv of the concatenation
@pytest.mark.parametrize('name', ['lenet5', 'resnet20', 'concat_norm'])
def test_gate_scales_units_and_binary_gates_are_zeroing(name):
  model, variables, x, unit_map = _case(name)
  keep = _random_keep(unit_map, seed=7, empty_blocks=0)
  resolved = structure.resolve_keep(unit_map, keep)
  z = {name: jnp.asarray(resolved[name], jnp.float32) for name in keep}
  np.testing.assert_allclose(_apply(model, structure.gate(variables, unit_map, z), x),
                             _apply(model, structure.zero(variables, unit_map, keep), x), rtol=1e-5, atol=1e-6)
  ones = {name: jnp.ones_like(value) for name, value in z.items()}
  np.testing.assert_array_equal(_apply(model, structure.gate(variables, unit_map, ones), x),
                                _apply(model, variables, x))
  # Differentiable in z: d logits / d z of a unit is its contribution (a finite, non-zero number).
  first = unit_map.prunable()[0].name
  half = jnp.full(unit_map[first].size, 0.5)
  logits_sum = lambda g: jnp.sum(model.apply(structure.gate(variables, unit_map, {first: g}), x))
  grad = _compiled(jax.grad(logits_sum), half)(half)
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)


# -- bad input ---------------------------------------------------------------------------------

def test_bad_masks_get_clear_errors():
  model, variables, x, unit_map = _case('lenet5')
  with pytest.raises(ValueError, match=r"keep\['Conv_1'\] has shape \(3,\); group 'Conv_1' has 16 units"):
    structure.remove(model, variables, unit_map, {'Conv_1': np.ones(3, bool)})
  with pytest.raises(ValueError, match="unit group 'Conv_9', which this unit map does not have; its groups are: "
                                       "input, Conv_0"):
    structure.zero(variables, unit_map, {'Conv_9': np.ones(3, bool)})
  with pytest.raises(ValueError, match="must be a boolean mask"):
    structure.zero(variables, unit_map, {'Conv_0': np.full(6, np.nan)})
  with pytest.raises(ValueError, match="'Dense_2' cannot lose units: the network's outputs"):
    structure.remove(model, variables, unit_map, {'Dense_2': np.arange(10) < 5})
  with pytest.raises(ValueError, match='round_to must be a positive integer'):
    structure.remove(model, variables, unit_map, {}, round_to=0)
  with pytest.raises(ValueError, match="new_units names unit group 'nope'"):
    structure.widen(model, variables, unit_map, {'nope': 1}, jax.random.key(0))


class _Sorted(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(3)(jnp.sort(nn.Dense(4)(x), axis=-1))


class _Depthwise(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return nn.Conv(4, (3, 3), feature_group_count=2)(x).mean(axis=(1, 2))


def test_an_untraceable_op_is_named_with_its_source_line():
  x = jnp.ones((1, 5))
  with pytest.raises(structure.UntraceableError, match=r'Cannot follow the channels through `sort` at .*test_structure'):
    structure.trace(_Sorted(), _Sorted().init(jax.random.key(0), x), x)
  x = jnp.ones((1, 4, 4, 2))
  unit_map = structure.trace(_Depthwise(), _Depthwise().init(jax.random.key(0), x), x)
  assert not unit_map.prunable() and 'grouped convolution (2 groups)' in unit_map.groups[-1].reason


def test_a_user_model_without_a_rebuild_rule_is_removed_as_the_same_module_on_narrower_arrays():
  model, variables, x, unit_map = _case('residual_flatten')
  bare = structure.trace(model, variables, x)
  keep = _random_keep(unit_map, seed=5)
  ruled, ruled_vars, _ = structure.remove(model, variables, unit_map, keep)
  small, small_vars, _ = structure.remove(model, variables, bare, keep)
  assert isinstance(small, structure.Resized) and not isinstance(ruled, structure.Resized)
  _assert_same_trees(small_vars, ruled_vars, 'variables')
  np.testing.assert_array_equal(small.apply(small_vars, x), ruled.apply(ruled_vars, x))
  assert jax.tree.map(np.shape, small.init(jax.random.key(0), x)) == jax.tree.map(np.shape, small_vars)


def test_a_declared_correction_makes_a_group_unprunable():
  model, variables, x, unit_map = _case('lenet5')
  fixed = unit_map.replace('Conv_0', prunable=False, reason='declared by the user')
  with pytest.raises(ValueError, match="'Conv_0' cannot lose units: declared by the user"):
    structure.remove(model, variables, fixed, {'Conv_0': np.arange(6) < 3})


def test_every_stage_of_a_stream_keeps_a_channel():
  model, variables, x, unit_map = _case('resnet20')
  keep = {'Conv_0': np.arange(64) < 16}  # stage 3's own channels: stages 1 and 2 (units 16..47) would be empty
  with pytest.warns(UserWarning, match='no channel; keeping its first'):
    small, small_vars, _ = structure.remove(model, variables, unit_map, keep)
  assert small.widths == (1, 1, 17) and small.shortcut_offsets == (0, 16)  # unit 24 serves stages 1 and 2
  with pytest.warns(UserWarning):
    masked = structure.zero(variables, unit_map, keep)
  np.testing.assert_allclose(_apply(small, small_vars, x), _apply(model, masked, x), rtol=1e-5, atol=1e-6)
