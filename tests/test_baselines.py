"""Tests of the baselines against plain numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dessilbi_jax import baselines


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {
      'Conv_0': {'kernel': jnp.asarray(rng.normal(size=(3, 3, 2, 8)), jnp.float32),
                 'bias': jnp.asarray(rng.normal(size=8), jnp.float32)},
      'Dense_0': {'kernel': jnp.asarray(rng.normal(size=(12, 5)), jnp.float32)},
  }


def _run(tx, params, steps, seed=0):
  """`steps` jitted updates with random gradients; returns every params and the last state."""
  update = jax.jit(tx.update)
  state = tx.init(params)
  rng = np.random.default_rng(seed)
  history = []
  for _ in range(steps):
    grads = jax.tree.map(lambda w: jnp.asarray(rng.normal(size=w.shape), w.dtype), params)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    history.append(params)
  return history, state


def _reference_sparsity(t, s_f, t0, t1, freq, s_i=0.0):
  if t < t0:
    return 0.0
  last = t1 if t >= t1 else t0 + (t - t0) // freq * freq
  return s_f + (s_i - s_f) * (1 - (last - t0) / (t1 - t0)) ** 3


def test_cubic_schedule_matches_closed_form():
  schedule = jax.jit(baselines.cubic_sparsity_schedule(0.9, 10, 73, initial_sparsity=0.1, frequency=7))
  for t in range(0, 120):
    np.testing.assert_allclose(schedule(t), _reference_sparsity(t, 0.9, 10, 73, 7, 0.1), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('groups,group_axes', [
    (baselines.unstructured, {'Conv_0': (), 'Dense_0': ()}),
    ({'Dense_0/kernel': 'neuron'}, {'Conv_0': (0, 1, 2), 'Dense_0': (0,)}),
])
def test_gmp_hits_sparsity_exactly_per_layer(groups, group_axes):
  params, s_f = _params(), 0.7
  tx = baselines.gmp(optax.sgd(0.05, momentum=0.9), s_f, begin_step=2, end_step=12, frequency=3, groups=groups)
  history, state = _run(tx, params, 20)
  masks = baselines.masks(state)
  assert masks['Conv_0']['bias'] is None
  for layer, axes in group_axes.items():
    kernel = np.asarray(history[-1][layer]['kernel'])
    group_nonzero = np.any(kernel != 0, axis=axes) if axes else kernel != 0
    assert np.sum(~group_nonzero) == round(s_f * group_nonzero.size)
    np.testing.assert_array_equal(np.asarray(masks[layer]['kernel']), kernel != 0)


def test_gmp_masks_smallest_magnitudes_and_pruned_weights_stay_zero():
  params = _params()
  inner = optax.sgd(0.05, momentum=0.9)
  tx = baselines.gmp(inner, 0.6, begin_step=0, end_step=8, frequency=4)
  history, _ = _run(tx, params, 16)
  # At step 0 the mask is the magnitude ranking of the inner optimizer's proposal.
  rng = np.random.default_rng(0)
  grads = jax.tree.map(lambda w: jnp.asarray(rng.normal(size=w.shape), w.dtype), params)
  proposal = optax.apply_updates(params, inner.update(grads, inner.init(params), params)[0])
  dense = np.abs(np.asarray(proposal['Dense_0']['kernel'])).ravel()
  s0 = _reference_sparsity(0, 0.6, 0, 8, 4)
  expected_zero = np.argsort(dense, kind='stable')[:round(s0 * dense.size)]
  got = np.asarray(history[0]['Dense_0']['kernel']).ravel()
  assert set(np.flatnonzero(got == 0)) == set(expected_zero)
  # A weight pruned stays exactly zero through later pruning steps and fine-tuning.
  for before, after in zip(history, history[1:]):
    for layer in ('Conv_0', 'Dense_0'):
      was_zero = np.asarray(before[layer]['kernel']) == 0
      assert np.all(np.asarray(after[layer]['kernel'])[was_zero] == 0)


def test_gmp_global_and_per_leaf_targets():
  params = _params()
  sizes = {'Conv_0': 8, 'Dense_0': 60}   # filters, single weights (DessiLBI's default grouping)
  tx = baselines.gmp(optax.sgd(0.01), 0.5, begin_step=0, end_step=0, scope='global')
  history, _ = _run(tx, params, 1)
  conv_zero = np.all(np.asarray(history[0]['Conv_0']['kernel']) == 0, axis=(0, 1, 2)).sum()
  dense_zero = (np.asarray(history[0]['Dense_0']['kernel']) == 0).sum()
  assert conv_zero + dense_zero == round(0.5 * sum(sizes.values()))

  targets = {'Conv_0/kernel': 0.25, 'Dense_0/kernel': 0.9}
  tx = baselines.gmp(optax.sgd(0.01), targets, begin_step=0, end_step=0)
  history, _ = _run(tx, params, 1)
  assert np.all(np.asarray(history[0]['Conv_0']['kernel']) == 0, axis=(0, 1, 2)).sum() == round(0.25 * 8)
  assert (np.asarray(history[0]['Dense_0']['kernel']) == 0).sum() == round(0.9 * 60)
  with pytest.raises(ValueError, match='missing'):
    baselines.gmp(optax.sgd(0.01), {'Conv_0/kernel': 0.5}, begin_step=0, end_step=0).init(params)


def test_gmp_recovers_sparse_regression():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(256, 10)), jnp.float32)
  w_true = jnp.zeros((10, 1)).at[jnp.array([1, 4, 7]), 0].set(jnp.array([2.0, -3.0, 1.5]))
  y = x @ w_true
  loss = lambda p: jnp.mean((x @ p['w'] - y) ** 2)
  tx = baselines.gmp(optax.sgd(0.05, momentum=0.9), 0.7, begin_step=20, end_step=100, frequency=10)
  params = {'w': jnp.zeros((10, 1))}
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(200):
    params, state = step(params, state)
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(params['w'])), [1, 4, 7])
  assert loss(params) < 1e-6
  assert step._cache_size() == 1


def test_gmp_bad_input():
  with pytest.raises(ValueError, match='final_sparsity'):
    baselines.gmp(optax.sgd(0.1), 1.5, begin_step=0, end_step=10)
  with pytest.raises(ValueError, match='begin_step'):
    baselines.gmp(optax.sgd(0.1), 0.5, begin_step=10, end_step=5)
  with pytest.raises(ValueError, match='scope'):
    baselines.gmp(optax.sgd(0.1), 0.5, begin_step=0, end_step=5, scope='net')


def _numpy_group_prox(w, lam, axes):
  norm = np.sqrt(np.sum(w ** 2, axis=axes, keepdims=True)) if axes else np.abs(w)
  return w * np.maximum(0.0, 1.0 - lam / np.maximum(norm, 1e-30))


@pytest.mark.parametrize('nesterov', [False, True])
def test_prox_group_lasso_matches_closed_form(nesterov):
  params = _params()
  params['Conv_0']['kernel'] = params['Conv_0']['kernel'] * jnp.linspace(0.01, 1.0, 8)   # some weak filters
  lr, lam, beta, wd = 0.1, 10.0, 0.9, 1e-2
  tx = baselines.prox_group_lasso(lr, lam, momentum=beta, nesterov=nesterov, weight_decay=wd)
  history, _ = _run(tx, params, 2, seed=3)
  rng = np.random.default_rng(3)
  w = {k: {n: np.asarray(v, np.float64) for n, v in layer.items()} for k, layer in params.items()}
  buf = {k: {n: np.zeros_like(v) for n, v in layer.items()} for k, layer in w.items()}
  axes = {'Conv_0': {'kernel': (0, 1, 2), 'bias': None}, 'Dense_0': {'kernel': ()}}
  for step in range(2):
    grads = jax.tree.map(lambda v: rng.normal(size=v.shape), params)   # same draw order as _run
    for layer in w:
      for name in w[layer]:
        g = np.asarray(grads[layer][name], np.float64) + (wd * w[layer][name] if w[layer][name].ndim >= 2 else 0)
        buf[layer][name] = beta * buf[layer][name] + g
        d = g + beta * buf[layer][name] if nesterov else buf[layer][name]
        proposal = w[layer][name] - lr * d
        a = axes[layer][name]
        w[layer][name] = proposal if a is None else _numpy_group_prox(proposal, lr * lam, a)
    for layer in w:
      for name in w[layer]:
        np.testing.assert_allclose(history[step][layer][name], w[layer][name], rtol=1e-5, atol=1e-6)
  # The weak filters are removed entirely, and exactly.
  conv = np.asarray(history[-1]['Conv_0']['kernel'])
  assert 0 < np.sum(np.all(conv == 0, axis=(0, 1, 2))) < 8


def test_prox_group_lasso_schedule_and_inject_hyperparams():
  params = _params()
  tx = optax.inject_hyperparams(baselines.prox_group_lasso)(learning_rate=0.1, penalty=1.0, momentum=0.0)
  history, state = _run(tx, params, 3)
  assert state.hyperparams['penalty'].dtype == jnp.float32
  schedule = optax.constant_schedule(0.1)
  scheduled, _ = _run(baselines.prox_group_lasso(schedule, 1.0, momentum=0.0), params, 3)
  for a, b in zip(jax.tree.leaves(history[-1]), jax.tree.leaves(scheduled[-1])):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_make_baseline_by_name():
  params = _params()
  for name in baselines.BASELINES:
    history, state = _run(baselines.make_baseline(name, 0.05, total_steps=30, sparsity=0.5, penalty=1.0), params, 30)
    assert all(w.dtype == jnp.float32 for w in jax.tree.leaves(history[-1]))
  dense = np.asarray(history[-1]['Dense_0']['kernel'])
  assert np.sum(dense == 0) > 0
  with pytest.raises(ValueError, match='Unknown baseline'):
    baselines.make_baseline('lottery', 0.1, total_steps=10)


def test_make_optimizer_passes_sparsity_and_penalty():
  from dessilbi_jax import train
  params = _params()
  cfg = train.TrainConfig(optimizer='gmp_structured', sparsity=0.25, epochs=2, momentum=0.0)
  history, state = _run(train.make_optimizer(cfg, steps_per_epoch=10), params, 20)
  filters = np.any(np.asarray(history[-1]['Conv_0']['kernel']) != 0, axis=(0, 1, 2))
  assert filters.sum() == 6  # round(0.25 · 8) of 8 filters pruned
  assert np.mean(np.asarray(history[-1]['Dense_0']['kernel']) != 0) == 45 / 60

  cfg = train.TrainConfig(optimizer='prox_group_lasso', penalty=0.7, lr=0.5, lr_decay_epochs=(), momentum=0.0)
  got, _ = _run(train.make_optimizer(cfg, steps_per_epoch=10), params, 3)
  expected, _ = _run(baselines.prox_group_lasso(0.5, 0.7, momentum=0.0), params, 3)
  for a, b in zip(jax.tree.leaves(got[-1]), jax.tree.leaves(expected[-1])):
    np.testing.assert_allclose(a, b, rtol=1e-6)
