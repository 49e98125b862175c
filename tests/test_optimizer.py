"""Tests of `dl.dessilbi`: a plain NumPy reference of docs/ALGORITHM.md, the path, and the optax battery."""

import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dessilbi_jax as dl
import reference
from dessilbi_jax.core import cpu_schedule
from dessilbi_jax.core import prox

# ----------------------------------------------------------------------------------------------
# A LeNet-shaped parameter tree (plus an attention projection for `head`) and random gradients.

_SHAPES = {
    'Conv_0': {'kernel': (5, 5, 1, 6), 'bias': (6,)},
    'Conv_1': {'kernel': (5, 5, 6, 16), 'bias': (16,)},
    'Dense_0': {'kernel': (400, 120), 'bias': (120,)},
    'Dense_1': {'kernel': (120, 84), 'bias': (84,)},
    'Dense_2': {'kernel': (84, 10), 'bias': (10,)},
    'Attention': {'query': (16, 4, 8)},
}
# Every kind, and a 2-D leaf without structure (it still gets weight decay).
_EVERY_KIND = {
    'Conv_0/kernel': 'lasso', 'Conv_1/kernel': 'filter', 'Dense_0/kernel': 'neuron',
    'Dense_1/kernel': 'input', 'Dense_2/kernel': None, 'Attention/query': 'head',
}


def _flat(tree, prefix=''):
  """{'a/b': leaf} for a nested dict (None leaves kept)."""
  out = {}
  for key, value in tree.items():
    path = f'{prefix}{key}'
    if isinstance(value, dict):
      out.update(_flat(value, path + '/'))
    else:
      out[path] = value
  return out


def _nest(flat):
  tree = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split('/')
    for parent in parents:
      node = node.setdefault(parent, {})
    node[leaf] = value
  return tree


def _lenet_problem(seed=0, steps=50, grad_scale=0.02, shapes=None):
  """Params (float32) and a list of random gradients.

  Each axis of a weight has its own random scale in [0.4, 1], so the groups along any axis differ
  in norm and enter Γ's support at different steps.
  """
  rng = np.random.default_rng(seed)
  flat_shapes = _flat(shapes or _SHAPES)
  params = {}
  for path, shape in flat_shapes.items():
    scale = 0.5
    for axis, size in enumerate(shape):
      scale = scale * rng.uniform(0.4, 1.0, size=size).reshape([-1 if a == axis else 1 for a in range(len(shape))])
    params[path] = (2 * rng.normal(size=shape) * scale).astype(np.float32)
  grads = [{path: (grad_scale * rng.normal(size=shape)).astype(np.float32)
            for path, shape in flat_shapes.items()} for _ in range(steps)]
  return params, grads


def _kinds(params, groups):
  """The kinds the reference uses: the default rule of docs/ALGORITHM.md, overridden by ``groups``."""
  default = {4: 'filter', 3: 'filter', 2: 'lasso'}
  kinds = {path: default.get(w.ndim) for path, w in params.items()}
  kinds.update(groups or {})
  return kinds


def _library_run(tx, params, grads, jit_kwargs=None):
  """Runs ``tx`` under jax.jit; returns the final params and state."""

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step, **(jit_kwargs or {}))
  params = _nest({p: jnp.asarray(w) for p, w in params.items()})
  state = tx.init(params)
  for g in grads:
    params, state = step(params, state, _nest(g))
  return params, state


def _step_hyper(hyper):
  return {name: value for name, value in hyper.items() if name != 'groups'}


def _reference_run(params, grads, **hyper):
  kinds = _kinds(params, hyper.get('groups'))
  state = reference.dessilbi_init(params, kinds)
  for g in grads:
    state = reference.dessilbi_step(state, g, kinds=kinds, **_step_hyper(hyper))
  return state


def _assert_matches_reference(params, state, ref, rtol=2e-5, atol=2e-5):
  assert int(state.count) == ref['count']
  flat_params, b, z, gam, scale, entry = (_flat(t) for t in (
      params, state.trace, state.z, state.gamma, state.gamma_scale, state.entry_step))
  for path, w in ref['w'].items():
    np.testing.assert_allclose(flat_params[path], w, rtol=rtol, atol=atol, err_msg=f'W {path}')
    np.testing.assert_allclose(b[path], ref['b'][path], rtol=rtol, atol=atol, err_msg=f'b {path}')
    if path not in ref['z']:
      assert z[path] is None and gam[path] is None and entry[path] is None, path
      continue
    np.testing.assert_allclose(z[path], ref['z'][path], rtol=rtol, atol=atol, err_msg=f'Z {path}')
    np.testing.assert_allclose(gam[path], ref['gamma'][path], rtol=rtol, atol=atol, err_msg=f'Γ {path}')
    assert entry[path].dtype == jnp.int32 and entry[path].shape == ref['entry'][path].shape, path
    np.testing.assert_array_equal(entry[path], ref['entry'][path], err_msg=f'entry step {path}')
    if entry[path].shape == z[path].shape:   # lasso: one group per weight, no per-group scale
      assert scale[path] is None, path
    else:   # Γ_g = s_g·Z_g to the bit: the Z update rebuilds Γ_k from the per-group scale
      assert scale[path].shape == entry[path].shape, path
      np.testing.assert_array_equal(np.asarray(z[path]) * np.asarray(scale[path]), gam[path], err_msg=f's {path}')


def _assert_some_but_not_all_entered(ref):
  """Every structured leaf has groups in Γ's support and groups outside it, entered at many steps."""
  for path, entry in ref['entry'].items():
    entered = np.count_nonzero(entry > 0)
    assert 0 < entered < entry.size, f'{path}: {entered} of {entry.size} groups entered'
  steps = np.unique(np.concatenate([e[e > 0] for e in ref['entry'].values()]))
  assert len(steps) >= 10, f'groups entered at only {steps}'


# λ per kind that let some but not all groups of each leaf enter within 50 steps
# (entry after about λ·ν / (α·‖W_g‖) steps).
_LAMBDAS = {'lasso': 0.1, 'filter': 0.8, 'neuron': 3.5, 'input': 1.8, 'head': 1.5}
_LAMBDAS_NORMALIZED = {'lasso': 0.1, 'filter': 0.1, 'neuron': 0.17, 'input': 0.19, 'head': 0.13}
_HYPER = dict(alpha=0.1, kappa=1.0, mu=10.0, momentum=0.9, nesterov=False, weight_decay=0.0,
              lambdas=_LAMBDAS, normalize=False, groups=None)

REFERENCE_CASES = {
    'plain': dict(momentum=0.0),
    'momentum_weight_decay': dict(weight_decay=0.005),
    'nesterov': dict(nesterov=True),
    'nesterov_weight_decay': dict(nesterov=True, weight_decay=0.005),
    'every_kind': dict(groups=_EVERY_KIND, weight_decay=0.005),
    'every_kind_normalized': dict(groups=_EVERY_KIND, normalize=True, nesterov=True, kappa=2.0,
                                  lambdas=_LAMBDAS_NORMALIZED),
}


