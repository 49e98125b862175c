"""Hard-concrete gates against their closed forms and a NumPy transcription."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dessilbi_jax import l0

# log_α across the clamp range and beyond it; 0 is the symmetric case.
LOG_ALPHAS = np.array([-10.0, l0.LOG_ALPHA_MIN, -1.6, -0.5, 0.0, 0.85, 2.0, l0.LOG_ALPHA_MAX, 6.0],
                      np.float32)


def np_gate(u, log_alpha):
  """The hard-concrete gate of a uniform sample u, transcribed from the paper in float64."""
  s = 1.0 / (1.0 + np.exp(-(np.log(u) - np.log(1.0 - u) + log_alpha) / (2.0 / 3.0)))
  return np.clip(s * (1.1 - (-0.1)) + (-0.1), 0.0, 1.0)


def test_prob_active_closed_form():
  # z = 0 exactly when the stretched sample is below 0, i.e. u < u0 with
  # logit(u0) = β·logit(0.1/1.2) − log_α; P(z ≠ 0) = 1 − u0.
  a = LOG_ALPHAS.astype(np.float64)
  u0 = 1.0 / (1.0 + np.exp(-((2 / 3) * math.log(0.1 / 1.1) - a)))
  np.testing.assert_allclose(l0.prob_active(jnp.asarray(LOG_ALPHAS)), 1.0 - u0, rtol=1e-6)
  np.testing.assert_allclose(l0.prob_active(jnp.float32(0.0)), 1 / (1 + math.exp(-1.5986)), atol=1e-4)


def test_median_is_the_gate_at_half():
  # z is increasing in u, so its median is its value at u = ½.
  np.testing.assert_allclose(l0.median_gates(jnp.asarray(LOG_ALPHAS)), np_gate(0.5, LOG_ALPHAS), atol=1e-6)
  assert float(l0.median_gates(jnp.float32(0.0))) == pytest.approx(0.5)
  # The median is fractional only in a band of log_α; the clamp keeps that band reachable.
  assert float(l0.median_gates(jnp.float32(l0.LOG_ALPHA_MIN))) == 0.0
  assert float(l0.median_gates(jnp.float32(l0.LOG_ALPHA_MAX))) == 1.0


def test_sample_gates_matches_numpy_transcription():
  key = jax.random.key(3)
  log_alpha = jnp.asarray(LOG_ALPHAS)
  sample = jax.jit(l0.sample_gates)
  z = sample(key, log_alpha)
  u = np.asarray(jax.random.uniform(key, log_alpha.shape, jnp.float32, l0.EPS, 1 - l0.EPS), np.float64)
  np.testing.assert_allclose(z, np_gate(u, LOG_ALPHAS.astype(np.float64)), atol=1e-5)
  # One key, one sample: the same key gives the same gates, another key others.
  np.testing.assert_array_equal(z, sample(key, log_alpha))
  assert not np.array_equal(z, sample(jax.random.key(4), log_alpha))


def test_sample_gates_finite_at_extreme_log_alpha():
  z = l0.sample_gates(jax.random.key(0), jnp.array([-1e4, 1e4, 0.0], jnp.float32))
  assert np.all(np.isfinite(z)) and z[0] == 0.0 and z[1] == 1.0


def test_monte_carlo_mean_and_zero_mass():
  """E[z] and P(z = 0) over many keys, within 5 standard errors of the sample mean."""
  n = 100_000
  log_alpha = jnp.asarray(LOG_ALPHAS)
  keys = jax.random.split(jax.random.key(7), n)
  z = np.asarray(jax.jit(jax.vmap(l0.sample_gates, (0, None)))(keys, log_alpha), np.float64)

  p_zero = 1.0 - np.asarray(l0.prob_active(log_alpha), np.float64)
  bound = 5 * np.sqrt(p_zero * (1 - p_zero) / n) + 1e-5   # + the ε of u's range
  assert np.all(np.abs((z == 0).mean(0) - p_zero) <= bound)

  # E[z] = ∫₀¹ z(u) du, by the midpoint rule on 2·10⁶ cells (error far below the MC bound).
  u = (np.arange(2_000_000) + 0.5) / 2_000_000
  exact = np_gate(u[:, None], LOG_ALPHAS.astype(np.float64)[None, :])
  mean, var = exact.mean(0), exact.var(0)
  assert np.all(np.abs(z.mean(0) - mean) <= 5 * np.sqrt(var / n) + 1e-5)


def test_clamp():
  tree = {'a': jnp.array([-10.0, -1.0, 0.0, 4.0, 10.0]), 'b': jnp.array([jnp.inf, -jnp.inf])}
  clamped = l0.clamp_log_alpha(tree)
  low, high = math.log(1e-4), math.log(100.0)
  np.testing.assert_allclose(clamped['a'], [low, -1.0, 0.0, 4.0, high], rtol=1e-6)
  np.testing.assert_allclose(clamped['b'], [high, low], rtol=1e-6)
  # At the lower end a gate is shut for good: no floor under the expected density (the seed paper's
  # log 1e-2 left P(z ≠ 0) = 4.7 %); at the upper end its median is 1.
  assert float(l0.prob_active(jnp.float32(low))) < 1e-3
  assert float(l0.median_gates(jnp.float32(high))) == 1.0


def test_clamped_optimizer_is_the_clamp_after_the_step():
  """l0.clamped(tx): the same step as tx, then clamp_log_alpha; in range, exactly tx's."""
  import optax
  tx = l0.clamped(optax.sgd(2.0, momentum=0.5))
  inner = optax.sgd(2.0, momentum=0.5)
  log_alpha = jnp.array([-9.0, 0.0, 4.0, 1.0])
  state, inner_state, raw = tx.init(log_alpha), inner.init(log_alpha), log_alpha
  for g in (jnp.array([3.0, 0.5, -2.0, 0.1]), jnp.array([1.0, -0.5, -2.0, 0.2])):
    updates, state = tx.update(g, state, log_alpha)
    log_alpha = optax.apply_updates(log_alpha, updates)
    inner_updates, inner_state = inner.update(g, inner_state, raw)
    raw = l0.clamp_log_alpha(optax.apply_updates(raw, inner_updates))
    np.testing.assert_allclose(log_alpha, raw, rtol=1e-6)
  assert float(log_alpha[0]) == pytest.approx(math.log(1e-4)) and float(log_alpha[2]) == pytest.approx(math.log(100))
  with pytest.raises(ValueError, match='params=log_alpha'):
    tx.update(g, state)


