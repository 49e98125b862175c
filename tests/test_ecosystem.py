"""DessiLBI in the ways the ecosystem uses an optax transformation: flax.nnx, empty trees, prefix masks
and labels, extra arguments, inject_hyperparams, optax.tree.map_params."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import dessilbi_jax as dl
from dessilbi_jax import baselines

_LAMBDAS = {'lasso': 0.02, 'filter': 0.2, 'neuron': 0.4}


def _params(seed=0):
  rng = np.random.default_rng(seed)
  shapes = {'Conv_0': {'kernel': (3, 3, 2, 8), 'bias': (8,)}, 'Dense_0': {'kernel': (24, 10), 'bias': (10,)}}
  scale = lambda shape: rng.uniform(0.2, 1.0, size=shape[-1])   # groups of different norms
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s) * scale(s), jnp.float32), shapes,
                      is_leaf=lambda s: isinstance(s, tuple))


def _grads(params, steps, seed=1):
  rng = np.random.default_rng(seed)
  return [jax.tree.map(lambda w: jnp.asarray(0.05 * rng.normal(size=w.shape), jnp.float32), params)
          for _ in range(steps)]


def _run(tx, params, grads, **extra):
  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for g in grads:
    params, state = step(params, state, g)
  return params, state


def _assert_trees_equal(a, b):
  flat_a, flat_b = (jax.tree_util.tree_flatten_with_path(t, is_leaf=lambda x: x is None)[0] for t in (a, b))
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    assert (x is None) == (y is None), path
    if x is not None:
      np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------------------------
# flax.nnx


class _Net(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(2, 8, (3, 3), rngs=rngs)
    self.dense = nnx.Linear(8, 10, rngs=rngs)


_NNX_GROUPS = {
    'anchored patterns': {'^dense/kernel$': 'neuron'},
    'pytree of kinds': {'conv': {'kernel': 'filter', 'bias': None}, 'dense': {'kernel': 'neuron', 'bias': None}},
    'callable': lambda path, leaf: 'neuron' if path == 'dense/kernel' else dl.grouping.default_kind(path, leaf),
}


@pytest.mark.parametrize('rule', _NNX_GROUPS)
def test_nnx_optimizer_groups_like_a_plain_tree_and_the_helpers_read_it(rule):
  """nnx.Optimizer gives init Variables and update arrays: both see the paths 'dense/kernel', so every
  form of `groups` groups alike, and the run equals dl.dessilbi on the plain dict of the same params."""
  seen = []
  groups = _NNX_GROUPS[rule]
  if rule == 'callable':
    groups = lambda path, leaf, rule=groups: seen.append(path) or rule(path, leaf)
  model = _Net(nnx.Rngs(0))
  plain_params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  lambdas = {'filter': 0.5, 'neuron': 0.9}
  tx = dl.dessilbi(0.5, mu=2.0, lambdas=lambdas, groups=groups)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  init_paths = sorted(set(seen))
  grads = _grads(plain_params, steps=6)
  for g in grads:
    nnx_grads = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(nnx_grads, g)
    optimizer.update(model, nnx_grads)
  if rule == 'callable':
    assert init_paths == sorted(set(seen)) == ['conv/bias', 'conv/kernel', 'dense/bias', 'dense/kernel']

  expected_params, expected_state = _run(
      dl.dessilbi(0.5, mu=2.0, lambdas=lambdas, groups=_NNX_GROUPS['anchored patterns']), plain_params, grads)
  assert dl.entry_step(optimizer)['dense']['kernel'].shape == (1, 10)   # neuron groups
  params = nnx.state(model, nnx.Param)
  for got_params, got_state in ((model, optimizer), (params, optimizer.opt_state)):
    summary = dl.sparsity_summary(got_params, got_state)
    assert summary == dl.sparsity_summary(expected_params, expected_state)
    assert 0 < summary['dense/kernel']['groups_in_support'] < 10, summary
    np.testing.assert_allclose(dl.gamma(got_state)['conv']['kernel'], dl.gamma(expected_state)['conv']['kernel'],
                               rtol=1e-6, atol=1e-7)
  # The sparse model back: nnx.update(model, dl.sparse_params(model, optimizer)).
  nnx.update(model, dl.sparse_params(model, optimizer))
  kept = np.asarray(dl.support(optimizer)['dense']['kernel'])
  assert 0 < kept.sum() < kept.size
  np.testing.assert_array_equal(model.dense.kernel[...] == 0, ~kept)
  np.testing.assert_allclose(model.dense.kernel[...], np.where(kept, expected_params['dense']['kernel'], 0),
                             rtol=1e-5, atol=1e-7)   # nnx.Optimizer steps eagerly: rounding of its own


# ----------------------------------------------------------------------------------------------
# Empty trees and prefix masks / labels


_EMPTY_CASES = {
    'no params': (lambda tx: tx, lambda params: {}),
    'all-False mask': (lambda tx: optax.masked(tx, lambda p: jax.tree.map(lambda _: False, p)), lambda params: params),
    'empty mask': (lambda tx: optax.masked(tx, {}), lambda params: {}),
    'label without params': (
        lambda tx: optax.partition({'a': tx, 'b': optax.sgd(0.1)}, lambda p: jax.tree.map(lambda _: 'b', p)),
        lambda params: params),
}


@pytest.mark.parametrize('case', _EMPTY_CASES)
def test_empty_trees_work_like_optax(case):
  wrap, pick = _EMPTY_CASES[case]
  params = pick(_params())
  grads = _grads(params, steps=2)
  got = _run(wrap(dl.dessilbi(0.1)), params, grads)[0]
  expected = _run(wrap(optax.sgd(0.1)), params, grads)[0]   # optax's own transformation in its place
  _assert_trees_equal(got, expected)


_PREFIX_WRAPPERS = {
    'masked': (lambda mask: optax.masked(dl.dessilbi(0.5, mu=2.0, lambdas=_LAMBDAS), mask),
               {'Conv_0': True, 'Dense_0': False}),
    'partition': (lambda labels: optax.partition({'a': dl.dessilbi(0.5, mu=2.0, lambdas=_LAMBDAS),
                                                  'b': dl.dessilbi(0.3, mu=2.0, lambdas=_LAMBDAS)}, labels),
                  {'Conv_0': 'a', 'Dense_0': 'b'}),
}


@pytest.mark.parametrize('name', _PREFIX_WRAPPERS)
def test_helpers_read_states_under_prefix_masks_and_labels(name):
  """A mask or labels given as a prefix of the params train as the full tree does, and every helper
  gives what it gives for the full tree."""
  make, prefix = _PREFIX_WRAPPERS[name]
  params = _params()
  full = jax.tree.map(lambda value, subtree: jax.tree.map(lambda _: value, subtree), prefix, params)
  grads = _grads(params, steps=8)
  got_params, got_state = _run(make(prefix), params, grads)
  ref_params, ref_state = _run(make(full), params, grads)
  _assert_trees_equal(got_params, ref_params)
  assert dl.sparsity_summary(got_params, got_state) == dl.sparsity_summary(ref_params, ref_state)
  assert sum(row['groups_in_support'] for row in dl.sparsity_summary(got_params, got_state).values()) > 0
  _assert_trees_equal(dl.sparse_params(got_params, got_state), dl.sparse_params(ref_params, ref_state))
  _assert_trees_equal(dl.prune_by_order(got_params, got_state, 0.5), dl.prune_by_order(ref_params, ref_state, 0.5))
  np.testing.assert_array_equal(dl.gamma(got_state)['Conv_0']['kernel'], dl.gamma(ref_state)['Conv_0']['kernel'])


# ----------------------------------------------------------------------------------------------
# Extra arguments, inject_hyperparams, map_params


@pytest.mark.parametrize('make', [
    lambda: dl.dessilbi(0.5, mu=2.0, lambdas=_LAMBDAS),
    lambda: baselines.gmp(optax.sgd(0.1, momentum=0.9), 0.5, begin_step=0, end_step=4),
    lambda: optax.chain(optax.clip_by_global_norm(1.0), dl.dessilbi(0.5, mu=2.0, lambdas=_LAMBDAS)),
], ids=['dessilbi', 'gmp', 'chain'])
def test_unknown_keyword_arguments_are_ignored(make):
  params, tx = _params(), make()
  grads = _grads(params, steps=4)
  _assert_trees_equal(_run(tx, params, grads, loss=jnp.float32(1.0), some_kwarg=3), _run(tx, params, grads))


def test_gmp_under_inject_hyperparams_follows_an_injected_sparsity():
  """The injected final sparsity is a traced number: masks prune round(s·n) groups of it, and a new value
  set in the state moves them (steps named static, as ints they index the schedule)."""
  params = _params()
  grads = _grads(params, steps=6)
  tx = optax.inject_hyperparams(baselines.gmp, static_args=('begin_step', 'end_step', 'frequency'))(
      optax.sgd(0.1), final_sparsity=0.5, begin_step=0, end_step=4)
  _, state = _run(tx, params, grads[:2])
  _, plain = _run(baselines.gmp(optax.sgd(0.1), 0.5, begin_step=0, end_step=4), params, grads[:2])
  _assert_trees_equal(baselines.masks(state), baselines.masks(plain))
  pruned = lambda masks: int(np.sum(~np.asarray(masks['Dense_0']['kernel'])))
  assert pruned(baselines.masks(state)) == round(240 * 0.5 * (1 - (1 - 1 / 4) ** 3))   # the schedule at step 1
  state.hyperparams['final_sparsity'] = jnp.asarray(0.75, jnp.float32)
  step = jax.jit(tx.update)
  p = params
  for g in grads[2:]:
    updates, state = step(g, state, p)
    p = optax.apply_updates(p, updates)
  assert pruned(baselines.masks(state)) == 180   # round(0.75 · 240) after the change
  assert int(np.sum(np.asarray(p['Dense_0']['kernel']) == 0)) == 180


def test_state_dtype_under_inject_hyperparams():
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _params())
  with pytest.raises(ValueError, match=r"static_args=\('state_dtype',\)"):
    optax.inject_hyperparams(dl.dessilbi)(0.1, state_dtype=jnp.float32).init(params)
  tx = optax.inject_hyperparams(dl.dessilbi, static_args=('state_dtype',))(0.1, state_dtype=jnp.float32)
  state = tx.init(params)
  _, state = jax.jit(tx.update)(params, state, params)
  assert {x.dtype for x in jax.tree.leaves((state.inner_state.trace, state.inner_state.z))} == {jnp.dtype('float32')}


def test_map_params_gives_each_state_leaf_its_params_spec():
  """optax.tree.map_params with param specs: `is_leaf=lambda x: x is None` keeps the leaves without
  structure, and a per-group leaf takes its param's spec without the axes a group spans (size 1)."""
  params = _params()
  specs = {'Conv_0': {'kernel': P(None, None, None, 'd'), 'bias': P('d')},
           'Dense_0': {'kernel': P('d', None), 'bias': P()}}
  tx = dl.dessilbi(0.1, groups={'Dense_0/kernel': 'neuron'})
  state_specs = optax.tree.map_params(tx, dl.state_spec, tx.init(params), specs,
                                      transform_non_params=lambda _: P(), is_leaf=lambda x: x is None)
  assert state_specs.count == P()
  assert state_specs.trace == specs
  assert state_specs.z == state_specs.gamma == {'Conv_0': {'kernel': P(None, None, None, 'd'), 'bias': None},
                                                'Dense_0': {'kernel': P('d', None), 'bias': None}}
  assert state_specs.entry_step == state_specs.gamma_scale == {
      'Conv_0': {'kernel': P(None, None, None, 'd'), 'bias': None}, 'Dense_0': {'kernel': P(None, None), 'bias': None}}


