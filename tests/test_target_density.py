"""The budget threshold against a brute-force NumPy search; the dual-ascent step against its formula."""

import json
import re

import numpy as np
import pytest

from dessilbi_jax.core import target_density


def _brute_force(norms, sizes, budget):
  """The least t among {0} ∪ norms with Σ_{‖g‖>t} |g| ≤ budget."""
  flat = np.concatenate([np.ravel(n) for n in norms]).astype(np.float32)
  size = np.concatenate([np.full(np.size(n), s) for n, s in zip(norms, sizes)])
  for t in sorted({0.0, *flat.tolist()}):
    if size[flat > t].sum() <= budget:
      return t
  raise AssertionError('unreachable: t = max norm keeps nothing')


@pytest.mark.parametrize('seed', range(10))
def test_budget_threshold_is_the_least_that_fits(seed):
  rng = np.random.default_rng(seed)
  leaves = int(rng.integers(1, 4))
  norms = [np.round(rng.exponential(size=rng.integers(1, 30)), 1) for _ in range(leaves)]   # ties on purpose
  sizes = [int(rng.integers(1, 50)) for _ in range(leaves)]
  total = sum(n.size * s for n, s in zip(norms, sizes))
  budget = float(rng.uniform(0, 1.2) * total)
  t = float(target_density.budget_threshold(norms, sizes, budget))
  assert t == pytest.approx(_brute_force(norms, sizes, budget))
  flat = np.concatenate(norms).astype(np.float32); size = np.concatenate([np.full(n.size, s) for n, s in zip(norms, sizes)])
  assert size[flat > np.float32(t)].sum() <= budget


def test_budget_threshold_edges():
  assert float(target_density.budget_threshold([], [], 10)) == 0.0
  assert float(target_density.budget_threshold([np.array([1.0, 2.0])], [3], 100)) == 0.0   # all fit
  assert float(target_density.budget_threshold([np.array([1.0, 2.0])], [3], 0)) == 2.0     # none fit
  with pytest.raises(ValueError, match='2 leaves of norms but 1 group sizes'):
    target_density.budget_threshold([np.ones(2), np.ones(2)], [1], 1)


# -- dl.dessilbi(target_density=...) -------------------------------------------------------------

import jax
import jax.numpy as jnp
import optax

import dessilbi_jax as dl
from dessilbi_jax.core import grouping
from tests import reference

KINDS = {'conv': 'filter', 'dense': 'lasso', 'bias': None}
LAM, ALPHA, MU = 0.5, 0.05, 10.0


def _problem(seed=0):
  """A quadratic pull of a conv kernel, a dense kernel and a bias towards random targets."""
  keys = jax.random.split(jax.random.key(seed), 4)
  params = {'conv': 0.1 * jax.random.normal(keys[0], (3, 3, 2, 12)),
            'dense': 0.1 * jax.random.normal(keys[1], (16, 6)), 'bias': jnp.zeros(6)}
  goal = {'conv': jax.random.normal(keys[2], (3, 3, 2, 12)), 'dense': jax.random.normal(keys[3], (16, 6)),
          'bias': jnp.ones(6)}
  grad = jax.grad(lambda p: sum(jnp.sum((p[k] - goal[k]) ** 2) for k in p))
  return params, grad


def _run(target, steps, seed=0, **kw):
  params, grad = _problem(seed)
  tx = dl.dessilbi(ALPHA, mu=MU, lambdas=LAM, groups=lambda path, w: KINDS[path], target_density=target, **kw)
  state, update, history = tx.init(params), jax.jit(tx.update), []
  for _ in range(steps):
    updates, state = update(grad(params), state, params)
    params = optax.apply_updates(params, updates)
    history.append((params, state))
  return history, grad


def _density(state, params, count='weights'):
  kept = total = 0
  for path in ('conv', 'dense'):
    flags = np.asarray(reference.nonzero_groups(np.asarray(state.gamma[path]), KINDS[path]))
    size = 1 if count == 'groups' else grouping.group_size(KINDS[path], params[path].shape)
    kept, total = kept + flags.sum() * size, total + flags.size * size
  return kept / total