def test_init_log_alpha():
  log_alpha = l0.init_log_alpha(jax.random.key(0), (20_000,), droprate_init=0.3)
  assert float(log_alpha.mean()) == pytest.approx(math.log(0.7 / 0.3), abs=5 * 0.01 / math.sqrt(20_000))
  assert float(log_alpha.std()) == pytest.approx(0.01, rel=0.05)
  # The paper: with p₀ = 0.3 the expected density starts near 92 %.
  assert float(l0.expected_density(log_alpha)) == pytest.approx(0.92, abs=0.005)
  assert l0.init_weight_scale(0.3) == pytest.approx(1 / 0.7)


@pytest.mark.parametrize('droprate', [0.0, 1.0, -0.1, 1.5, float('nan')])
def test_init_rejects_droprate_outside_open_interval(droprate):
  with pytest.raises(ValueError, match='droprate_init'):
    l0.init_log_alpha(jax.random.key(0), (3,), droprate_init=droprate)


def test_expected_density_hand_count():
  """A conv with 4 filters of 3·3·2 = 18 weights, a dense layer with 3 input rows of 5."""
  open_, shut = 30.0, -30.0   # P(z ≠ 0) = 1 and 0 to float precision
  half = 2 / 3 * math.log(0.1 / 1.1)   # log_α = β·log(−γ/ζ): P(z ≠ 0) = ½ exactly
  gates = {'Conv_0': jnp.array([open_, shut, shut, half]), 'Dense_0': jnp.array([open_, open_, shut])}
  sizes = {'Conv_0': 18, 'Dense_0': 5}
  densities = l0.layer_densities(gates, sizes)
  # Conv: (18 + 0 + 0 + 9) / 72; dense: (5 + 5 + 0) / 15; model: (27 + 10) / (72 + 15).
  assert float(densities['Conv_0']) == pytest.approx(27 / 72, rel=1e-6)
  assert float(densities['Dense_0']) == pytest.approx(10 / 15, rel=1e-6)
  assert float(l0.model_density(gates, sizes)) == pytest.approx(37 / 87, rel=1e-6)


