"""optax's own generic optimizer tests, ported to ``dl.dessilbi``.

As optax writes them (``optax/_src/alias_test.py``, ``optax/contrib/_common_test.py``,
the ``tree_utils`` state tests, ``MultiSteps``, ``apply_if_finite``, ``masked`` and
``partition``): every wrapper must give the plain transformation's numbers, to the
bit where the wrapper adds no arithmetic and the compiled step is the same
program (a skipped step, a scan against its loop where XLA compiles both alike).
Elsewhere to float32's rounding, as optax's own tests compare (``rtol=1e-4``
there): hyperparameters injected as arrays instead of folded constants, or the
update compiled inside another transformation, let XLA contract other
multiply-adds into fused ones, an ulp apart. Tiny params, few steps.
"""

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

HYPER = dict(learning_rate=0.1, kappa=2.0, mu=5.0, momentum=0.5, weight_decay=1e-3, lambdas=0.2)
# Values for tree_set, each different from HYPER's.
NEW_HYPER = dict(learning_rate=0.05, kappa=1.5, mu=3.0, momentum=0.8, weight_decay=1e-2, lambdas=0.05)
# Float32 rounding: steps compiled in another context may differ by ulps (the module's docstring).
close = lambda a, b: chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-6)


def _params(dtype=jnp.float32):
  """A conv kernel (filter groups), a dense kernel (lasso) and a bias (no structure)."""
  rng = np.random.default_rng(0)
  return {'conv': {'kernel': jnp.asarray(rng.normal(size=(3, 3, 2, 4)), dtype), 'bias': jnp.zeros(4, dtype)},
          'dense': {'kernel': jnp.asarray(rng.normal(size=(4, 3)), dtype)}}


def _grads(params, steps=4, seed=1):
  rng = np.random.default_rng(seed)
  return [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params) for _ in range(steps)]


def _run(tx, params, grads, step=None):
  step = step or jax.jit(tx.update)
  state = tx.init(params)
  for g in grads:
    updates, state = step(g, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_converges_on_a_parabola():
  """optax's parabola: W reaches the minimum and Γ holds the weights far from zero, not the one at zero."""
  target = jnp.array([[1.0, -1.0, 0.0]])
  loss = lambda p: jnp.sum((p['w'] - target) ** 2)
  tx = dl.dessilbi(0.1, mu=1.0, momentum=0.0, lambdas=1.0)
  params = {'w': jnp.array([[-1.0, 10.0, 0.3]])}

  def body(_, carry):   # the whole run in one jax.lax.fori_loop
    params, state = carry
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  params, state = jax.jit(lambda carry: jax.lax.fori_loop(0, 300, body, carry))((params, tx.init(params)))
  chex.assert_trees_all_close(params['w'], target, atol=2e-2)
  np.testing.assert_array_equal(dl.support(state)['w'], [[True, True, False]])


def test_lax_scan_gives_the_python_loop():
  params, grads = _params(), _grads(_params())
  tx = dl.dessilbi(**HYPER)
  looped = _run(tx, params, grads)

  def body(carry, g):
    params, state = carry
    updates, state = tx.update(g, state, params)
    return (optax.apply_updates(params, updates), state), None

  stacked = jax.tree.map(lambda *g: jnp.stack(g), *grads)
  scanned, _ = jax.jit(lambda p, s, g: jax.lax.scan(body, (p, s), g))(params, tx.init(params), stacked)
  close(scanned, looped)


@pytest.mark.parametrize('store_gamma', [True, False])
def test_inject_hyperparams_gives_the_plain_update(store_gamma):
  """contrib's test_optimizers_can_be_wrapped_in_inject_hyperparams, over several steps."""
  params, grads = _params(), _grads(_params())
  plain = _run(dl.dessilbi(**HYPER, store_gamma=store_gamma), params, grads)
  injected = _run(optax.inject_hyperparams(dl.dessilbi)(**HYPER, store_gamma=store_gamma), params, grads)
  close(injected[0], plain[0])
  close(injected[1].inner_state, plain[1])


def test_no_state_field_shares_a_hyperparameters_name():
  fields = set(dl.DessiLBIState._fields)
  import inspect
  hyperparameters = set(inspect.signature(dl.dessilbi).parameters)
  assert fields & hyperparameters == set()
  assert 'trace' in fields


@pytest.mark.parametrize('name', sorted(HYPER))
def test_tree_get_and_tree_set_of_every_hyperparameter(name):
  """tree_get reads the injected value; after tree_set the steps are those of a transformation built with
  the new value, and the state's buffers are untouched by the set (before: `momentum` was also the name
  of the momentum buffer, and tree_set wrote 0.5 into it)."""
  params, grads = _params(), _grads(_params())
  tx = optax.inject_hyperparams(dl.dessilbi)(**HYPER)
  state = tx.init(params)
  assert float(optax.tree_utils.tree_get(state, name)) == pytest.approx(HYPER[name])
  new_state = optax.tree_utils.tree_set(state, **{name: NEW_HYPER[name]})
  assert float(optax.tree_utils.tree_get(new_state, name)) == pytest.approx(NEW_HYPER[name])
  chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)   # only the hyperparameter changed
  step = jax.jit(tx.update)
  for g in grads:
    updates, new_state = step(g, new_state, params)
    params_injected = optax.apply_updates(params, updates)
    params = params_injected
  rebuilt = dict(HYPER, **{name: NEW_HYPER[name]})
  expected_params, expected_state = _run(dl.dessilbi(**rebuilt), _params(), grads)
  close(params, expected_params)
  close(new_state.inner_state, expected_state)
  unchanged = _run(dl.dessilbi(**HYPER), _params(), grads)   # the set mattered
  assert not all(np.allclose(a, b, rtol=1e-4, atol=0) for a, b in zip(
      jax.tree.leaves((params, new_state.inner_state.z)), jax.tree.leaves((unchanged[0], unchanged[1].z))))


