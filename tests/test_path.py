"""Tests of the path helpers on plain and wrapped optax states, against the states' own arrays."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dessilbi_jax as dl
import reference

_LAMBDAS = {'lasso': 0.2, 'filter': 1.2}


def _params_and_grads(steps=12):
  rng = np.random.default_rng(0)
  shapes = {'Conv_0': {'kernel': (3, 3, 2, 8), 'bias': (8,)}, 'Dense_0': {'kernel': (24, 10), 'bias': (10,)}}
  scale = lambda shape: rng.uniform(0.2, 1.0, size=shape[-1])   # groups of different norms
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s) * scale(s), jnp.float32), shapes,
                        is_leaf=lambda s: isinstance(s, tuple))
  grads = [jax.tree.map(lambda w: jnp.asarray(0.02 * rng.normal(size=w.shape), jnp.float32), params)
           for _ in range(steps)]
  return params, grads


_LABELS = {'Conv_0': {'kernel': 'conv', 'bias': 'conv'}, 'Dense_0': {'kernel': 'dense', 'bias': 'dense'}}
_MASK = {'Conv_0': {'kernel': True, 'bias': False}, 'Dense_0': {'kernel': True, 'bias': True}}


def _inner_states(name, state):
  """{leaf path: the DessiLBIState that owns it}, picked out of the wrapper by hand."""
  paths = ('Conv_0/kernel', 'Conv_0/bias', 'Dense_0/kernel', 'Dense_0/bias')
  if name == 'plain':
    return {p: state for p in paths}
  if name == 'chained':
    return {p: state[1] for p in paths}
  if name in ('injected', 'masked'):
    return {p: state.inner_state for p in paths}
  conv, dense = state.inner_states['conv'].inner_state, state.inner_states['dense'].inner_state
  return {p: conv if p.startswith('Conv') else dense for p in paths}


def _make(name, store_gamma=True):
  plain = lambda lambdas=_LAMBDAS: dl.dessilbi(0.1, mu=2.0, lambdas=lambdas, store_gamma=store_gamma)
  if name == 'plain':
    return plain()
  if name == 'chained':
    return optax.chain(optax.clip_by_global_norm(1.0), plain())
  if name == 'injected':
    return optax.inject_hyperparams(dl.dessilbi)(learning_rate=0.1, mu=2.0, lambdas=0.25,
                                                 normalize_groups=True, store_gamma=store_gamma)
  if name == 'masked':
    return optax.masked(plain(), _MASK)
  # Two DessiLBI transformations with different λ, one per part of the params.
  return optax.partition({'conv': plain({'filter': 1.0}), 'dense': plain({'lasso': 0.3})}, _LABELS)


# The λ of each structured leaf under each wrapper (injected: normalized groups).
_LAMBDA_OF = {
    'plain': {'Conv_0/kernel': 1.2, 'Dense_0/kernel': 0.2},
    'chained': {'Conv_0/kernel': 1.2, 'Dense_0/kernel': 0.2},
    'injected': {'Conv_0/kernel': 0.25, 'Dense_0/kernel': 0.25},
    'masked': {'Conv_0/kernel': 1.2, 'Dense_0/kernel': 0.2},
    'partition': {'Conv_0/kernel': 1.0, 'Dense_0/kernel': 0.3},
}
_KIND_OF = {'Conv_0/kernel': 'filter', 'Dense_0/kernel': 'lasso', 'Conv_0/bias': None, 'Dense_0/bias': None}


def _run(tx, params, grads):
  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for g in grads:
    params, state = step(params, state, g)
  return params, state


def _leaf(tree, path):
  outer, inner = path.split('/')
  value = tree[outer][inner]
  return None if isinstance(value, optax.MaskedNode) else value


WRAPPERS = ['plain', 'chained', 'injected', 'masked', 'partition']


@pytest.fixture(scope='module')
def runs():
  params, grads = _params_and_grads()
  return {name: _run(_make(name), params, grads) for name in WRAPPERS}


@pytest.mark.parametrize('name', WRAPPERS)
def test_helpers_read_the_states_own_arrays(name, runs):
  params, state = runs[name]
  owners = _inner_states(name, state)
  gam, z, entry, support = dl.gamma(state), dl.z(state), dl.entry_step(state), dl.support(state)
  sparse = dl.sparse_params(params, state)
  summary = dl.sparsity_summary(params, state)
  for tree in (gam, z, entry, support):   # the params' structure, None on leaves without Γ
    assert jax.tree.structure(jax.tree.map(lambda _: 0, tree, is_leaf=lambda x: x is None)) == (
        jax.tree.structure(params))
  for path, kind in _KIND_OF.items():
    w = np.asarray(_leaf(params, path))
    owner = owners[path]
    structured = kind is not None and not (name == 'masked' and path == 'Conv_0/bias')
    if kind is None or _leaf(owner.gamma, path) is None:
      assert _leaf(gam, path) is None and _leaf(z, path) is None and _leaf(entry, path) is None
      assert _leaf(support, path) is None
      np.testing.assert_array_equal(_leaf(sparse, path), w)
      assert summary[path] == dict(kind=None, groups=0, groups_in_support=0, weights=w.size, weights_kept=w.size)
      continue
    assert structured
    g = np.asarray(_leaf(gam, path))
    np.testing.assert_array_equal(g, _leaf(owner.gamma, path))
    np.testing.assert_array_equal(_leaf(z, path), _leaf(owner.z, path))
    np.testing.assert_array_equal(_leaf(entry, path), _leaf(owner.entry_step, path))
    # Γ = κ·prox_λ(Z) with this leaf's own λ (under partition: its own transformation's).
    np.testing.assert_allclose(g, reference.prox(np.asarray(_leaf(z, path)), kind, _LAMBDA_OF[name][path],
                                           normalize=name == 'injected'),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(_leaf(support, path), g != 0)
    np.testing.assert_array_equal(_leaf(sparse, path), np.where(g != 0, w, 0))
    in_support = reference.nonzero_groups(g, kind)
    assert 0 < in_support.sum() < in_support.size, f'{path}: vacuous, {in_support.sum()} in support'
    assert summary[path] == dict(kind=kind, groups=in_support.size, groups_in_support=int(in_support.sum()),
                                 weights=w.size, weights_kept=int(np.count_nonzero(g)))


@pytest.fixture(scope='module')
def lean_runs():
  params, grads = _params_and_grads()
  return {name: _run(_make(name, store_gamma=False), params, grads) for name in WRAPPERS}


def _assert_trees_equal(a, b, what):
  is_none = lambda x: x is None
  assert jax.tree.structure(a, is_leaf=is_none) == jax.tree.structure(b, is_leaf=is_none), what
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype, (what, path)
    np.testing.assert_array_equal(x, y, err_msg=f'{what} {jax.tree_util.keystr(path)}')


@pytest.mark.parametrize('name', WRAPPERS)
def test_every_helper_reads_a_lean_state_as_the_stored_one(name, runs, lean_runs):
  """store_gamma=False keeps no Γ; every helper rebuilds it and gives the stored state's values,
  bit for bit, under every wrapper (two lean states merged under optax.partition)."""
  (params, state), (lean_params, lean) = runs[name], lean_runs[name]
  _assert_trees_equal(params, lean_params, 'W')
  assert all(g is None for s in dl.find_states(lean) for g in jax.tree.leaves(s.gamma, is_leaf=lambda x: x is None))
  assert len(dl.find_states(lean)) == len(dl.find_states(state))
  for helper in (dl.gamma, dl.z, dl.entry_step, dl.support):
    _assert_trees_equal(helper(state), helper(lean), helper.__name__)
  _assert_trees_equal(dl.sparse_params(params, state), dl.sparse_params(params, lean), 'sparse_params')
  _assert_trees_equal(jax.jit(dl.sparse_params)(params, state), jax.jit(dl.sparse_params)(params, lean), 'jit')
  assert dl.sparsity_summary(params, state) == dl.sparsity_summary(params, lean)
  for fraction in (0.3, 0.7):
    _assert_trees_equal(dl.prune_by_order(params, state, fraction), dl.prune_by_order(params, lean, fraction), 'prune')
  _assert_trees_equal(dl.prune_by_order(params, state, 0.5, leaves=['Dense_0/kernel']),
                      dl.prune_by_order(params, lean, 0.5, leaves=['Dense_0/kernel']), 'prune one leaf')
  assert any(bool(np.any(s)) and not bool(np.all(s)) for s in jax.tree.leaves(dl.support(lean)))


def test_a_nan_lean_state_is_reported_as_not_finite():
  params = {'conv': {'kernel': jnp.ones((3, 3, 1, 4)), 'bias': jnp.zeros(4)}, 'dense': {'kernel': jnp.ones((4, 3))}}
  tx = dl.dessilbi(0.5, mu=1.0, lambdas=0.01, store_gamma=False)
  state = tx.init(params)
  bad = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), params)
  for grads in (bad, params):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert bool(jnp.all(jnp.isnan(dl.gamma(state)['conv']['kernel'])))
  assert bool(jnp.all(jnp.isnan(dl.gamma(state)['dense']['kernel'])))
  with pytest.raises(ValueError, match=r"Γ of leaf 'conv/kernel' holds 36 NaN or infinite values"):
    dl.sparsity_summary(params, state)


@pytest.mark.parametrize('name', WRAPPERS)
def test_prune_by_order_on_a_trained_state(name, runs):
  params, state = runs[name]
  entry = dl.entry_step(state)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)),
                                   dl.prune_by_order(params, state, 0.0), params))
  everything = dl.prune_by_order(params, state, 1.0)
  for path, kind in _KIND_OF.items():
    e = _leaf(entry, path)
    if e is None:
      np.testing.assert_array_equal(_leaf(everything, path), _leaf(params, path))
      continue
    assert not np.any(_leaf(everything, path))
    # Pruning the share of groups that never entered removes exactly those groups.
    e = np.asarray(e)
    never = np.count_nonzero(e < 0)
    assert 0 < never < e.size
    pruned = dl.prune_by_order(params, state, never / e.size, leaves=[path])
    np.testing.assert_array_equal(_leaf(pruned, path), np.where(e < 0, 0, _leaf(params, path)))
    for other in _KIND_OF:
      if other != path:
        np.testing.assert_array_equal(_leaf(pruned, other), _leaf(params, other))


def _hand_built():
  """A state with known entry steps and params with known group norms."""
  conv_norms = np.array([1.0, 9.0, 0.5, 2.0, 4.0, 3.0])
  conv = np.zeros((1, 1, 2, 6), np.float32)
  conv[0, 0, 0, :] = 0.6 * conv_norms
  conv[0, 0, 1, :] = -0.8 * conv_norms
  dense = np.array([[0.5, 3.0, -0.7], [1.0, 1.0, 1.0]], np.float32)
  params = {'conv': jnp.asarray(conv), 'dense': jnp.asarray(dense), 'bias': jnp.ones(3)}
  entry = {'conv': jnp.asarray([3, -1, 1, 3, 5, -1], jnp.int32).reshape(1, 1, 1, 6),
           'dense': jnp.asarray([[2, -1, 2], [1, -1, 7]], jnp.int32),
           'bias': None}
  gamma = {'conv': jnp.where(entry['conv'] > 0, params['conv'], 0),
           'dense': jnp.where(entry['dense'] > 0, params['dense'], 0), 'bias': None}
  state = dl.DessiLBIState(count=jnp.asarray(7, jnp.int32), trace=jax.tree.map(jnp.zeros_like, params),
                           z=gamma, gamma=gamma, gamma_scale={'conv': jnp.ones((1, 1, 1, 6)), 'dense': None, 'bias': None},
                           entry_step=entry)
  return params, state


@pytest.mark.parametrize('fraction, conv_pruned, dense_pruned', [
    # Rank, best first: conv 2 (step 1), 3 (step 3, ‖W‖ 2), 0 (step 3, ‖W‖ 1), 4 (step 5),
    # 1 (never, ‖W‖ 9), 5 (never, ‖W‖ 3); dense (1,0), (0,2), (0,0), (1,2), (0,1), (1,1).
    (1 / 6, [5], [(1, 1)]),
    (0.5, [4, 1, 5], [(1, 2), (0, 1), (1, 1)]),
    (4 / 6, [0, 4, 1, 5], [(0, 0), (1, 2), (0, 1), (1, 1)]),
])
def test_prune_by_order_ranks_by_entry_step_then_norm(fraction, conv_pruned, dense_pruned):
  params, state = _hand_built()
  wrapped = optax.chain(optax.clip_by_global_norm(1.0), dl.dessilbi(0.1)).init(params)
  wrapped = (wrapped[0], state)
  for opt_state in (state, wrapped):
    pruned = dl.prune_by_order(params, opt_state, fraction)
    conv_kept = np.ones(6, bool)
    conv_kept[conv_pruned] = False
    np.testing.assert_array_equal(pruned['conv'], np.where(conv_kept, params['conv'], 0))
    dense_kept = np.ones((2, 3), bool)
    dense_kept[tuple(zip(*dense_pruned))] = False
    np.testing.assert_array_equal(pruned['dense'], np.where(dense_kept, params['dense'], 0))
    np.testing.assert_array_equal(pruned['bias'], params['bias'])
  only_conv = dl.prune_by_order(params, state, fraction, leaves=['conv'])
  np.testing.assert_array_equal(only_conv['dense'], params['dense'])
  np.testing.assert_array_equal(only_conv['conv'], pruned['conv'])


def test_summary_and_sparse_params_of_a_hand_built_state():
  params, state = _hand_built()
  assert dl.sparsity_summary(params, state) == {
      'bias': dict(kind=None, groups=0, groups_in_support=0, weights=3, weights_kept=3),
      'conv': dict(kind='filter', groups=6, groups_in_support=4, weights=12, weights_kept=8),
      'dense': dict(kind='lasso', groups=6, groups_in_support=4, weights=6, weights_kept=4),
  }
  sparse = dl.sparse_params(params, state)
  np.testing.assert_array_equal(sparse['conv'][..., [1, 5]], 0)
  np.testing.assert_array_equal(sparse['conv'][..., [0, 2, 3, 4]], params['conv'][..., [0, 2, 3, 4]])
  np.testing.assert_array_equal(sparse['dense'], np.float32([[0.5, 0.0, -0.7], [1.0, 0.0, 1.0]]))
  np.testing.assert_array_equal(sparse['bias'], params['bias'])


def test_helpers_reject_bad_input():
  params, state = _hand_built()
  with pytest.raises(ValueError, match=r'`fraction` must be in \[0, 1\]'):
    dl.prune_by_order(params, state, 1.5)
  with pytest.raises(ValueError, match=r"`leaves` names \['bias'\], which are not structured leaves"):
    dl.prune_by_order(params, state, 0.5, leaves=['bias'])
  with pytest.raises(ValueError, match='No DessiLBI state found'):
    dl.gamma(optax.sgd(0.1).init(params))
  twice = optax.chain(dl.dessilbi(0.1), dl.dessilbi(0.1)).init(params)
  with pytest.raises(ValueError, match='updated by 2 DessiLBI transformations'):
    dl.support(twice)


def test_replicated_state_gets_a_clear_error():
  params = {'conv': {'kernel': jnp.ones((3, 3, 1, 4))}}
  state = dl.dessilbi(0.1).init(params)
  replicated = jax.tree.map(lambda x: jnp.stack([x, x]), state)
  with pytest.raises(ValueError, match='one replica'):
    dl.sparsity_summary(params, replicated)


def test_apply_if_finite_skips_nan_gradients_and_keeps_the_path():
  """The documented guard against NaN gradients: optax.apply_if_finite around dl.dessilbi."""
  params = {'conv': {'kernel': jnp.ones((3, 3, 1, 4))}}
  tx = optax.apply_if_finite(dl.dessilbi(0.5, mu=1.0, lambdas=0.01), max_consecutive_errors=3)
  state = tx.init(params)
  good = {'conv': {'kernel': jnp.full((3, 3, 1, 4), 0.1)}}
  updates, state = tx.update(good, state, params)
  params = optax.apply_updates(params, updates)
  gamma_before = dl.gamma(state)['conv']['kernel']
  assert bool(jnp.all(gamma_before != 0))                      # the step did move Γ
  bad = {'conv': {'kernel': jnp.full((3, 3, 1, 4), jnp.nan)}}
  updates, state = tx.update(bad, state, params)
  assert jnp.all(updates['conv']['kernel'] == 0)               # the step is skipped ...
  assert jnp.array_equal(dl.gamma(state)['conv']['kernel'], gamma_before)   # ... and Γ is untouched
  assert int(state.notfinite_count) == 1
  assert bool(jnp.all(jnp.isfinite(dl.z(state)['conv']['kernel'])))


def test_nonzero_summary_counts_the_zeros_of_w():
  kernel = np.ones((3, 3, 2, 4), np.float32)
  kernel[..., 1] = 0          # filter 1 removed
  kernel[0, 0, 0, 2] = 0      # one weight of filter 2: the filter stays
  dense = np.array([[1.0, 0.0, 2.0], [0.0, 0.0, 3.0]], np.float32)
  params = {'conv': {'kernel': kernel, 'bias': np.zeros(4, np.float32)}, 'dense': {'kernel': dense}}
  summary = dl.nonzero_summary(params)
  assert summary['conv/kernel'] == dict(kind='filter', groups=4, groups_in_support=3, weights=72, weights_kept=53)
  assert summary['dense/kernel'] == dict(kind='lasso', groups=6, groups_in_support=3, weights=6, weights_kept=3)
  assert summary['conv/bias'] == dict(kind=None, groups=0, groups_in_support=0, weights=4, weights_kept=4)
  by_neuron = dl.nonzero_summary(params, {'dense/kernel': 'neuron'})['dense/kernel']
  assert (by_neuron['groups'], by_neuron['groups_in_support']) == (3, 2)


def test_a_nan_state_is_reported_as_not_finite():
  """One NaN gradient step in a user's own loop (no apply_if_finite): Γ holds NaN, which counts as
  non-zero, while the entry steps say the groups never entered. The summary says what happened."""
  params = {'conv': {'kernel': jnp.ones((3, 3, 1, 4)), 'bias': jnp.zeros(4)}}
  tx = dl.dessilbi(0.5, mu=1.0, lambdas=0.01)
  state = tx.init(params)
  bad = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), params)
  for grads in (bad, params):   # the NaN reaches W, then Z and Γ
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert bool(jnp.all(jnp.isnan(dl.gamma(state)['conv']['kernel'])))
  for helper in (dl.sparsity_summary, lambda p, s: dl.prune_by_order(p, s, 0.5)):
    with pytest.raises(ValueError, match=r"Γ of leaf 'conv/kernel' holds 36 NaN or infinite values.*apply_if_finite"):
      helper(params, state)