# ----------------------------------------------------------------------------------------------
# A lean state (store_gamma=False) in the same places


def test_nnx_optimizer_with_a_lean_state_reads_as_the_stored_one():
  """nnx.Optimizer (eager steps) with store_gamma=False: the helpers rebuild Γ off the optimizer to the
  bit of the stored state's, and the models train alike."""
  runs = {}
  for store in (True, False):
    model = _Net(nnx.Rngs(0))
    plain_params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    optimizer = nnx.Optimizer(model, dl.dessilbi(0.5, mu=2.0, lambdas={'filter': 0.5, 'lasso': 0.05},
                                                 store_gamma=store), wrt=nnx.Param)
    for g in _grads(plain_params, steps=4):
      nnx_grads = nnx.state(model, nnx.Param)
      nnx.replace_by_pure_dict(nnx_grads, g)
      optimizer.update(model, nnx_grads)
    runs[store] = (model, optimizer)
  (model, stored), (lean_model, lean) = runs[True], runs[False]
  _assert_trees_equal(nnx.to_pure_dict(nnx.state(model, nnx.Param)), nnx.to_pure_dict(nnx.state(lean_model, nnx.Param)))
  _assert_trees_equal(dl.gamma(stored), dl.gamma(lean))
  assert dl.sparsity_summary(model, stored) == dl.sparsity_summary(lean_model, lean)
  assert 0 < dl.sparsity_summary(lean_model, lean)['dense/kernel']['weights_kept'] < 80
  _assert_trees_equal(dl.sparse_params(model, stored), dl.sparse_params(lean_model, lean))