def test_the_old_field_name_reads_the_trace_with_a_deprecation_warning():
  state = dl.dessilbi(0.1).init(_params())
  with pytest.warns(DeprecationWarning, match='DessiLBIState.trace'):
    assert state.momentum is state.trace
  assert 'momentum' not in [getattr(k, 'name', None) for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]
                            for k in path]


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtypes_and_shapes_are_stable_and_the_step_compiles_once(dtype):
  """alias_test's test_preserve_dtype and state-stability checks: updates in the params' dtype, the state's
  dtypes and shapes unchanged by a step, one trace for all steps."""
  params = _params(dtype)
  tx = dl.dessilbi(**HYPER)
  traces = []

  @jax.jit
  def step(params, state, grads):
    traces.append(None)
    updates, state = tx.update(grads, state, params)
    chex.assert_trees_all_equal_dtypes(updates, params)
    return optax.apply_updates(params, updates), state

  initial = state = tx.init(params)
  for g in _grads(params):
    params, state = step(params, state, g)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, initial)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(dtype)}
  assert len(traces) == 1


def test_float64():
  """With jax_enable_x64 (in a fresh process: the flag is global), float64 params keep float64 updates and
  state, and the steps match a float32 run to float32's precision."""
  code = textwrap.dedent('''
      import jax
      jax.config.update('jax_enable_x64', True)
      import jax.numpy as jnp, numpy as np, optax
      import dessilbi_jax as dl
      params = {'conv': {'kernel': jnp.linspace(-1, 1, 72).reshape(3, 3, 2, 4)}, 'dense': {'kernel': jnp.linspace(-2, 1, 12).reshape(4, 3)}}
      assert params['dense']['kernel'].dtype == jnp.float64
      out = {}
      for dtype in (jnp.float64, jnp.float32):
        p = jax.tree.map(lambda x: x.astype(dtype), params)
        tx = dl.dessilbi(0.1, mu=2.0, lambdas=0.1)
        state = tx.init(p)
        for k in range(5):
          g = jax.tree.map(lambda x: jnp.cos(x * (k + 1)), p)
          updates, state = jax.jit(tx.update)(g, state, p)
          assert {x.dtype for x in jax.tree.leaves(updates)} == {jnp.dtype(dtype)}
          p = optax.apply_updates(p, updates)
        assert {x.dtype for x in jax.tree.leaves((state.trace, state.z, state.gamma))} == {jnp.dtype(dtype)}
        out[dtype] = p
      for a, b in zip(jax.tree.leaves(out[jnp.float64]), jax.tree.leaves(out[jnp.float32])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
      print('ok')
  ''')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=300)
  assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr[-2000:]


def test_sharded_params_keep_their_sharding_in_the_state_and_the_step():
  """The state of sharded params is sharded like them (per-group leaves replicated along group axes), and
  the jitted step gives the unsharded numbers."""
  mesh = jax.make_mesh((len(jax.devices()),), ('d',))
  spec = lambda x: jax.sharding.PartitionSpec(*([None] * (x.ndim - 1) + ['d'])) if x.ndim else jax.sharding.PartitionSpec()
  params = _params()
  sharded = jax.tree.map(lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec(x))), params)
  tx = dl.dessilbi(**HYPER)
  state = tx.init(sharded)
  for field in (state.trace, state.z, state.gamma):
    for x, p in zip(jax.tree.leaves(field), jax.tree.leaves(jax.tree.map(lambda p, f: p, sharded, field))):
      assert x.sharding.is_equivalent_to(p.sharding, x.ndim)
  grads = _grads(params)
  got = _run(tx, sharded, [jax.tree.map(lambda g, p: jax.device_put(g, p.sharding), g, sharded) for g in grads])
  chex.assert_trees_all_close(got, _run(tx, params, grads), rtol=1e-6, atol=1e-7)