def _hyper(**overrides):
  return dict(_HYPER, **overrides)


def _library_tx(hyper):
  return dl.dessilbi(
      hyper['alpha'], kappa=hyper['kappa'], mu=hyper['mu'], momentum=hyper['momentum'],
      nesterov=hyper['nesterov'], weight_decay=hyper['weight_decay'], groups=hyper['groups'],
      lambdas=hyper['lambdas'], normalize_groups=hyper['normalize'])


@pytest.mark.parametrize('case', REFERENCE_CASES)
def test_matches_reference(case):
  hyper = _hyper(**REFERENCE_CASES[case])
  params, grads = _lenet_problem()
  final_params, state = _library_run(_library_tx(hyper), params, grads)
  ref = _reference_run(params, grads, **hyper)
  _assert_some_but_not_all_entered(ref)
  _assert_matches_reference(final_params, state, ref)


def test_matches_reference_past_the_sequencing_threshold():
  """Two leaves of 2¹⁸ weights or more (updated one after the other on the CPU) among small ones."""
  shapes = {'Conv_big': {'kernel': (3, 3, 64, 512)}, 'Dense_big': {'kernel': (512, 512)}, **_SMALL_SHAPES}
  assert min(np.prod(s['kernel']) for k, s in shapes.items() if k.endswith('big')) >= cpu_schedule.SEQUENTIAL_MIN_SIZE
  hyper = _hyper(mu=2.0, weight_decay=0.005, lambdas={'lasso': 0.2, 'filter': 4.0})
  params, grads = _lenet_problem(steps=15, shapes=shapes)
  final_params, state = _library_run(_library_tx(hyper), params, grads)
  ref = _reference_run(params, grads, **hyper)
  for path in ('Conv_big/kernel', 'Dense_big/kernel'):
    entered = np.count_nonzero(ref['entry'][path] > 0)
    assert 0 < entered < ref['entry'][path].size, (path, entered)
  _assert_matches_reference(final_params, state, ref)


def test_lasso_leaves_rebuild_gamma_to_the_bit():
  """With fixed κ and λ the Z update recomputes Γ_k = κ·prox_λ(Z_k) on lasso leaves instead of
  reading Γ: the stored Γ must be exactly that, step after step (κ = 2 so the product matters)."""
  hyper = _hyper(kappa=2.0, lambdas={'lasso': 0.1, 'filter': 0.8})
  params, grads = _lenet_problem(steps=30)
  _, state = _library_run(_library_tx(hyper), params, grads)
  z, gam, kinds = _flat(state.z), _flat(state.gamma), _kinds(params, None)
  lasso = [path for path, kind in kinds.items() if kind == 'lasso']
  assert lasso
  for path in lasso:
    rebuilt, _ = prox.shrink_groups(z[path], 'lasso', jnp.abs(z[path]), 0.1, 2.0)
    assert np.count_nonzero(gam[path]) > 0, path
    np.testing.assert_array_equal(rebuilt, gam[path], err_msg=path)


def test_large_leaves_in_sequence_give_the_same_numbers(monkeypatch):
  """The edges that update large leaves one after another add exact zeros (compared at size 1)."""
  hyper = _hyper(**REFERENCE_CASES['every_kind'])
  params, grads = _lenet_problem(steps=20)
  side_by_side = _library_run(_library_tx(hyper), params, grads)
  monkeypatch.setattr(cpu_schedule, 'SEQUENTIAL_MIN_SIZE', 1)
  in_sequence = _library_run(_library_tx(hyper), params, grads)
  for a, b in zip(jax.tree.leaves(side_by_side), jax.tree.leaves(in_sequence)):
    np.testing.assert_array_equal(a, b)


# Past the sequencing threshold (2¹⁸ weights: updated one after the other) and below it.
_EDGE_SHAPES = {'big_conv': (3, 3, 128, 256), 'big_dense': (512, 512), 'conv': (3, 3, 4, 8),
                'dense': (16, 8), 'neuron': (16, 8), 'bias': (8,)}


def _non_finite_cases():
  """(name, where, {leaf: value put in its first row}): NaN, ±inf, and rows of ±3e38 (inf − inf)."""
  huge = lambda n: np.resize([3e38, 3e38, -3e38, -3e38], n)
  cases = []
  for where in ('grads', 'params'):
    for name, value in (('nan', np.nan), ('inf', np.inf), ('-inf', -np.inf), ('±3e38', None)):
      cases.append((f'{name} in {where}', where, {leaf: value for leaf in ('big_conv', 'conv', 'dense')}, huge))
  return cases


def test_non_finite_values_give_the_numbers_of_the_edge_free_update():
  """With the CPU ordering edges, every output equals the plain update's to the bit, NaN and inf in
  exactly the same entries: a NaN in one leaf stays where the equations put it (it neither zeroes
  the leaf's Γ through a NaN λ nor reaches the next large leaf)."""
  assert np.prod(_EDGE_SHAPES['big_dense']) >= cpu_schedule.SEQUENTIAL_MIN_SIZE
  assert np.prod(_EDGE_SHAPES['conv']) < cpu_schedule.SEQUENTIAL_MIN_SIZE
  rng = np.random.default_rng(0)
  params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in _EDGE_SHAPES.items()}
  grads = [{k: jnp.asarray(0.05 * rng.normal(size=s), jnp.float32) for k, s in _EDGE_SHAPES.items()}
           for _ in range(4)]
  hyper = dict(mu=2.0, lambdas={'lasso': 0.05, 'filter': 0.8, 'neuron': 0.3}, groups={'neuron': 'neuron'})
  txs = {edges: dl.dessilbi(0.5, ordering_edges=edges, **hyper) for edges in (True, False)}

  def step(tx):
    def f(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state
    return jax.jit(f)

  steps = {edges: step(tx) for edges, tx in txs.items()}
  warm = (params, txs[True].init(params))
  for g in grads[:2]:   # some groups in Γ's support first
    warm = steps[False](*warm, g)
  assert any(bool(np.any(e > 0)) for e in jax.tree.leaves(warm[1].entry_step))
  for name, where, bad, huge in _non_finite_cases():
    runs = {}
    for edges in (True, False):
      p, s = warm
      for k, g in enumerate(grads[2:]):
        if k == 0:   # one bad step, then a finite one
          target = dict(g) if where == 'grads' else dict(p)
          for leaf, value in bad.items():
            x = np.array(target[leaf])
            row = x[(0,) * (x.ndim - 1)]
            row[:] = huge(row.size) if value is None else np.where(np.arange(row.size) == 1, value, row)
            target[leaf] = jnp.asarray(x)
          g, p = (target, p) if where == 'grads' else (g, target)
        p, s = steps[edges](p, s, g)
      runs[edges] = (p, s)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(runs[True])[0], jax.tree.leaves(runs[False])):
      np.testing.assert_array_equal(a, b, err_msg=f'{name}: {jax.tree_util.keystr(path)}')
    # Not vacuous: the bad values reached the outputs, and the next large leaf stayed finite.
    assert any(not bool(jnp.all(jnp.abs(x) < 1e37)) for x in jax.tree.leaves(runs[False])), name
    assert bool(jnp.all(jnp.isfinite(runs[False][1].gamma['big_dense']))), name