def test_target_path_is_dessilbis_until_the_budget_binds():
  plain, _ = _run(None, 150)
  capped, _ = _run(target_density.Target(0.3, method='budget'), 150)
  binds = next(k for k, (p, s) in enumerate(plain) if _density(s, p) > 0.3)
  assert 5 < binds < 140, binds   # the test needs a budget that binds mid-run
  for k in range(binds):          # bit for bit until the plain run's support passes the budget
    for a, b in zip(jax.tree.leaves(plain[k]), jax.tree.leaves(capped[k][:2])):
      np.testing.assert_array_equal(a, b)
  assert _density(plain[-1][1], plain[-1][0]) > 0.5 and _density(capped[-1][1], capped[-1][0]) <= 0.3 + 0.02


@pytest.mark.parametrize('scope,count', [('model', 'weights'), ('layer', 'weights'), ('model', 'groups')])
def test_budget_threshold_in_the_state_against_numpy(scope, count):
  """Each step's threshold is the brute-force least t whose support of Z_{k+1} fits the budget, and
  Γ_{k+1} is κ·prox at max(λ, t), both against NumPy: the support never holds more than the budget."""
  target = target_density.Target(0.25, scope=scope, count=count, method='budget')
  history, _ = _run(target, 120)
  for k, (params, state) in enumerate(history):
    norms = {p: reference.group_norms(np.asarray(state.z[p]), KINDS[p]) for p in ('conv', 'dense')}
    sizes = {p: 1 if count == 'groups' else grouping.group_size(KINDS[p], params[p].shape) for p in norms}
    budget = lambda ps: 0.25 * sum(norms[p].size * sizes[p] for p in ps)
    for p in norms:
      leaves = list(norms) if scope == 'model' else [p]
      expected = reference.budget_threshold([norms[q] for q in leaves], [sizes[q] for q in leaves], budget(leaves))
      assert float(state.threshold[p]) == pytest.approx(expected, rel=1e-5), (k, p)
      lam = max(LAM, float(state.threshold[p]))
      np.testing.assert_allclose(state.gamma[p], reference.prox(state.z[p], KINDS[p], lam), rtol=1e-5, atol=1e-6)
    if scope == 'model':
      assert _density(state, params, count) <= 0.25
  # 0.25 of 312 weights (12 filters of 18, 96 single weights) is 78: the filters' granularity leaves it below.
  assert 0.25 - 18 / 312 <= _density(state, params, count) <= 0.25 + (18 / 312 if scope == 'layer' else 0)


def test_dual_ascent_threshold_against_its_formula():
  rate = 0.5
  history, _ = _run(target_density.Target(0.3, method='dual', rate=rate, lam_min=None), 150)
  for (_, before), (params, state) in zip(history, history[1:]):
    t, t_new = float(before.threshold['conv']), float(state.threshold['conv'])
    np.testing.assert_allclose(state.gamma['conv'], reference.prox(state.z['conv'], 'filter', LAM + t_new),
                               rtol=1e-5, atol=1e-6)
    # The density the step measures: the support of Z_{k+1} at the λ of the last step.
    kept = sum((reference.group_norms(np.asarray(state.z[p]), KINDS[p]) > LAM + t).sum()
               * grouping.group_size(KINDS[p], params[p].shape) for p in ('conv', 'dense'))
    assert t_new == pytest.approx(max(0.0, t + rate * (kept / 312 - 0.3)), abs=1e-6)
    assert float(state.threshold['conv']) == float(state.threshold['dense'])   # model-wise: one λ offset
  assert max(float(s.threshold['conv']) for _, s in history) > 0


def test_threshold_recomputed_every_n_steps():
  history, _ = _run(target_density.Target(0.3, every=4, method='budget'), 40)
  values = [float(s.threshold['conv']) for _, s in history]
  for k, (value, previous) in enumerate(zip(values[1:], values), start=2):
    if k % 4:
      assert value == previous, k
  assert len(set(values)) > 3