@pytest.mark.parametrize('name', _PREFIX_WRAPPERS)
def test_a_lean_state_under_prefix_masks_and_labels_is_the_stored_one(name):
  make, prefix = _PREFIX_WRAPPERS[name]
  lean_make = {'masked': lambda mask: optax.masked(dl.dessilbi(0.5, mu=2.0, lambdas=_LAMBDAS, store_gamma=False), mask),
               'partition': lambda labels: optax.partition(
                   {'a': dl.dessilbi(0.5, mu=2.0, lambdas=_LAMBDAS, store_gamma=False),
                    'b': dl.dessilbi(0.3, mu=2.0, lambdas=_LAMBDAS, store_gamma=False)}, labels)}[name]
  params = _params()
  grads = _grads(params, steps=8)
  got_params, got_state = _run(lean_make(prefix), params, grads)
  ref_params, ref_state = _run(make(prefix), params, grads)
  _assert_trees_equal(got_params, ref_params)
  _assert_trees_equal(dl.gamma(got_state), dl.gamma(ref_state))
  assert dl.sparsity_summary(got_params, got_state) == dl.sparsity_summary(ref_params, ref_state)
  _assert_trees_equal(dl.prune_by_order(got_params, got_state, 0.5), dl.prune_by_order(ref_params, ref_state, 0.5))