# ----------------------------------------------------------------------------------------------
# The path on problems whose answer is known.


def test_inverse_scale_space_on_sparse_linear_regression():
  """Full-batch least squares: the true features enter Γ first, and the late path fits the data."""
  n, p, sigma = 200, 20, 0.5
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, p)).astype(np.float32)
  true_support = np.array([3, 7, 11, 16])
  beta = np.zeros(p, np.float32)
  beta[true_support] = [4.0, -3.0, 2.0, -1.5]
  y = (x @ beta + sigma * rng.normal(size=n)).astype(np.float32)
  loss = lambda params: 0.5 * jnp.mean((x @ params['w'][:, 0] - y) ** 2)
  tx = dl.dessilbi(0.01, kappa=10.0, mu=1.0, momentum=0.0)   # 2-D leaf: lasso, λ = 1

  def step(carry, _):
    params, state = carry
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
    return (params, state), dl.support(state)['w'][:, 0]

  params = {'w': jnp.zeros((p, 1))}
  run = jax.jit(lambda carry: jax.lax.scan(step, carry, length=3000))
  (params, state), supports = run((params, tx.init(params)))

  entry = np.asarray(dl.entry_step(state)['w'][:, 0])
  null = np.setdiff1d(np.arange(p), true_support)
  assert np.all(entry[true_support] > 0)
  first_null = np.min(np.where(entry[null] < 0, np.iinfo(np.int32).max, entry[null]))
  assert np.max(entry[true_support]) < first_null, entry
  # The support equals the true support for a long stretch of the path.
  exact = np.all(np.asarray(supports) == np.isin(np.arange(p), true_support), axis=1)
  assert exact.sum() >= 1000, exact.sum()
  # The late path fits the data as well as least squares does, and Γ estimates β.
  residual = np.sqrt(2 * float(loss(params)))
  least_squares = np.sqrt(np.mean((x @ np.linalg.lstsq(x, y, rcond=None)[0] - y) ** 2))
  assert residual <= 1.02 * least_squares, (residual, least_squares)
  np.testing.assert_allclose(dl.gamma(state)['w'][true_support, 0], beta[true_support], atol=0.1)


@pytest.mark.parametrize('momentum', [0.0, 0.9])
def test_converges_to_a_critical_point_of_the_coupled_loss(momentum):
  """On a strongly convex quadratic L with minimizer c, the iterates reach a critical point of
  L̄(W, Γ) = L(W) + ‖W − Γ‖²/(2ν): ‖∇_W L̄‖∞ ≤ 1e-4, Γ a fixed point of the step (moves ≤ 1e-5),
  and there W = Γ = c."""
  rng = np.random.default_rng(1)
  shapes = {'conv': (2, 2, 1, 3), 'dense': (4, 3), 'bias': (3,)}
  target = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  target['conv'][..., 2] = 0.0
  target['dense'][:, 1] = 0.0
  size = sum(int(np.prod(s)) for s in shapes.values())
  m = rng.normal(size=(size, size))
  hessian = (m @ m.T / size + 0.5 * np.eye(size)).astype(np.float32)   # eigenvalues in [0.5, 4]

  def loss(params):
    v = jnp.concatenate([(params[k] - target[k]).ravel() for k in sorted(shapes)])
    return 0.5 * v @ hessian @ v

  mu = 1.0
  tx = dl.dessilbi(0.05, kappa=2.0, mu=mu, momentum=momentum, groups={'dense': 'neuron'}, lambdas=0.5)

  def step(carry, _):
    params, state = carry
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return (optax.apply_updates(params, updates), state), None

  params = {k: jnp.zeros(s) for k, s in shapes.items()}
  run = jax.jit(lambda carry: jax.lax.scan(step, carry, length=1000))
  (params, state), _ = run((params, tx.init(params)))

  grads = jax.grad(loss)(params)
  gam = dl.gamma(state)
  for k in shapes:
    coupled = grads[k] if gam[k] is None else grads[k] + (params[k] - gam[k]) / mu
    assert float(jnp.max(jnp.abs(coupled))) <= 1e-4, k
    np.testing.assert_allclose(params[k], target[k], atol=1e-4)
  _, next_state = tx.update(grads, state, params)
  for k in ('conv', 'dense'):
    np.testing.assert_allclose(dl.gamma(next_state)[k], gam[k], atol=1e-5)
    np.testing.assert_allclose(gam[k], target[k], atol=1e-4)
    assert np.all(np.asarray(dl.support(state)[k])[target[k] != 0]), k


# ----------------------------------------------------------------------------------------------
# The optax battery, on a small tree.

_SMALL_SHAPES = {
    'Conv_0': {'kernel': (3, 3, 2, 8), 'bias': (8,)},
    'Dense_0': {'kernel': (32, 10), 'bias': (10,)},
}


def _small_problem(steps=20, grad_scale=0.02, seed=0):
  return _lenet_problem(seed=seed, steps=steps, grad_scale=grad_scale, shapes=_SMALL_SHAPES)


def test_learning_rate_schedule_matches_reference():
  schedule = optax.linear_schedule(0.3, 0.02, transition_steps=20)
  hyper = _hyper(alpha=schedule, mu=2.0, lambdas={'lasso': 0.2, 'filter': 0.8})
  params, grads = _small_problem()
  final_params, state = _library_run(_library_tx(hyper), params, grads)
  ref = _reference_run(params, grads, **hyper)
  _assert_some_but_not_all_entered(ref)
  _assert_matches_reference(final_params, state, ref)


def test_inject_hyperparams_follows_changes_of_the_state():
  """Numbers changed in the injected state at step 10 change the path as the reference does."""
  params, grads = _small_problem()
  before = _hyper(alpha=0.1, kappa=1.0, mu=2.0, momentum=0.9, weight_decay=0.005, lambdas=0.4, normalize=True)
  after = dict(before, alpha=0.2, kappa=2.0, mu=1.0, momentum=0.5, lambdas=0.2)
  tx = optax.inject_hyperparams(dl.dessilbi)(
      learning_rate=0.1, kappa=1.0, mu=2.0, momentum=0.9, weight_decay=0.005, lambdas=0.4,
      normalize_groups=True)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  lib_params = _nest({p: jnp.asarray(w) for p, w in params.items()})
  state = tx.init(lib_params)
  kinds = _kinds(params, None)
  ref = unchanged = reference.dessilbi_init(params, kinds)
  for k, g in enumerate(grads):
    if k == 10:
      state.hyperparams.update({name: jnp.asarray(value, jnp.float32) for name, value in dict(
          learning_rate=0.2, kappa=2.0, mu=1.0, momentum=0.5, lambdas=0.2).items()})
    lib_params, state = step(lib_params, state, _nest(g))
    ref = reference.dessilbi_step(ref, g, kinds=kinds, **_step_hyper(after if k >= 10 else before))
    unchanged = reference.dessilbi_step(unchanged, g, kinds=kinds, **_step_hyper(before))
  _assert_some_but_not_all_entered(ref)
  _assert_matches_reference(lib_params, state.inner_state, ref)
  # Not vacuous: the change moved the path.
  assert np.max(np.abs(ref['w']['Conv_0/kernel'] - unchanged['w']['Conv_0/kernel'])) > 0.1
  assert np.any(ref['entry']['Dense_0/kernel'] != unchanged['entry']['Dense_0/kernel'])