def test_target_density_under_inject_hyperparams_can_change_mid_run():
  """An injected target that changes after 60 steps gives the steps of a plain target of the new density
  continued from the same state."""
  params, grad = _problem()
  kw = dict(mu=MU, lambdas=LAM, groups=lambda path, w: KINDS[path])
  injected = optax.inject_hyperparams(dl.dessilbi, static_args=('groups',))(ALPHA, target_density=0.4, **kw)
  plain = {d: dl.dessilbi(ALPHA, target_density=d, **kw) for d in (0.4, 0.2)}
  state, p_inj = injected.init(params), params
  reference, p_ref = plain[0.4].init(params), params
  for k in range(120):
    if k == 60:
      state.hyperparams['target_density'] = jnp.asarray(0.2)
    updates, state = injected.update(grad(p_inj), state, p_inj)
    p_inj = optax.apply_updates(p_inj, updates)
    updates, reference = plain[0.4 if k < 60 else 0.2].update(grad(p_ref), reference, p_ref)
    p_ref = optax.apply_updates(p_ref, updates)
  for a, b in zip(jax.tree.leaves((p_inj, state.inner_state.threshold)), jax.tree.leaves((p_ref, reference.threshold))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert float(reference.threshold['conv']) != float(plain[0.4].init(params).threshold['conv'])


@pytest.mark.parametrize('bad,message', [
    (0.0, r'in \(0, 1\]'), (1.5, r'in \(0, 1\]'), (float('nan'), r'in \(0, 1\]'),
    (target_density.Target(0.3, scope='net'), 'scope'), (target_density.Target(0.3, count='filters'), 'count'),
    (target_density.Target(0.3, method='sort'), 'method'), (target_density.Target(0.3, every=0), 'every'),
    (target_density.Target(0.3, method='dual', rate=-1.0), 'rate')])
def test_bad_targets_are_refused(bad, message):
  with pytest.raises(ValueError, match=message):
    dl.dessilbi(0.1, target_density=bad)


def test_target_without_structured_leaves_and_with_non_finite_norms():
  tx = dl.dessilbi(0.1, target_density=0.3)
  state = tx.init({})
  assert tx.update({}, state, {})[1].threshold == {}
  w = jnp.arange(1.0, 13.0).reshape(4, 3).at[0, 0].set(jnp.nan).at[1, 1].set(jnp.inf)
  tx = dl.dessilbi(0.1, mu=1.0, lambdas=0.0, target_density=target_density.Target(0.5, method='budget'))
  state = tx.init({'dense': w})
  _, state = tx.update({'dense': jnp.zeros((4, 3))}, state, {'dense': w})   # Z_1 = 0.1·W: NaN, +inf
  # A NaN norm never counts, the +inf one does: 6 weights of the budget, the inf one and the 5 largest.
  assert float(state.threshold['dense']) == pytest.approx(0.1 * 7.0, rel=1e-6)
  finite = np.isfinite(np.asarray(w))
  kept = (np.asarray(state.gamma['dense']) != 0) & ~np.isnan(np.asarray(state.gamma['dense']))
  assert kept.sum() == 6 and kept[1, 1] and np.isnan(np.asarray(state.gamma['dense'])[0, 0])
  assert set(np.asarray(w)[kept & finite].tolist()) == {8.0, 9.0, 10.0, 11.0, 12.0}


def test_dual_ascent_with_a_lower_floor_reaches_a_density_dessilbi_would_not():
  """λ_min = 0 lets λ fall below the given λ: after 15 steps the plain run's support is still empty,
  the steered one holds 40 % and more of the weights, and λ + t never goes below 0."""
  plain, _ = _run(None, 15)
  assert _density(plain[-1][1], plain[-1][0]) == 0
  history, _ = _run(target_density.Target(0.5, method='dual', rate=0.05, lam_min=0.0), 15)
  offsets = [float(s.threshold['conv']) for _, s in history]
  assert min(offsets) >= -LAM - 1e-7 and min(offsets) < -0.1
  assert _density(history[14][1], history[14][0]) >= 0.4
  with pytest.raises(ValueError, match='lam_min must be >= 0'):
    dl.dessilbi(0.1, target_density=target_density.Target(0.3, method='dual', lam_min=-1.0))


def test_train_command_with_a_target_density(tmp_path, capsys):
  """`dessilbi train --target-density`: the run's support ends near the target (a 4-epoch digits run of an
  MLP, dual ascent) and the summary names the target; flags the optimizer cannot take are refused."""
  from dessilbi_jax import cli
  out = tmp_path / 'run'
  cli.main(['train', '--model', 'mlp', '--epochs', '4', '--target-density', '0.2', '--dual-lr', '0.05',
            '--out', str(out), '--quiet'])
  summary = capsys.readouterr().out
  assert 'target 20.0%' in summary
  rows = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
  assert rows[-1]['weights_kept'] == pytest.approx(0.2, abs=0.02)
  assert json.loads((out / 'config.json').read_text())['opt']['target_density'] == 0.2
  for argv, message in ((['--optimizer', 'sgd', '--target-density', '0.3'], '--target-density: an option of --optimizer dessilbi or l0'),
                        (['--target-density', '0'], r'--target-density: must be in \(0, 1\]'),
                        (['--target-density', '0.3', '--target-method', 'sort'], '--target-method: must be one of'),
                        (['--target-density', '0.3', '--dual-lr', '-1'], '--dual-lr: must be in')):
    assert cli.main(['train', *argv, '--epochs', '1', '--out', str(tmp_path / 'bad')]) == 1
    err = capsys.readouterr().err
    assert re.search(message, err), (argv, err)
    assert not (tmp_path / 'bad').exists()


# -- a lean state (store_gamma=False) under a target -----------------------------------------------

def _assert_same_run(stored, lean):
  """Every step of two runs: params, Z, s, entry steps, thresholds and Γ (dl.gamma), bit for bit."""
  for k, ((p_a, s_a), (p_b, s_b)) in enumerate(zip(stored, lean)):
    assert all(g is None for g in jax.tree.leaves(s_b.gamma, is_leaf=lambda x: x is None))
    for name, a, b in (('W', p_a, p_b), ('Z', s_a.z, s_b.z), ('s', s_a.gamma_scale, s_b.gamma_scale),
                       ('entry', s_a.entry_step, s_b.entry_step), ('t', s_a.threshold, s_b.threshold),
                       ('b', s_a.trace, s_b.trace), ('Γ', s_a.gamma, dl.gamma(s_b))):
      assert jax.tree.structure(a) == jax.tree.structure(b), (k, name)
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y, err_msg=f'step {k}: {name}')


