"""Gates through the unit map: BN gating is output scaling; purge keeps the test-time logits."""

import doctest

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dessilbi_jax

structure = pytest.importorskip('dessilbi_jax.structure')
# An editable install may serve the subpackage from another checkout: only this one's counts.
if (not hasattr(structure, 'keep_from_gates')
    or not structure.__file__.startswith(str(dessilbi_jax.__path__[0]))):
  pytest.skip('needs the unit map of branch issue11 (structure.gate, remove, count, keep_from_gates)',
              allow_module_level=True)

from dessilbi_jax import l0  # pylint: disable=g-import-not-at-top
from dessilbi_jax import models  # pylint: disable=g-import-not-at-top
from dessilbi_jax.l0 import unit_gates  # pylint: disable=g-import-not-at-top

X_IMAGES = jax.random.normal(jax.random.key(3), (5, 8, 8, 3))


def _variables(model, x, seed=0):
  """Random variables of the model's shapes (BN variances and scales > 0), so no identity hides a bug.

  Built in NumPy from ``eval_shape``: compiling a model's initializers costs
  seconds on a loaded CPU, and random values test more than the init's.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    noise = rng.normal(size=leaf.shape).astype(np.float32)
    return jnp.asarray(np.exp(0.3 * noise) if str(getattr(path[-1], 'key', '')) in ('var', 'scale') else 0.5 * noise)

  return jax.tree_util.tree_map_with_path(fill, jax.eval_shape(model.init, jax.random.key(0), x))


def _apply(model, variables, x):
  return jax.jit(model.apply)(variables, x)


@pytest.fixture(scope='module')
def resnet():
  """A ResNet with one basic block per stage, two stages of 4 and 8 channels, BN everywhere."""
  model = models.CifarResNet(stage_sizes=(1, 1), widths=(4, 8), num_classes=3)
  variables = _variables(model, X_IMAGES)
  unit_map = structure.trace(model, variables, X_IMAGES)
  return model, variables, unit_map


def _mixed_log_alphas(unit_map, names, key):
  """Per unit: shut (ẑ = 0), fractional ẑ, or open, so purge both folds and removes."""
  out = {}
  for name, k in zip(names, jax.random.split(key, len(names))):
    size = unit_map[name].size
    choice = jax.random.choice(k, jnp.array([-4.0, -0.8, 0.3, 4.0]), (size,))
    out[name] = choice.at[0].set(-4.0).at[-1].set(0.3)   # at least one shut, one fractional
  return out


def test_gating_through_batch_norm_multiplies_the_units_output(resnet):
  model, variables, unit_map = resnet
  names = unit_gates.gated_groups(unit_map)
  assert names and all(not unit_map[n].is_stream for n in names)
  log_alphas = _mixed_log_alphas(unit_map, names, jax.random.key(4))
  z = {n: l0.median_gates(a) for n, a in log_alphas.items()}
  gated = _apply(model, unit_gates.apply_gates(variables, unit_map, log_alphas), X_IMAGES)

  # Reference: the ungated network with the output of the BatchNorm after each
  # gated producer multiplied by z (flax's method interception, no params touched).
  after = {}
  for name in names:
    producer = unit_map[name].producers[0]
    (norm,) = {s.path[:-1] for s in unit_map[name].slices if s.role == 'norm' and s.layer == producer.path[:-1]}
    after[norm] = z[name]

  def scale_outputs(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, nn.BatchNorm) and context.method_name == '__call__':
      factor = after.get(tuple(context.module.path))
      if factor is not None:
        return out * factor
    return out

  with nn.intercept_methods(scale_outputs):   # the interceptor acts while jit traces
    expected = jax.jit(lambda v, x: model.apply(v, x))(variables, X_IMAGES)
  assert len(after) == len(names)
  np.testing.assert_allclose(gated, expected, rtol=1e-5, atol=1e-6)
  # A shut gate is a removed unit, not a zeroed filter that still emits BN's bias.
  assert not np.allclose(gated, _apply(model, variables, X_IMAGES), rtol=1e-3)


@pytest.mark.parametrize('name', ['resnet', 'lenet'])
def test_purged_network_equals_gated_network_at_test_time(resnet, name):
  if name == 'resnet':
    model, variables, unit_map = resnet
    x = X_IMAGES
  else:
    model = models.get_model('lenet5', 10, (8, 8, 1), widths=(4, 8, 16, 16))
    x = X_IMAGES[..., :1]
    variables = _variables(model, x)
    unit_map = structure.trace(model, variables, x)
  names = unit_gates.gated_groups(unit_map)
  log_alphas = _mixed_log_alphas(unit_map, names, jax.random.key(5))
  gated = _apply(model, unit_gates.apply_gates(variables, unit_map, log_alphas), x)
  small_model, small_vars = unit_gates.purge(model, variables, unit_map, log_alphas)
  np.testing.assert_allclose(_apply(small_model, small_vars, x), gated, rtol=1e-5, atol=1e-6)
  # Exactly the units with ẑ > 0 remain.
  kept = sum(int(np.sum(l0.median_gates(a) > 0)) for a in log_alphas.values())
  removed_map = structure.trace(small_model, small_vars, x)
  assert sum(removed_map[n].size for n in names) == kept
  assert kept < sum(unit_map[n].size for n in names)


def _mlp(widths=(3, 2), inputs=4, classes=5):
  model = models.get_model('mlp', classes, (inputs,), widths=widths)
  x = jnp.zeros((1, inputs))
  variables = _variables(model, x)
  return model, variables, structure.trace(model, variables, x)


def test_expected_size_by_brute_force_enumeration():
  """E[density], E[MACs] and per-layer fractions of an MLP 4-3-2-5 against all 2⁵ on/off patterns of its units."""
  import itertools
  _, variables, unit_map = _mlp()
  p = {'Dense_0': np.array([0.9, 0.2, 0.6]), 'Dense_1': np.array([0.3, 0.7])}
  size = unit_gates.expected_size(unit_map, variables, {k: jnp.asarray(v, jnp.float32) for k, v in p.items()})
  widths = lambda on0, on1: [4, sum(on0), sum(on1), 5]
  dense = [4 * 3, 3 * 2, 2 * 5]
  exp_layers, exp_total = np.zeros(3), 0.0
  for bits in itertools.product([0, 1], repeat=5):
    on0, on1 = bits[:3], bits[3:]
    prob = np.prod([q if b else 1 - q for q, b in zip(np.concatenate([p['Dense_0'], p['Dense_1']]), bits)])
    w = widths(on0, on1)
    entries = np.array([w[0] * w[1], w[1] * w[2], w[2] * w[3]])   # a dense layer on a vector: MACs = entries
    exp_layers += prob * entries
    exp_total += prob * entries.sum()
  assert float(size['density']) == pytest.approx(exp_total / sum(dense), rel=1e-5)
  assert float(size['macs']) == pytest.approx(exp_total / sum(dense), rel=1e-5)
  for name, e, n in zip(('Dense_0', 'Dense_1', 'Dense_2'), exp_layers, dense):
    assert float(size['layers'][name]) == pytest.approx(e / n, rel=1e-5)


def test_expected_size_of_masks_is_the_count_of_the_removed_network():
  """0/1 probabilities: exactly the unit map's count of kernel MACs, and the kernels of the removed LeNet."""
  model = models.get_model('lenet5', 10, (8, 8, 1), widths=(4, 8, 16, 16))
  x = jnp.zeros((1, 8, 8, 1))
  variables = _variables(model, x)
  unit_map = structure.trace(model, variables, x)
  rng = np.random.default_rng(0)
  keep = {n: rng.random(unit_map[n].size) < 0.5 for n in unit_gates.gated_groups(unit_map)}
  for mask in keep.values():
    mask[0] = True
  size = unit_gates.expected_size(unit_map, variables, {n: m.astype(np.float32) for n, m in keep.items()})
  small_model, small_vars, _ = structure.remove(model, variables, unit_map, keep)
  kernels = lambda params: sum(np.size(v) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]
                               if str(getattr(k[-1], 'key', '')) == 'kernel')
  assert float(size['density']) == pytest.approx(kernels(small_vars['params']) / kernels(variables['params']))
  assert float(size['macs']) == pytest.approx(
      models.count_flops(small_model, (8, 8, 1)) / models.count_flops(model, (8, 8, 1)), rel=1e-6)
  assert float(size['macs']) != pytest.approx(float(size['density']))   # convs weigh by their positions