def test_chained_with_clip_by_global_norm_matches_reference():
  params, grads = _small_problem(grad_scale=0.2)
  hyper = _hyper(mu=2.0, lambdas={'lasso': 0.2, 'filter': 0.8})
  tx = optax.chain(optax.clip_by_global_norm(1.0), _library_tx(hyper))
  final_params, state = _library_run(tx, params, grads)
  norms = [np.sqrt(sum(np.sum(np.square(x, dtype=np.float64)) for x in g.values())) for g in grads]
  assert min(norms) > 1.5   # clipping acts on every step
  clipped = [{p: x / n for p, x in g.items()} for g, n in zip(grads, norms)]
  ref = _reference_run(params, clipped, **hyper)
  _assert_some_but_not_all_entered(ref)
  _assert_matches_reference(final_params, state[1], ref)


def _small_params(dtype=jnp.float32):
  params, grads = _small_problem(steps=3)
  cast = lambda tree: _nest({p: jnp.asarray(x, dtype) for p, x in tree.items()})
  return cast(params), [cast(g) for g in grads]


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize('state_dtype', [None, jnp.float32])
def test_dtypes_follow_params_unless_state_dtype_is_given(dtype, state_dtype):
  params, grads = _small_params(dtype)
  tx = dl.dessilbi(0.1, mu=2.0, lambdas={'lasso': 0.1, 'filter': 0.4}, state_dtype=state_dtype)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for g in grads:
    updates, state = step(g, state, params)
    chex.assert_trees_all_equal_dtypes(updates, params)
    params = optax.apply_updates(params, updates)
  chex.assert_trees_all_equal_dtypes(params, grads[0])
  expected = state_dtype or dtype
  for field in (state.trace, state.z, state.gamma):
    assert {x.dtype for x in jax.tree.leaves(field)} == {jnp.dtype(expected)}
  assert {x.dtype for x in jax.tree.leaves(state.entry_step)} == {jnp.dtype(jnp.int32)}


_LOW_PRECISION_HYPER = _hyper(mu=2.0, lambdas={'lasso': 0.1, 'filter': 0.6})


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize('state_dtype', [None, jnp.float32])
def test_low_precision_matches_reference_within_its_epsilon(dtype, state_dtype):
  """bf16/f16 params, state in their dtype or float32, against the float64 reference that rounds W
  (and the state) to the same dtype after each step: every value within 4·eps of its leaf's scale,
  after 30 steps in which conv filters and single weights enter Γ's support."""
  params, grads = _small_problem(steps=30)
  cast = lambda tree: {p: np.asarray(x).astype(dtype) for p, x in tree.items()}
  params, grads = cast(params), [cast(g) for g in grads]
  tx = dl.dessilbi(0.1, mu=2.0, lambdas=_LOW_PRECISION_HYPER['lambdas'], state_dtype=state_dtype)
  final_params, state = _library_run(tx, params, grads)
  ref = _reference_run({p: x.astype(np.float64) for p, x in params.items()},
                       [{p: x.astype(np.float64) for p, x in g.items()} for g in grads], **_LOW_PRECISION_HYPER,
                       param_dtype=np.dtype(dtype), state_dtype=None if state_dtype else np.dtype(dtype))
  _assert_some_but_not_all_entered(ref)
  eps = float(jnp.finfo(dtype).eps)
  got = {'W': _flat(final_params), 'Z': _flat(state.z), 'Γ': _flat(state.gamma), 'b': _flat(state.trace)}
  for name, key in (('W', 'w'), ('Z', 'z'), ('Γ', 'gamma'), ('b', 'b')):
    for path, expected in ref[key].items():
      np.testing.assert_allclose(np.asarray(got[name][path], np.float64), expected, rtol=0,
                                 atol=4 * eps * np.max(np.abs(expected)), err_msg=f'{name} {path}')
  entry = _flat(state.entry_step)
  np.testing.assert_array_equal(entry['Conv_0/kernel'], ref['entry']['Conv_0/kernel'])
  # A single weight enters when |Z| > λ: within rounding of λ the step can differ, for a few.
  assert np.mean(entry['Dense_0/kernel'] != ref['entry']['Dense_0/kernel']) <= 0.03


@pytest.mark.parametrize('store_gamma', [True, False])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16, jnp.float16])
def test_z_update_reads_the_stored_gamma(dtype, store_gamma):
  """One Γ_k for both halves of the step: Z_{k+1} is Z_k + α·((W_k − Γ_k)/ν) with the stored Γ_k to
  the bit, on lasso leaves (Γ_k rebuilt from Z_k) as on filter leaves (s_k·Z_k), in every dtype.

  The rebuilt Γ_k must be rounded before W_k − Γ_k reads it: a fused multiply-add of W − Z·s
  (float32 on any CPU with FMA; float16 on CPUs with AVX512-FP16, e.g. Intel Sapphire Rapids, but
  not on AMD EPYC, where LLVM computes float16 in float32 and rounds every product; bfloat16 never on
  the CPU, where XLA rounds every product) is off by an ulp now and then. The reference is the
  expression itself, jitted, with Γ_k a buffer: the same compiler contracts its tail the same way.
  A lean state's Z must follow the same rule (its Γ_k is the stored state's, rebuilt)."""
  params, grads = _small_problem(steps=20)
  cast = lambda tree: _nest({p: jnp.asarray(x, dtype) for p, x in tree.items()})
  params, grads = cast(params), [cast(g) for g in grads]
  tx = dl.dessilbi(0.1, kappa=2.0, mu=2.0, lambdas={'lasso': 0.1, 'filter': 0.6}, store_gamma=store_gamma)
  step = jax.jit(tx.update)
  z_update = jax.jit(lambda z, w, gam: z + 0.1 * ((w - gam) / 2.0))
  state = tx.init(params)
  for g in grads:
    updates, new_state = step(g, state, params)
    for layer in ('Conv_0', 'Dense_0'):
      expected = z_update(state.z[layer]['kernel'], params[layer]['kernel'], dl.gamma(state)[layer]['kernel'])
      np.testing.assert_array_equal(new_state.z[layer]['kernel'], expected, err_msg=layer)
    params, state = optax.apply_updates(params, updates), new_state
  assert all(bool(jnp.any(s)) for s in jax.tree.leaves(dl.support(state)))