@pytest.mark.parametrize('target', [target_density.Target(0.3, method='budget'),
                                    target_density.Target(0.3, scope='layer', every=10, method='budget'),
                                    target_density.Target(0.3, method='dual', rate=0.5),
                                    target_density.Target(0.5, method='dual', rate=0.05, lam_min=0.0)],
                         ids=['budget', 'budget_layer_every_10', 'dual', 'dual_floor_0'])
def test_lean_state_under_a_target_is_the_stored_one(target):
  """The lasso leaf's Γ_k is rebuilt with the effective λ that made it (with the state's threshold),
  not with the one the step finds: 100 steps equal the stored run's bit for bit."""
  stored, _ = _run(target, 100, kappa=1.3)
  lean, _ = _run(target, 100, kappa=1.3, store_gamma=False)
  _assert_same_run(stored, lean)
  thresholds = {float(s.threshold['dense']) for _, s in lean}
  assert len(thresholds) > 3   # λ moved
  lam = lean[-1][1].gamma_lambda['dense']
  t = lean[-1][1].threshold['dense']   # the state's threshold made its Γ (the search runs within the step)
  assert float(lam) == float(jnp.asarray(target_density.effective_lambda(LAM, t, target.method), jnp.float32))


def test_lean_state_under_inject_hyperparams_changing_the_target_and_lambda():
  params, grad = _problem()
  runs = []
  for store in (True, False):
    p = params
    tx = optax.inject_hyperparams(dl.dessilbi, static_args=('groups',))(
        learning_rate=ALPHA, mu=MU, lambdas=LAM, kappa=1.0, groups=lambda path, w: KINDS[path], target_density=0.4,
        store_gamma=store)
    state, update, history = tx.init(p), jax.jit(tx.update), []
    for k in range(160):
      if k == 80:
        state.hyperparams.update(target_density=jnp.asarray(0.2), lambdas=jnp.asarray(0.3), kappa=jnp.asarray(1.4))
      updates, state = update(grad(p), state, p)
      p = optax.apply_updates(p, updates)
      history.append((p, state.inner_state))
    runs.append(history)
  _assert_same_run(*runs)