def test_multi_steps_is_one_step_of_the_mean_gradient():
  params, grads = _params(), _grads(_params(), steps=4)
  multi = optax.MultiSteps(dl.dessilbi(**HYPER), every_k_schedule=2)
  got_params, got_state = _run(multi, params, grads)
  means = [jax.tree.map(lambda a, b: (a + b) / 2, grads[i], grads[i + 1]) for i in (0, 2)]
  expected_params, expected_state = _run(dl.dessilbi(**HYPER), params, means)
  chex.assert_trees_all_close(got_params, expected_params, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(got_state.inner_opt_state, expected_state, rtol=1e-6, atol=1e-7)
  assert int(got_state.inner_opt_state.count) == 2


def test_apply_if_finite_skips_a_nan_step_and_keeps_the_state():
  params, grads = _params(), _grads(_params(), steps=3)
  nan = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads[0])
  tx = optax.apply_if_finite(dl.dessilbi(**HYPER), max_consecutive_errors=3)
  got_params, got_state = _run(tx, params, [grads[0], nan, grads[1], grads[2]])
  expected_params, expected_state = _run(dl.dessilbi(**HYPER), params, grads)
  chex.assert_trees_all_equal(got_params, expected_params)
  chex.assert_trees_all_equal(got_state.inner_state, expected_state)
  assert int(got_state.total_notfinite) == 1


def test_masked_leaves_are_left_to_the_other_transformation():
  """optax.masked: the unmasked leaves take the steps of dl.dessilbi on them alone; the others get their
  gradient back unchanged (optax's convention); the helpers read Γ through the mask."""
  params, grads = _params(), _grads(_params())
  mask = {'conv': {'kernel': True, 'bias': False}, 'dense': {'kernel': True}}
  tx = optax.masked(dl.dessilbi(**HYPER), mask)
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(grads[0], state, params)
  np.testing.assert_array_equal(updates['conv']['bias'], grads[0]['conv']['bias'])
  sub = lambda t: {'conv': {'kernel': t['conv']['kernel']}, 'dense': t['dense']}
  expected_updates, expected_state = dl.dessilbi(**HYPER).update(
      sub(grads[0]), dl.dessilbi(**HYPER).init(sub(params)), sub(params))
  close(sub(updates), expected_updates)
  close(dl.gamma(state)['dense']['kernel'], expected_state.gamma['dense']['kernel'])


def test_partition_gives_each_label_its_transformation():
  params, grads = _params(), _grads(_params())
  labels = {'conv': {'kernel': 'dessilbi', 'bias': 'sgd'}, 'dense': {'kernel': 'dessilbi'}}
  tx = optax.partition({'dessilbi': dl.dessilbi(**HYPER), 'sgd': optax.sgd(0.1, momentum=0.5)}, labels)
  got_params, state = _run(tx, params, grads)
  sgd_params, _ = _run(optax.sgd(0.1, momentum=0.5), params['conv']['bias'], [g['conv']['bias'] for g in grads])
  np.testing.assert_array_equal(got_params['conv']['bias'], sgd_params)
  sub = lambda t: {'conv': {'kernel': t['conv']['kernel']}, 'dense': t['dense']}
  dessilbi_params, dessilbi_state = _run(dl.dessilbi(**HYPER), sub(params), [sub(g) for g in grads])
  close(sub(got_params), dessilbi_params)
  close(sub(dl.z(state)), dessilbi_state.z)   # the helpers find the state inside the partition


@pytest.mark.parametrize('kwargs', [dict(), dict(store_gamma=False), dict(target_density=0.5)])
def test_init_on_abstract_params(kwargs):
  """Every optax optimizer's init accepts jax.ShapeDtypeStruct leaves: the same state as of concrete zeros."""
  params = _params()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  tx = dl.dessilbi(**HYPER, **kwargs)
  chex.assert_trees_all_equal(tx.init(abstract), tx.init(jax.tree.map(jnp.zeros_like, params)))
  chex.assert_trees_all_equal_shapes_and_dtypes(jax.eval_shape(tx.init, params), tx.init(params))


@pytest.mark.parametrize('ordering_edges', [None, False])
@pytest.mark.parametrize('kwargs', [dict(), dict(store_gamma=False), dict(target_density=0.5)])
def test_zero_size_structured_leaves(kwargs, ordering_edges):
  """A layer with every unit removed (a (3, 3, 2, 0) kernel, a (0, 3) dense): the update runs (the CPU
  schedule indexed an empty buffer) and the other leaves take the steps they take without it."""
  params = _params()
  empty = dict(params, gone={'kernel': jnp.zeros((3, 3, 2, 0)), 'bias': jnp.zeros(0)},
               gone_dense={'kernel': jnp.zeros((0, 3))})
  grads = _grads(params)
  with_empty = [dict(g, gone=jax.tree.map(jnp.zeros_like, empty['gone']), gone_dense={'kernel': jnp.zeros((0, 3))})
                for g in grads]
  tx = dl.dessilbi(**HYPER, ordering_edges=ordering_edges, **kwargs)
  got_params, got_state = _run(tx, empty, with_empty)
  expected_params, _ = _run(tx, params, grads)
  chex.assert_trees_all_equal({k: got_params[k] for k in params}, expected_params)
  assert got_params['gone']['kernel'].shape == (3, 3, 2, 0)
  assert dl.support(got_state)['gone']['kernel'].shape[-1] == 0