def test_expected_size_of_a_stream_conv_counts_a_unit_once():
  """A group on both axes of one kernel: E[1_u·1_u] = p_u, against enumeration of a hand-declared map."""
  import itertools
  from dessilbi_jax.structure import Slice, UnitGroup, UnitMap
  kernel = ('Dense_0', 'kernel')
  group = UnitGroup('stream', 2, (Slice('params', kernel, 0, 'consumer', 0, 2),
                                  Slice('params', kernel, 1, 'producer', 0, 2)))
  unit_map = UnitMap((group,), positions=((kernel, 3),))
  variables = {'params': {'Dense_0': {'kernel': jnp.zeros((2, 2))}}}
  p = np.array([0.3, 0.8])
  size = unit_gates.expected_size(unit_map, variables, {'stream': jnp.asarray(p, jnp.float32)})
  expected = sum(np.prod([q if b else 1 - q for q, b in zip(p, bits)]) * sum(bits) ** 2
                 for bits in itertools.product([0, 1], repeat=2))
  assert float(size['density']) == pytest.approx(expected / 4, rel=1e-6)


@pytest.mark.parametrize('scope', ['model', 'layer'])
def test_size_constraint_values_and_gradient(scope):
  _, variables, unit_map = _mlp()
  log_alphas = {'Dense_0': jnp.array([3.0, -1.0, 0.5]), 'Dense_1': jnp.array([-0.5, 1.0])}
  probs = {k: l0.prob_active(v) for k, v in log_alphas.items()}
  size = unit_gates.expected_size(unit_map, variables, probs)
  g = unit_gates.size_constraint(unit_map, variables, target_macs=0.1, scope=scope)
  values = g(log_alphas)
  if scope == 'model':
    assert float(values) == pytest.approx(float(size['macs']) - 0.1)
  else:
    assert sorted(values) == ['Dense_0', 'Dense_1', 'Dense_2']
    for k, v in values.items():
      assert float(v) == pytest.approx(float(size['layers'][k]) - 0.1)
  # The gradient of the model-wise MACs in one log α, by central differences.
  grad = jax.grad(lambda a: jnp.sum(jnp.stack(jax.tree.leaves(g(a)))))(log_alphas)
  bump = lambda d: {**log_alphas, 'Dense_1': log_alphas['Dense_1'].at[0].add(d)}
  numeric = (sum(jax.tree.leaves(g(bump(1e-2)))) - sum(jax.tree.leaves(g(bump(-1e-2))))) / 2e-2
  assert float(grad['Dense_1'][0]) == pytest.approx(float(numeric), rel=1e-2)