def test_expected_density_per_gate_sizes():
  # Gates of unequal groups (a dense layer's input rows after a flatten, say).
  log_alpha = jnp.array([30.0, -30.0, 30.0])
  sizes = jnp.array([2.0, 5.0, 3.0])
  assert float(l0.expected_density(log_alpha, sizes)) == pytest.approx(5 / 10, rel=1e-6)
  assert float(l0.model_density({'a': log_alpha}, {'a': sizes})) == pytest.approx(0.5, rel=1e-6)


def test_density_gradient_matches_closed_form():
  # d/dlog_α of P(z ≠ 0) = P(1 − P): the gates' gradient of the L0 term.
  log_alpha = jnp.asarray(LOG_ALPHAS)
  grad = jax.grad(lambda a: l0.expected_density(a, 1.0) * a.size)(log_alpha)
  p = np.asarray(l0.prob_active(log_alpha))
  np.testing.assert_allclose(grad, p * (1 - p), rtol=1e-5, atol=1e-7)


def test_model_density_of_no_gates_is_an_error():
  with pytest.raises(ValueError, match='no gates'):
    l0.model_density({}, {})


GATES = {'Conv_0': jnp.array([30.0, -30.0, -30.0, 30.0]), 'Dense_0': jnp.array([30.0, 30.0, -30.0])}
SIZES = {'Conv_0': 18, 'Dense_0': 5}


def test_density_constraint_values():
  per_layer = l0.density_constraint(SIZES, 0.4)(GATES)
  assert float(per_layer['Conv_0']) == pytest.approx(0.5 - 0.4, abs=1e-6)
  assert float(per_layer['Dense_0']) == pytest.approx(2 / 3 - 0.4, abs=1e-6)
  model = l0.density_constraint(SIZES, 0.4, scope='model')(GATES)
  assert float(model) == pytest.approx((36 + 10) / (72 + 15) - 0.4, abs=1e-6)
  only_dense = l0.density_constraint(SIZES, {'Dense_0': 0.25})(GATES)
  assert list(only_dense) == ['Dense_0']
  assert float(only_dense['Dense_0']) == pytest.approx(2 / 3 - 0.25, abs=1e-6)


@pytest.mark.parametrize('target', [0.0, -0.1, 1.5, float('nan'), {'Dense_0': 0.0}])
def test_density_constraint_rejects_target_outside_unit_interval(target):
  with pytest.raises(ValueError, match=r'must lie in \(0, 1\]'):
    l0.density_constraint(SIZES, target)


@pytest.mark.parametrize('target, message', [
    ({'Dense_9': 0.3}, r"names \['Dense_9'\]; the gated layers are \['Conv_0', 'Dense_0'\]"),
    ({}, 'names no layer'),
])
def test_density_constraint_rejects_target_naming_no_layer(target, message):
  with pytest.raises(ValueError, match=message):
    l0.density_constraint(SIZES, target)


def test_density_constraint_rejects_bad_scope_and_no_gates():
  with pytest.raises(ValueError, match="scope='layer'"):
    l0.density_constraint(SIZES, {'Dense_0': 0.3}, scope='model')
  with pytest.raises(ValueError, match="'layer' or 'model'"):
    l0.density_constraint(SIZES, 0.3, scope='global')
  with pytest.raises(ValueError, match='no gated layer'):
    l0.density_constraint({}, 0.3)


def test_penalized_objective_gradient():
  """A fixed multiplier gives loss + λ·density: ∂/∂log_α_g = ∂loss + λ·P_g(1 − P_g)·|g|/N."""
  from dessilbi_jax.l0 import constraints
  log_alphas = {'Dense_0': jnp.array([-1.0, 0.0, 2.0])}
  sizes = {'Dense_0': 4}
  penalty = 0.3
  constraint_fn = l0.density_constraint(sizes, 1.0, scope='model')
  objective = constraints.lagrangian(lambda a: jnp.sum(a['Dense_0'] ** 2), constraint_fn)
  grads, _ = jax.grad(objective, has_aux=True)(log_alphas, jnp.float32(penalty))
  p = np.asarray(l0.prob_active(log_alphas['Dense_0']))
  np.testing.assert_allclose(grads['Dense_0'], 2 * np.array([-1.0, 0.0, 2.0]) + penalty * p * (1 - p) * 4 / 12,
                             rtol=1e-5)