@pytest.mark.parametrize('make', ['plain', 'injected'])
def test_state_is_stable_and_the_step_compiles_once(make):
  if make == 'plain':
    tx = dl.dessilbi(0.1, mu=2.0, lambdas=0.3)
  else:
    tx = optax.inject_hyperparams(dl.dessilbi)(learning_rate=0.1, mu=2.0, lambdas=0.3)
  params, grads = _small_params()

  traces = []

  @jax.jit
  def step(params, state, grads):
    traces.append(1)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  initial = state = tx.init(params)
  for k, g in enumerate(grads):
    if make == 'injected' and k == 1:
      state.hyperparams['lambdas'] = jnp.asarray(0.1, jnp.float32)   # a new value, no new trace
    params, state = step(params, state, g)
    chex.assert_trees_all_equal_structs(initial, state)
    chex.assert_trees_all_equal_shapes_and_dtypes(initial, state)
  assert len(traces) == 1 and step._cache_size() == 1


def test_buffer_donation_gives_the_same_numbers():
  params, grads = _small_problem()
  tx = dl.dessilbi(0.1, mu=2.0, lambdas={'lasso': 0.2, 'filter': 0.8}, weight_decay=0.005)
  plain_params, plain_state = _library_run(tx, params, grads)
  donated_params, donated_state = _library_run(tx, params, grads, jit_kwargs=dict(donate_argnums=(0, 1)))
  chex.assert_trees_all_equal((plain_params, plain_state), (donated_params, donated_state))


def test_donated_buffers_are_consumed():
  params, grads = _small_params()
  tx = dl.dessilbi(0.1)
  state = tx.init(params)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step, donate_argnums=(0, 1))
  new_params, new_state = step(params, state, grads[0])
  assert all(x.is_deleted() for x in jax.tree.leaves((params, state)))
  assert not any(x.is_deleted() for x in jax.tree.leaves((new_params, new_state)))