def test_map_params_and_a_checkpoint_of_a_lean_state(tmp_path):
  """A lean state's specs (no Γ; a lasso leaf's κ and λ are scalars: P()), and an orbax checkpoint of it
  restores to the same arrays, from which the step goes on as it would have."""
  from dessilbi_jax.train import checkpoint
  params = _params()
  specs = {'Conv_0': {'kernel': P(None, None, None, 'd'), 'bias': P('d')},
           'Dense_0': {'kernel': P('d', None), 'bias': P()}}
  tx = dl.dessilbi(0.5, mu=2.0, lambdas=_LAMBDAS, store_gamma=False)
  grads = _grads(params, steps=6)
  trained, state = _run(tx, params, grads[:3])
  state_specs = optax.tree.map_params(tx, dl.state_spec, state, specs,
                                      transform_non_params=lambda _: P(), is_leaf=lambda x: x is None)
  assert state_specs.gamma == {'Conv_0': {'kernel': None, 'bias': None}, 'Dense_0': {'kernel': None, 'bias': None}}
  assert state_specs.gamma_kappa == state_specs.gamma_lambda == {
      'Conv_0': {'kernel': None, 'bias': None}, 'Dense_0': {'kernel': P(), 'bias': None}}
  assert state_specs.z == {'Conv_0': {'kernel': P(None, None, None, 'd'), 'bias': None},
                           'Dense_0': {'kernel': P('d', None), 'bias': None}}
  manager = checkpoint.open_manager(tmp_path)
  checkpoint.save(manager, 1, {'params': trained, 'opt_state': state}, {'epoch': 1})
  manager.wait_until_finished()
  manager.close()
  restored, _ = checkpoint.restore(tmp_path, {'params': trained, 'opt_state': state})
  _assert_trees_equal(restored['opt_state'], jax.device_get(state))
  on = lambda p, s: _run_from(tx, p, s, grads[3:])
  _assert_trees_equal(on(restored['params'], restored['opt_state']), on(trained, state))


def _run_from(tx, params, state, grads):
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)))
  for g in grads:
    params, state = step(params, state, g)
  return params, dl.gamma(state)