@pytest.mark.parametrize('kwargs,message', [
    (dict(), 'Give one of `target_density` and `target_macs`'),
    (dict(target_density=0.3, target_macs=0.3), 'Give one of'),
    (dict(target_macs=0.0), '`target_macs` must be a number in \\(0, 1\\]'),
    (dict(target_density=1.5), '`target_density` must be a number in'),
    (dict(target_density=float('nan')), '`target_density` must be a number in'),
    (dict(target_density=0.3, scope='net'), '`scope` must be one of'),
])
def test_size_constraint_rejects_bad_targets(kwargs, message):
  _, variables, unit_map = _mlp()
  with pytest.raises(ValueError, match=message):
    unit_gates.size_constraint(unit_map, variables, **kwargs)


def test_init_rescales_and_training_gates_are_differentiable(resnet):
  model, variables, unit_map = resnet
  names = unit_gates.gated_groups(unit_map)
  rescaled, log_alphas = unit_gates.init_unit_gates(jax.random.key(6), variables, unit_map, names, 0.3)
  # All gates at 1/(1 − p₀) is the network with those units' outputs scaled by 1/0.7.
  ones = {n: jnp.full_like(a, 1 / 0.7) for n, a in log_alphas.items()}
  np.testing.assert_allclose(_apply(model, rescaled, X_IMAGES),
                             _apply(model, structure.gate(variables, unit_map, ones), X_IMAGES), rtol=1e-6)
  assert float(l0.prob_active(jnp.mean(jnp.concatenate(list(log_alphas.values()))))) == pytest.approx(0.92, abs=0.01)

  def loss(log_alphas):
    gated = unit_gates.apply_gates(rescaled, unit_map, log_alphas, key=jax.random.key(7))
    return jnp.sum(model.apply(gated, X_IMAGES) ** 2)

  grads = jax.jit(jax.grad(loss))(log_alphas)
  assert all(np.all(np.isfinite(g)) and np.any(g != 0) for g in grads.values())


def test_gates_on_a_model_without_units_are_an_error():
  model = models.get_model('mlp', 3, (4,), widths=())
  x = jnp.zeros((1, 4))
  variables = _variables(model, x)
  with pytest.raises(ValueError, match='no unit group to gate'):
    unit_gates.gated_groups(structure.trace(model, variables, x))


def test_exclude_must_name_gateable_groups(resnet):
  _, _, unit_map = resnet
  with pytest.raises(ValueError, match='not gateable groups'):
    unit_gates.gated_groups(unit_map, exclude=['Dense_0'])


def test_docstring_examples_run():
  result = doctest.testmod(unit_gates, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0


def test_summary_counts_the_purged_network():
  model = models.get_model('lenet5', 10, (8, 8, 1), widths=(4, 8, 16, 16))
  x = X_IMAGES[:1, ..., :1]
  variables = _variables(model, x)
  unit_map = structure.trace(model, variables, x)
  names = unit_gates.gated_groups(unit_map)
  log_alphas = _mixed_log_alphas(unit_map, names, jax.random.key(8))
  report = unit_gates.summary(variables, unit_map, log_alphas)
  small_model, small_vars = unit_gates.purge(model, variables, unit_map, log_alphas)
  # Against the purged network itself, counted by the model zoo's own counters.
  assert report['purged_params'] == pytest.approx(
      models.count_params(small_vars['params']) / models.count_params(variables['params']))
  assert report['purged_macs'] == pytest.approx(
      models.count_flops(small_model, (8, 8, 1)) / models.count_flops(model, (8, 8, 1)))
  kernels = lambda params: sum(np.size(v) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]
                               if str(getattr(k[-1], 'key', '')) == 'kernel')
  assert report['purged_density'] == pytest.approx(kernels(small_vars['params']) / kernels(variables['params']))
  probs = {n: l0.prob_active(a) for n, a in log_alphas.items()}
  size = unit_gates.expected_size(unit_map, variables, probs)
  assert report['expected_density'] == pytest.approx(float(size['density']))
  assert report['expected_macs'] == pytest.approx(float(size['macs']))
  assert 0 < report['purged_params'] < 1 and report['purged_density'] != pytest.approx(report['expected_density'])