_PMAP_SCRIPT = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np, optax
    import dessilbi_jax as dl
    assert jax.local_device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    params = {'conv': jnp.asarray(rng.normal(size=(3, 3, 2, 8)), jnp.float32),
              'dense': jnp.asarray(rng.normal(size=(16, 4)), jnp.float32),
              'bias': jnp.zeros(4)}
    tx = dl.dessilbi(0.1, mu=2.0, lambdas={'lasso': 0.2, 'filter': 0.8}, weight_decay=0.005)

    def update(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    pmapped = jax.pmap(lambda p, s, g: update(p, s, jax.lax.pmean(g, 'devices')), axis_name='devices')
    single = jax.jit(update)
    replicate = lambda tree: jax.tree.map(lambda x: jnp.stack([x] * 4), tree)
    p_params, p_state = replicate(params), replicate(tx.init(params))
    s_params, s_state = params, tx.init(params)
    for _ in range(10):
      grads = {k: jnp.asarray(rng.normal(size=(4, *v.shape)), jnp.float32) for k, v in params.items()}
      p_params, p_state = pmapped(p_params, p_state, grads)
      s_params, s_state = single(s_params, s_state, jax.tree.map(lambda g: g.mean(0), grads))
    for x in jax.tree.leaves((p_params, p_state)):
      x = np.asarray(x)
      assert all(np.array_equal(x[i], x[0]) for i in range(4)), 'replicas differ'
    entered = int(sum(np.sum(np.asarray(e)[0] > 0) for e in jax.tree.leaves(p_state.entry_step)))
    assert entered > 0, 'no group entered'
    for p, s in zip(jax.tree.leaves((p_params, p_state)), jax.tree.leaves((s_params, s_state))):
      np.testing.assert_allclose(np.asarray(p)[0], s, rtol=1e-5, atol=1e-5)
    print('replicas identical; groups entered:', entered)
''')


def _run_on_four_host_devices(script: str) -> str:
  """Runs ``script`` in a fresh Python with 4 host devices (set before jax starts); its stdout."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu')
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [repo, env.get('PYTHONPATH')]))
  result = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_pmap_keeps_replicated_state_identical():
  """Four host devices (in a subprocess), gradients averaged by pmean."""
  assert 'replicas identical' in _run_on_four_host_devices(_PMAP_SCRIPT)


_SHARDED_SCRIPT = textwrap.dedent('''
    import re
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import dessilbi_jax as dl
    from dessilbi_jax.core import cpu_schedule
    cpu_schedule.SEQUENTIAL_MIN_SIZE = 1   # the edges between leaves too
    mesh = Mesh(jax.devices(), ('d',))
    rng = np.random.default_rng(0)
    params = {'conv': jnp.asarray(rng.normal(size=(3, 3, 8, 16)), jnp.float32),     # sharded over filters
              'dense': jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),         # sharded over inputs
              'bias': jnp.zeros(8)}
    specs = {'conv': P(None, None, None, 'd'), 'dense': P('d', None), 'bias': P()}
    tx = dl.dessilbi(0.1, mu=2.0, lambdas={'lasso': 0.2, 'filter': 0.8})

    def shard(tree):   # every leaf of a param's shape gets that param's sharding
      by_shape = {params[k].shape: NamedSharding(mesh, specs[k]) for k in params}
      return jax.tree.map(lambda x: jax.device_put(jnp.copy(x), by_shape.get(x.shape, NamedSharding(mesh, P()))), tree)

    def update(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    sharded = jax.jit(update, donate_argnums=(0, 1))
    s_params, s_state = shard(params), shard(tx.init(params))
    grads = [{k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in params.items()} for _ in range(10)]
    hlo = sharded.lower(s_params, s_state, shard(grads[0])).compile().as_text()
    gathers = re.findall(r' all-gather[-\\w]*\\(', hlo)
    assert not gathers, f'{len(gathers)} all-gathers in the sharded update'
    r_params, r_state = params, tx.init(params)
    for g in grads:
      s_params, s_state = sharded(s_params, s_state, shard(g))
      r_params, r_state = jax.jit(update)(r_params, r_state, g)
    assert int(sum(np.sum(np.asarray(e) > 0) for e in jax.tree.leaves(r_state.entry_step))) > 0
    for a, b in zip(jax.tree.leaves((s_params, s_state)), jax.tree.leaves((r_params, r_state))):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    print('sharded update matches; no all-gather')

    # Without the edges (what GPU and TPU get by default) the update needs no communication at all.
    plain = dl.dessilbi(0.1, mu=2.0, lambdas={'lasso': 0.2, 'filter': 0.8}, ordering_edges=False)
    def plain_update(params, state, grads):
      updates, state = plain.update(grads, state, params)
      return optax.apply_updates(params, updates), state
    hlo = jax.jit(plain_update).lower(shard(params), shard(plain.init(params)), shard(grads[0])).compile().as_text()
    collectives = re.findall(r' (all-reduce|all-gather|collective-permute|all-to-all)[-\\w]*\\(', hlo)
    assert not collectives, f'collectives without edges: {collectives}'
    print('without edges: no collectives')

    # Sharding in types (AxisType.Explicit): init and update work, every state leaf sharded like its
    # param (per-group leaves along the group axis), the same numbers.
    from jax.sharding import AxisType
    explicit = jax.make_mesh((4,), ('d',), axis_types=(AxisType.Explicit,))
    padded = lambda spec, ndim: tuple(spec) + (None,) * (ndim - len(spec))

    def check_sharded_like_params(e_params, e_state):
      for k, w in e_params.items():
        assert padded(w.sharding.spec, w.ndim) == padded(specs[k], w.ndim), k
      for field in ('trace', 'z', 'gamma', 'gamma_scale', 'entry_step'):
        for k, x in getattr(e_state, field).items():
          if x is not None:   # the param's spec, with None on the axes a group spans
            expected = tuple(s if x.shape[i] == params[k].shape[i] else None
                             for i, s in enumerate(padded(specs[k], x.ndim)))
            assert padded(x.sharding.spec, x.ndim) == expected, (field, k, x.sharding)

    with jax.set_mesh(explicit):
      e_params = {k: jax.device_put(v, NamedSharding(explicit, specs[k])) for k, v in params.items()}
      for init in (tx.init, jax.jit(tx.init)):
        e_state = init(e_params)
        check_sharded_like_params(e_params, e_state)
      forced = dl.dessilbi(0.1, ordering_edges=True)
      try:
        forced.update(e_params, forced.init(e_params), e_params)
        raise AssertionError('ordering_edges=True under explicit sharding did not raise')
      except ValueError as e:
        assert 'ordering_edges=True needs params that are not sharded in their types' in str(e), e
      assert padded(e_state.entry_step['conv'].sharding.spec, 4) == (None, None, None, 'd')
      e_step = jax.jit(update)
      for g in grads:
        e_params, e_state = e_step(e_params, e_state, {k: jax.device_put(v, NamedSharding(explicit, specs[k]))
                                                       for k, v in g.items()})
      check_sharded_like_params(e_params, e_state)
    for a, b in zip(jax.tree.leaves((e_params, e_state)), jax.tree.leaves((r_params, r_state))):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    print('explicit sharding: state sharded like the params')

    # A lean state (store_gamma=False), sharded the same way: no all-gather, and the stored run's numbers;
    # under sharding in types too (its edge reads the step count, not a sharded buffer).
    lean = dl.dessilbi(0.1, mu=2.0, lambdas={'lasso': 0.2, 'filter': 0.8}, store_gamma=False)
    def lean_update(params, state, grads):
      updates, state = lean.update(grads, state, params)
      return optax.apply_updates(params, updates), state
    lean_step = jax.jit(lean_update, donate_argnums=(0, 1))
    l_params, l_state = shard(params), shard(lean.init(params))
    hlo = lean_step.lower(l_params, l_state, shard(grads[0])).compile().as_text()
    assert not re.findall(r' all-gather[-\\w]*\\(', hlo), 'all-gathers in the lean sharded update'
    for g in grads:
      l_params, l_state = lean_step(l_params, l_state, shard(g))
    for a, b in zip(jax.tree.leaves((s_params, s_state.z, s_state.entry_step, s_state.gamma)),
                    jax.tree.leaves((l_params, l_state.z, l_state.entry_step, dl.gamma(l_state)))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with jax.set_mesh(explicit):
      e_params = {k: jax.device_put(v, NamedSharding(explicit, specs[k])) for k, v in params.items()}
      e_lean = lean.init(e_params)
      for g in grads:
        e_params, e_lean = jax.jit(lean_update)(e_params, e_lean, {
            k: jax.device_put(v, NamedSharding(explicit, specs[k])) for k, v in g.items()})
      assert padded(e_lean.z['conv'].sharding.spec, 4) == (None, None, None, 'd')
    for a, b in zip(jax.tree.leaves((r_params, r_state.gamma)), jax.tree.leaves((e_params, dl.gamma(e_lean)))):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    print('lean state: sharded, the same numbers')
''')


def test_sharded_params_under_jit():
  """Params sharded over 4 host devices (FSDP-style): with the ordering edges they are scalar all-reduces,
  no all-gather; without them no collective at all; with sharding in types (AxisType.Explicit) init and
  update keep every state leaf sharded like its param."""
  out = _run_on_four_host_devices(_SHARDED_SCRIPT)
  assert 'sharded update matches' in out and 'without edges: no collectives' in out
  assert 'explicit sharding: state sharded like the params' in out
  assert 'lean state: sharded, the same numbers' in out


# ----------------------------------------------------------------------------------------------
# A lean state (store_gamma=False): no Γ in the state, every number as with Γ stored, to the bit.


def _steps_of(tx, params, grads, change=None):
  """The final (params, state) of ``tx`` under jax.jit; ``change(k, state)`` may edit the state before step k."""
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step)
  params = _nest(dict(params))
  state = tx.init(params)
  for k, g in enumerate(grads):
    if change is not None:
      state = change(k, state)
    params, state = step(params, state, _nest(dict(g)))
  return params, state


def assert_lean_is_stored(stored, lean):
  """Params, every state field and dl.gamma of a lean run equal the stored run's, bit for bit."""
  (p_stored, s_stored), (p_lean, s_lean) = stored, lean
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(p_stored)[0], jax.tree.leaves(p_lean)):
    np.testing.assert_array_equal(a, b, err_msg=f'W {jax.tree_util.keystr(path)}')
  inner_stored, = dl.find_states(s_stored)
  inner_lean, = dl.find_states(s_lean)
  assert all(g is None for g in jax.tree.leaves(inner_lean.gamma, is_leaf=lambda x: x is None))
  assert inner_stored.gamma_kappa is None and inner_stored.gamma_lambda is None
  assert int(inner_stored.count) == int(inner_lean.count)
  for field in ('trace', 'z', 'gamma_scale', 'entry_step', 'threshold'):
    a, b = getattr(inner_stored, field), getattr(inner_lean, field)
    assert jax.tree.structure(a) == jax.tree.structure(b), field
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
      assert x.dtype == y.dtype, (field, path)
      np.testing.assert_array_equal(x, y, err_msg=f'{field} {jax.tree_util.keystr(path)}')
  gam_stored, gam_lean = dl.gamma(s_stored), dl.gamma(s_lean)
  assert jax.tree.structure(gam_stored, is_leaf=lambda x: x is None) == jax.tree.structure(
      gam_lean, is_leaf=lambda x: x is None)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(gam_stored)[0], jax.tree.leaves(gam_lean)):
    assert x.dtype == y.dtype, path
    np.testing.assert_array_equal(x, y, err_msg=f'Γ {jax.tree_util.keystr(path)}')
    assert np.array_equal(np.signbit(np.asarray(x, np.float32)), np.signbit(np.asarray(y, np.float32))), path


def _assert_entered_along_the_path(state):
  """Every structured leaf has groups in Γ's support and outside it, entered at many steps."""
  entry = {k: np.asarray(v) for k, v in _flat(dl.entry_step(state)).items() if v is not None}
  _assert_some_but_not_all_entered({'entry': entry})


_LEAN_CASES = {
    'every_kind_momentum_weight_decay': dict(groups=_EVERY_KIND, weight_decay=0.005, kappa=1.7),
    'every_kind_nesterov_normalized': dict(groups=_EVERY_KIND, normalize=True, nesterov=True, kappa=2.0,
                                           lambdas=_LAMBDAS_NORMALIZED, weight_decay=0.005),
    'default_grouping_no_momentum': dict(momentum=0.0, kappa=0.7),
}


@pytest.mark.parametrize('edges', ['cpu_default', 'in_sequence', 'none'])
@pytest.mark.parametrize('case', _LEAN_CASES)
def test_lean_state_gives_the_stored_states_numbers_to_the_bit(case, edges, monkeypatch):
  """50 steps of every group kind (filter, neuron, input, head, lasso, none): W, b, Z, s, the entry
  steps and Γ (rebuilt by dl.gamma) equal the stored run's bit for bit; with the CPU's ordering
  edges, with every leaf updated in sequence, and without edges (what GPU and TPU get)."""
  hyper = _hyper(**_LEAN_CASES[case])
  if edges == 'in_sequence':
    monkeypatch.setattr(cpu_schedule, 'SEQUENTIAL_MIN_SIZE', 1)
  params, grads = _lenet_problem()
  make = lambda store: dl.dessilbi(
      hyper['alpha'], kappa=hyper['kappa'], mu=hyper['mu'], momentum=hyper['momentum'], nesterov=hyper['nesterov'],
      weight_decay=hyper['weight_decay'], groups=hyper['groups'], lambdas=hyper['lambdas'],
      normalize_groups=hyper['normalize'], ordering_edges=False if edges == 'none' else None, store_gamma=store)
  stored, lean = _steps_of(make(True), params, grads), _steps_of(make(False), params, grads)
  _assert_entered_along_the_path(lean[1])
  assert_lean_is_stored(stored, lean)


@pytest.mark.parametrize('dtype, state_dtype', [(jnp.bfloat16, jnp.float32), (jnp.bfloat16, None)])
def test_lean_state_with_low_precision_params_is_the_stored_one(dtype, state_dtype):
  params, grads = _lenet_problem()
  cast = lambda tree: {p: np.asarray(x).astype(dtype) for p, x in tree.items()}
  params, grads = cast(params), [cast(g) for g in grads]
  make = lambda store: dl.dessilbi(0.1, kappa=1.7, mu=10.0, groups=_EVERY_KIND, lambdas=_LAMBDAS, weight_decay=0.005,
                                   state_dtype=state_dtype, store_gamma=store)
  stored, lean = _steps_of(make(True), params, grads), _steps_of(make(False), params, grads)
  _assert_entered_along_the_path(lean[1])
  assert_lean_is_stored(stored, lean)


def test_lean_state_under_inject_hyperparams_changing_lambda_and_kappa_mid_run():
  """κ, λ, α, ν and β changed in the injected state at step 20, λ again at 35: the lasso leaves'
  Γ_k is rebuilt with the κ and λ that made it, not the new ones, so the numbers stay the stored run's."""
  params, grads = _lenet_problem()

  def change(k, state):
    if k == 20:
      state.hyperparams.update({name: jnp.asarray(value, jnp.float32) for name, value in dict(
          learning_rate=0.15, kappa=1.6, mu=8.0, momentum=0.8, lambdas=0.14).items()})
    if k == 35:
      state.hyperparams['lambdas'] = jnp.asarray(0.1, jnp.float32)
    return state

  make = lambda store: optax.inject_hyperparams(dl.dessilbi, static_args=('groups',))(
      learning_rate=0.1, kappa=1.0, mu=10.0, momentum=0.9, weight_decay=0.005, lambdas=0.11,
      normalize_groups=True, groups=_EVERY_KIND, store_gamma=store)
  stored, lean = _steps_of(make(True), params, grads, change), _steps_of(make(False), params, grads, change)
  assert_lean_is_stored(stored, lean)
  inner = lean[1].inner_state
  assert float(inner.gamma_kappa['Conv_0']['kernel']) == np.float32(1.6)
  assert float(inner.gamma_lambda['Conv_0']['kernel']) == np.float32(0.1)
  entered = np.concatenate([np.ravel(e) for e in jax.tree.leaves(inner.entry_step)])
  assert np.any(entered > 35) and np.any((entered > 0) & (entered <= 20)) and np.any(entered < 0)


@pytest.mark.parametrize('case', ['every_kind', 'every_kind_normalized'])
def test_lean_state_matches_reference(case):
  hyper = _hyper(**REFERENCE_CASES[case])
  params, grads = _lenet_problem()
  tx = dl.dessilbi(hyper['alpha'], kappa=hyper['kappa'], mu=hyper['mu'], momentum=hyper['momentum'],
                   nesterov=hyper['nesterov'], weight_decay=hyper['weight_decay'], groups=hyper['groups'],
                   lambdas=hyper['lambdas'], normalize_groups=hyper['normalize'], store_gamma=False)
  final_params, state = _library_run(tx, params, grads)
  ref = _reference_run(params, grads, **hyper)
  _assert_some_but_not_all_entered(ref)
  _assert_matches_reference(final_params, state._replace(gamma=dl.gamma(state)), ref)


def test_lean_state_holds_momentum_z_and_per_group_arrays_only():
  """8 bytes of state per float32 weight, plus a per-group scale and entry step and two scalars per
  lasso leaf; stable in structure, shapes and dtypes, so the step compiles once (also injected)."""
  params, grads = _small_params()
  for tx in (dl.dessilbi(0.1, mu=2.0, lambdas=0.3, store_gamma=False),
             optax.inject_hyperparams(dl.dessilbi)(learning_rate=0.1, mu=2.0, lambdas=0.3, store_gamma=False)):
    traces = []

    @jax.jit
    def step(params, state, grads):
      traces.append(1)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    p, initial = params, tx.init(params)
    state = initial
    for g in grads:
      p, state = step(p, state, g)
      chex.assert_trees_all_equal_structs(initial, state)
      chex.assert_trees_all_equal_shapes_and_dtypes(initial, state)
    assert len(traces) == 1
  # Γ's buffers are gone (4 bytes per structured float32 weight); each lasso leaf keeps two scalars.
  lean, stored = dl.dessilbi(0.1, store_gamma=False).init(params), dl.dessilbi(0.1).init(params)
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
  structured = sum(w.size for w in jax.tree.leaves(params) if w.ndim >= 2)
  assert nbytes(stored) - nbytes(lean) == 4 * structured - 2 * 4
  assert jax.tree.leaves(lean.gamma) == [] and nbytes(lean.trace) + nbytes(lean.z) == nbytes(stored.trace) + (
      nbytes(stored.z))
  assert lean.gamma_kappa['Conv_0'] == {'kernel': None, 'bias': None} and lean.gamma_kappa['Dense_0']['bias'] is None
  for field in (lean.gamma_kappa, lean.gamma_lambda):
    assert field['Dense_0']['kernel'].shape == () and field['Dense_0']['kernel'].dtype == jnp.float32


# ----------------------------------------------------------------------------------------------
# Bad input: a ValueError that names the problem.


@pytest.mark.parametrize('kwargs, match', [
    (dict(kappa=0.0), '`kappa` must be > 0'),
    (dict(kappa=-1.0), '`kappa` must be > 0'),
    (dict(mu=0.0), '`mu` must be > 0'),
    (dict(mu=-5.0), '`mu` must be > 0'),
    (dict(learning_rate=-0.1), '`learning_rate` must be >= 0'),
    (dict(momentum=1.0), r'`momentum` must be in \[0, 1\)'),
    (dict(momentum=1.5), r'`momentum` must be in \[0, 1\)'),
    (dict(momentum=-0.1), '`momentum` must be >= 0'),
    (dict(weight_decay=-1e-4), '`weight_decay` must be >= 0'),
    (dict(lambdas={'filters': 1.0}), r"unknown group kind\(s\) \['filters'\]"),
    (dict(lambdas=-1.0), '`lambdas` must be >= 0'),
    (dict(kappa=jnp.float32(jnp.inf)), '`kappa` must be finite'),
    (dict(mu=np.asarray(-1.0)), '`mu` must be > 0'),
])
def test_bad_hyperparameters_raise_at_construction(kwargs, match):
  kwargs = dict(dict(learning_rate=0.1), **kwargs)
  with pytest.raises(ValueError, match=match):
    dl.dessilbi(**kwargs)


@pytest.mark.parametrize('kwargs, match', [
    (dict(learning_rate='0.1'), "`learning_rate` must be a number, a scalar array or a schedule .*str '0.1'"),
    (dict(learning_rate=None), '`learning_rate` must be a number'),
    (dict(learning_rate=True), '`learning_rate` must be a number'),
    (dict(learning_rate=jnp.ones(3)), r'`learning_rate` must be .* shape \(3,\)'),
    (dict(kappa='1'), '`kappa` must be a number, a scalar array, got str'),
    (dict(kappa=lambda count: 1.0), '`kappa` must be a number, got the callable .*inject_hyperparams'),
    (dict(mu=None), '`mu` must be a number'),
    (dict(momentum=[0.9]), '`momentum` must be a number.*list'),
    (dict(weight_decay=jnp.zeros(2)), '`weight_decay` must be'),
    (dict(weight_decay=jnp.asarray(True)), '`weight_decay` must be .*dtype bool'),
    (dict(lambdas='0.1'), '`lambdas` must be a number'),
    (dict(lambdas={'filter': '1'}), "`lambdas\\['filter'\\]` must be a number"),
    (dict(nesterov=1), '`nesterov` must be True or False'),
    (dict(normalize_groups='yes'), '`normalize_groups` must be True or False'),
    (dict(ordering_edges='cpu'), '`ordering_edges` must be True or False.*or None'),
    (dict(store_gamma='no'), '`store_gamma` must be True or False'),
    (dict(store_gamma=0), '`store_gamma` must be True or False'),
    (dict(store_gamma=None), '`store_gamma` must be True or False'),
    (dict(target_density='0.3'), "`target_density` must be None, a number in \\(0, 1\\] or a Target, got str"),
])
def test_hyperparameters_of_a_wrong_type_raise_at_construction_naming_the_argument(kwargs, match):
  """Caught when the transformation is built, not in update (`bad operand type for unary -: 'str'`)."""
  kwargs = dict(dict(learning_rate=0.1), **kwargs)
  with pytest.raises(TypeError, match=match):
    dl.dessilbi(**kwargs)


def test_hyperparameters_may_be_scalar_arrays_and_the_learning_rate_a_schedule():
  params = {'kernel': jnp.ones((3, 2))}
  plain = dl.dessilbi(0.1, kappa=2.0, mu=5.0, momentum=0.5, weight_decay=1e-3, lambdas=0.2)
  arrays = dl.dessilbi(jnp.float32(0.1), kappa=np.float32(2.0), mu=jnp.asarray(5.0), momentum=np.asarray(0.5),
                       weight_decay=np.float32(1e-3), lambdas=jnp.asarray(0.2))
  scheduled = dl.dessilbi(optax.constant_schedule(0.1), kappa=2, mu=5, momentum=0.5, weight_decay=1e-3, lambdas=0.2)
  outs = [jax.jit(tx.update)(params, tx.init(params), params) for tx in (plain, arrays, scheduled)]
  for out in outs[1:]:
    chex.assert_trees_all_equal(out, outs[0])


def test_non_float_params_raise_at_init():
  params = {'kernel': jnp.zeros((3, 3)), 'step': jnp.zeros((2, 2), jnp.int32)}
  with pytest.raises(ValueError, match="floating-point params; leaf 'step' has dtype int32"):
    dl.dessilbi(0.1).init(params)


def test_update_without_params_raises():
  params = {'kernel': jnp.zeros((3, 3))}
  tx = dl.dessilbi(0.1)
  with pytest.raises(ValueError, match='needs `params`'):
    tx.update(params, tx.init(params))


def test_weight_decay_mask_chooses_the_decayed_leaves():
  """One step, β = 0: W_1 − W_0 = −α·κ·(g + ω·W_0) on a decayed leaf without structure (Γ_0 = Z_0 = 0:
  the coupling adds α·κ·W_0/ν on structured ones), −α·κ·g on the others; the default is the rank rule."""
  params = {'dense': {'kernel': jnp.full((3, 2), 2.0), 'bias': jnp.full(2, 3.0)}}
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5), params)
  hyper = dict(kappa=2.0, mu=4.0, momentum=0.0, weight_decay=0.1)
  step = lambda **kw: dl.dessilbi(0.1, **hyper, **kw).update(grads, dl.dessilbi(0.1, **hyper, **kw).init(params),
                                                             params)[0]['dense']
  coupling = 0.1 * 2.0 * 2.0 / 4.0
  default = step()
  np.testing.assert_allclose(default['kernel'], -0.1 * 2.0 * (0.5 + 0.1 * 2.0) - coupling, rtol=1e-6)
  np.testing.assert_allclose(default['bias'], -0.1 * 2.0 * 0.5, rtol=1e-6)
  every = step(weight_decay_mask=lambda p: jax.tree.map(lambda _: True, p))
  np.testing.assert_allclose(every['bias'], -0.1 * 2.0 * (0.5 + 0.1 * 3.0), rtol=1e-6)
  np.testing.assert_array_equal(every['kernel'], default['kernel'])
  none = step(weight_decay_mask={'dense': False})   # a prefix of the params
  np.testing.assert_allclose(none['kernel'], -0.1 * 2.0 * 0.5 - coupling, rtol=1e-6)
  np.testing.assert_array_equal(none['bias'], default['bias'])
  rank_rule = step(weight_decay_mask={'dense': {'kernel': True, 'bias': False}})
  chex.assert_trees_all_equal(rank_rule, default)
  with pytest.raises(TypeError, match='`weight_decay_mask` must hold True or False'):
    step(weight_decay_mask={'dense': 'yes'})
  with pytest.raises(ValueError, match='`weight_decay_mask` must be a pytree of bools shaped like the params'):
    step(weight_decay_mask={'conv': True})
