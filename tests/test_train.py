"""Tests of dessilbi_jax.train and dessilbi_jax.train.checkpoint: files, resume, kills, pmap, masks."""

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dessilbi_jax as dl
from dessilbi_jax.train import checkpoint
from dessilbi_jax import data
from dessilbi_jax import train

REPO = pathlib.Path(__file__).resolve().parents[1]
# A small LeNet on digits: 11 steps of 128 examples per epoch, a second or so once compiled (conftest.TINY).
TINY = dict(model='lenet', dataset='digits', widths=(4, 8, 16, 16), batch_size=128, epochs=2, lr=0.05)


# data_dir, tiny (TrainConfig(**TINY)) and run (its 2-epoch run and result): tests/conftest.py.


def _assert_trees_equal(a, b):
  equal = jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)
  assert all(jax.tree.leaves(equal)), equal


def _run_script(script: str, env_extra=None, timeout=240):
  env = {**os.environ, **(env_extra or {}), 'PYTHONPATH': str(REPO)}
  return subprocess.run([sys.executable, '-c', textwrap.dedent(script)], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


def test_fit_writes_metrics_path_and_checkpoints_and_the_plots_come_from_them(run, tiny, tmp_path):
  out, result = run
  lines = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
  assert [h['epoch'] for h in lines] == [1, 2] and lines == result.history
  assert [h['step'] for h in lines] == [11, 22]
  for key in ('train_loss', 'dense_test_acc', 'sparse_test_acc', 'weights_kept', 'groups_kept', 'per_leaf'):
    assert key in lines[-1]
  assert lines[-1]['dense_test_acc'] > 0.3  # 10 classes: well above chance after 22 steps

  # The per-leaf table and the totals are those of the final optimizer state.
  summary = dl.sparsity_summary(result.params, result.opt_state)
  assert lines[-1]['per_leaf'] == summary
  structured = [r for r in summary.values() if r['kind']]
  assert lines[-1]['weights_kept'] == sum(r['weights_kept'] for r in structured) / sum(r['weights'] for r in structured)

  path = train.load_path(out)
  np.testing.assert_array_equal(path['epoch'], [1, 2])
  conv = 'Conv_1/kernel'
  assert str(path[f'kind/{conv}']) == 'filter'
  assert path[f'support/{conv}'].shape == (2, 1, 1, 1, 8)
  entry = dl.entry_step(result.opt_state)['Conv_1']['kernel']
  np.testing.assert_array_equal(path[f'entry_step/{conv}'], entry)
  # Groups that never entered are outside the support at every epoch; the last row is Γ's support now.
  assert not path[f'support/{conv}'][:, entry < 0].any()
  np.testing.assert_array_equal(path[f'support/{conv}'][-1],
                                np.any(dl.support(result.opt_state)['Conv_1']['kernel'], axis=(0, 1, 2), keepdims=True))
  assert checkpoint.saved_epochs(out / 'checkpoints') == [1, 2]
  assert train.load_config(out) == tiny
  # fit draws no plots; write_run_plots draws them from the run's files (as `dessilbi train` does).
  assert not (out / 'plots').exists()
  drawn = tmp_path / 'drawn'
  shutil.copytree(out, drawn)
  train.write_run_plots(drawn)
  assert sorted(p.name for p in (drawn / 'plots').iterdir()) == ['accuracy.png', 'entry_steps.png', 'support.png']


def test_evaluate_matches_a_plain_numpy_count(run, tiny):
  _, result = run
  model, _ = train.build_model(tiny)
  x, y = data.load_arrays('digits', 'test', data_dir=tiny.data_dir)
  sparse = dl.sparse_params(result.params, result.opt_state)
  for params, key in ((result.params, 'dense_test_acc'), (sparse, 'sparse_test_acc')):
    reference = np.mean(np.argmax(model.apply({'params': params}, x), -1) == y)
    assert train.evaluate(model, {'params': params}, 'digits', batch_size=100, data_dir=tiny.data_dir) == pytest.approx(reference)
    assert result.history[-1][key] == pytest.approx(reference)


def test_resume_is_bit_identical_to_a_straight_run(run, tiny, tmp_path):
  _, straight = run
  out = tmp_path / 'resumed'
  train.fit(dataclasses.replace(tiny, epochs=1), out, quiet=True)
  resumed = train.fit(tiny, out, resume=True, quiet=True)
  _assert_trees_equal(resumed.params, straight.params)
  _assert_trees_equal(resumed.opt_state, straight.opt_state)
  _assert_trees_equal(resumed.init_params, straight.init_params)
  assert [h['epoch'] for h in resumed.history] == [1, 2]
  np.testing.assert_array_equal(train.load_path(out)['support/Conv_1/kernel'],
                                train.load_path(run[0])['support/Conv_1/kernel'])


def test_a_run_killed_while_saving_resumes_from_the_previous_checkpoint(run, tiny, tmp_path):
  out = tmp_path / 'killed'
  killed = _run_script(f"""
      import os, pathlib, signal, time
      from dessilbi_jax import train
      from dessilbi_jax.train import checkpoint
      real_save = checkpoint.save
      checkpoints = pathlib.Path({str(out / 'checkpoints')!r})
      def save_then_die(manager, epoch, state, record, **arrays):
        real_save(manager, epoch, state, record, **arrays)  # the write goes on in a background thread ...
        if epoch == 2:
          # ... wait until it is visibly under way (its temporary directory) or done, so the kill
          # cannot land before the write has touched the disk ...
          deadline = time.monotonic() + 30
          while time.monotonic() < deadline and not any(
              p.name.startswith('2') for p in checkpoints.iterdir()):
            time.sleep(0.0005)
          os.kill(os.getpid(), signal.SIGKILL)  # ... and the process dies under it
      checkpoint.save = save_then_die
      train.fit(train.TrainConfig(**{TINY!r}, data_dir={tiny.data_dir!r}), {str(out)!r}, quiet=True)
      """)
  assert killed.returncode == -9, killed.stderr
  leftovers = [p.name for p in (out / 'checkpoints').iterdir() if 'tmp' in p.name]
  # Either the epoch-2 write was caught half-way (a temporary directory) or it had finished.
  assert leftovers or checkpoint.saved_epochs(out / 'checkpoints') == [1, 2]
  # A stray half-written checkpoint of a later epoch is ignored as well.
  (out / 'checkpoints' / '3.orbax-checkpoint-tmp-99').mkdir()
  assert checkpoint.saved_epochs(out / 'checkpoints')[-1] in (1, 2)

  resumed = train.fit(tiny, out, resume=True, quiet=True)
  _assert_trees_equal(resumed.params, run[1].params)
  assert [h['epoch'] for h in resumed.history] == [1, 2]
  assert [json.loads(line)['epoch'] for line in (out / 'metrics.jsonl').read_text().splitlines()] == [1, 2]


def test_a_damaged_checkpoint_gets_a_clear_error(run, tiny, tmp_path):
  out = tmp_path / 'damaged'
  shutil.copytree(run[0], out)
  for file in (out / 'checkpoints' / '2' / 'state').rglob('*'):
    if file.is_file() and file.parent.name == 'd':
      file.write_bytes(b'garbage')
  with pytest.raises(ValueError, match=r'epoch 2 .* unreadable.*Delete .*checkpoints/2 to resume from epoch 1'):
    train.fit(tiny, out, resume=True, quiet=True)
  with pytest.raises(ValueError, match='does not match'):
    checkpoint.restore(out / 'checkpoints', {'w': np.zeros(3)}, epoch=1)


def test_no_overwrite_and_nothing_to_resume(run, tiny, tmp_path):
  before = sorted(p.name for p in run[0].iterdir())
  with pytest.raises(FileExistsError, match='not empty; pass --resume'):
    train.fit(tiny, run[0], quiet=True)
  assert sorted(p.name for p in run[0].iterdir()) == before
  with pytest.raises(FileNotFoundError, match='Nothing to resume'):
    train.fit(tiny, tmp_path / 'empty', resume=True, quiet=True)
  with pytest.raises(ValueError, match=r"changed: lr: 0.05 -> 0.5"):
    train.fit(dataclasses.replace(tiny, lr=0.5), run[0], resume=True, quiet=True)


def _nan_after(step):
  """SGD whose updates become NaN from update ``step + 1`` on."""
  sgd = optax.sgd(0.1)

  def init(params):
    return (sgd.init(params), jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    inner, count = state
    updates, inner = sgd.update(updates, inner, params)
    updates = jax.tree.map(lambda u: jnp.where(count >= step, jnp.nan, u), updates)
    return updates, (inner, count + 1)

  return optax.GradientTransformation(init, update)


def test_a_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tiny, tmp_path):
  out = tmp_path / 'nan'
  with pytest.raises(FloatingPointError, match=r'at step 17 \(epoch 2\).*epoch 1 .*lower learning rate'):
    train.fit(tiny, out, tx=_nan_after(15), quiet=True)
  assert checkpoint.saved_epochs(out / 'checkpoints') == [1]
  assert [json.loads(line)['epoch'] for line in (out / 'metrics.jsonl').read_text().splitlines()] == [1]


def test_masked_weights_stay_exactly_zero(run, tiny):
  _, result = run
  masks = train.ticket_masks(run[0], 1, result.params)
  kernel = masks['Dense_0']['kernel']
  assert masks['Dense_0']['bias'] is None and kernel.shape == result.params['Dense_0']['kernel'].shape
  # Make sure both kinds of entries exist whatever the path found.
  masks['Dense_0']['kernel'] = np.arange(kernel.size).reshape(kernel.shape) % 3 == 0
  masks['Conv_0']['kernel'] = np.broadcast_to(np.arange(4) % 2 == 0, (5, 5, 1, 4))
  ticket = train.fit(dataclasses.replace(tiny, optimizer='sgd'), masks=masks, quiet=True)
  for leaf in ('Dense_0', 'Conv_0'):
    w, m = np.asarray(ticket.params[leaf]['kernel']), np.broadcast_to(masks[leaf]['kernel'], ticket.params[leaf]['kernel'].shape)
    assert np.all(w[~m] == 0)
    assert np.count_nonzero(w[m]) == m.sum()
  assert ticket.history[-1]['weights_kept'] < 1


def test_make_optimizer_names(tiny):
  for name in train.OPTIMIZERS:
    tx = train.make_optimizer(dataclasses.replace(tiny, optimizer=name), steps_per_epoch=11)
    assert isinstance(tx, optax.GradientTransformation)
  with pytest.raises(ValueError, match='Unknown optimizer'):
    train.make_optimizer(dataclasses.replace(tiny, optimizer='lbfgs'), 11)
  schedule = train.learning_rate_schedule(dataclasses.replace(tiny, lr_decay_epochs=(2,)), 11)
  assert float(schedule(21)) == pytest.approx(0.05) and float(schedule(22)) == pytest.approx(0.005)


def test_bad_inputs_fail_before_training(tiny, monkeypatch):
  with pytest.raises(ValueError, match='Unknown model'):
    train.check_config(dataclasses.replace(tiny, model='lenet7'))
  with pytest.raises(ValueError, match='dataset'):
    train.check_config(dataclasses.replace(tiny, dataset='svhn'))
  monkeypatch.setattr(jax, 'local_device_count', lambda: 8)
  with pytest.raises(ValueError, match='does not split over the 8 devices'):
    train.check_config(dataclasses.replace(tiny, batch_size=100))


@pytest.mark.slow   # a subprocess with 8 devices
def test_eight_devices_give_the_params_of_one(tiny, tmp_path):
  """The same global batches on 8 virtual CPU devices (pmean of gradients, synced batch norm) and on 1."""
  # ResNet-20 with one block per stage (the others removed): batch norm, strides and a widening shortcut, a
  # third of the compile time.
  cfg = dataclasses.replace(tiny, model='resnet20', widths=(4, 4, 8), epochs=1, batch_size=64,
                            layer_widths=(('block_widths', (4, 0, 0, 4, 0, 0, 8, 0, 0)),))
  saved = tmp_path / 'eight.npz'
  result = _run_script(f"""
      import jax, numpy as np
      from dessilbi_jax import train
      from dessilbi_jax.core import grouping
      assert jax.local_device_count() == 8
      result = train.fit(train.TrainConfig(**{dataclasses.asdict(cfg)!r}), quiet=True)
      flat = jax.tree_util.tree_flatten_with_path((result.params, result.batch_stats))[0]
      np.savez({str(saved)!r}, **{{grouping.path_str(p): x for p, x in flat}})
      """, env_extra={'XLA_FLAGS': '--xla_force_host_platform_device_count=8', 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 0, result.stderr[-3000:]
  one = train.fit(cfg, quiet=True)
  eight = np.load(saved)
  flat = jax.tree_util.tree_flatten_with_path((one.params, one.batch_stats))[0]
  assert len(flat) == len(eight.files) and any('mean' in name for name in eight.files)
  for keypath, w in flat:
    np.testing.assert_allclose(eight[dl.grouping.path_str(keypath)], w, rtol=1e-4, atol=1e-5)


def test_presets_pick_model_and_hyperparameters_and_overrides_win():
  assert train.preset() == train.PRESETS['digits'] == train.TrainConfig()
  mnist1d = train.preset('mnist1d')
  assert (mnist1d.model, mnist1d.dataset) == ('conv1d', 'mnist1d') and mnist1d == train.PRESETS['mnist1d']
  cfg = train.preset('mnist1d', epochs=3, lambdas=0.5, seed=2)
  assert (cfg.model, cfg.epochs, cfg.lambdas, cfg.seed) == ('conv1d', 3, 0.5, 2)
  assert cfg.mu == mnist1d.mu and cfg.lr_decay_epochs == mnist1d.lr_decay_epochs
  assert train.preset('mnist1d', optimizer='adam').lr == 1e-3
  assert train.preset('mnist1d', optimizer='adam', lr=0.01).lr == 0.01
  # No preset: the defaults with the model that fits the input (images: LeNet-5, signals: conv1d).
  assert train.preset('cifar10') == train.TrainConfig(dataset='cifar10')
  with pytest.raises(ValueError, match=r"Unknown TrainConfig field\(s\) \['lamda'\]"):
    train.preset('digits', lamda=0.1)
  with pytest.raises(ValueError, match='svhn'):
    train.preset('svhn')


def _state_after(tx, params, grads, steps):
  """The state of ``tx`` after ``steps`` updates with the same gradients."""
  state, p = tx.init(params), params
  for _ in range(steps):
    updates, state = tx.update(grads, state, p)
    p = optax.apply_updates(p, updates)
  return state


def test_config_json_round_trips_per_kind_lambdas(tiny, tmp_path):
  cfg = dataclasses.replace(tiny, lambdas=(('filter', 2.0), ('lasso', 0.01)))
  assert train.TrainConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
  for name, entry in train.OPTIMIZERS.items():   # every sub-config, its fields changed from the defaults
    changed = {f: (0.5 if isinstance(v, float) or v is None else not v if isinstance(v, bool) else v)
               for f, v in dataclasses.asdict(entry.config()).items()}
    other = dataclasses.replace(tiny, optimizer=name, **changed)
    assert train.TrainConfig.from_json(json.loads(json.dumps(other.to_json()))) == other
  with pytest.raises(ValueError, match=r"unknown group kind\(s\) \['filtre'\]"):
    train.check_config(dataclasses.replace(tiny, lambdas=(('filtre', 1.0),)))

  # make_optimizer builds DessiLBI with λ per kind: the same steps as dl.dessilbi with the mapping.
  model, info = train.build_model(cfg)
  params = train.init_variables(model, info.input_shape, jax.random.PRNGKey(0))['params']
  grads = jax.tree.map(lambda w: jnp.full_like(w, 0.5), params)
  reference = dl.dessilbi(train.learning_rate_schedule(cfg, 11), mu=cfg.mu, lambdas={'filter': 2.0, 'lasso': 0.01},
                          normalize_groups=cfg.normalize_groups)
  states = [_state_after(tx, params, grads, 40) for tx in (train.make_optimizer(cfg, 11), reference)]
  _assert_trees_equal(dl.gamma(states[0]), dl.gamma(states[1]))
  assert any(np.any(s) for s in jax.tree.leaves(dl.support(states[0])))


def test_a_lean_state_run_writes_the_stored_runs_files(run, tiny, tmp_path):
  """store_gamma=False (a lean DessiLBI state): the same metrics, path.npz and final numbers as the
  stored run's, bit for bit, and it resumes from its checkpoint to the straight run's state."""
  out, stored = run
  lean_cfg = dataclasses.replace(tiny, store_gamma=False)
  lean_out = tmp_path / 'lean'
  train.fit(dataclasses.replace(lean_cfg, epochs=1), lean_out, quiet=True)
  lean = train.fit(lean_cfg, lean_out, resume=True, quiet=True)
  inner, = dl.find_states(lean.opt_state)
  assert all(g is None for g in jax.tree.leaves(inner.gamma, is_leaf=lambda x: x is None))
  untimed = lambda history: [{k: v for k, v in h.items() if k != 'seconds'} for h in history]
  assert untimed(lean.history) == untimed(stored.history)
  _assert_trees_equal(lean.params, stored.params)
  _assert_trees_equal(dl.gamma(lean.opt_state), dl.gamma(stored.opt_state))
  _assert_trees_equal(dl.entry_step(lean.opt_state), dl.entry_step(stored.opt_state))
  lean_path, stored_path = train.load_path(lean_out), train.load_path(out)
  assert sorted(lean_path) == sorted(stored_path)
  for key in stored_path:
    np.testing.assert_array_equal(lean_path[key], stored_path[key], err_msg=key)
  assert train.load_config(lean_out) == lean_cfg


# The optimizer registry: a field has one meaning and one default, in its optimizer's sub-config.

DATA = pathlib.Path(__file__).resolve().parent / 'data'


@pytest.mark.parametrize('name,expected', [
    ('dessilbi_target', train.TrainConfig(
        epochs=3, widths=(4, 8, 16, 16),
        opt=train.optimizers.DessiLBI(lambdas=(('filter', 1.0), ('lasso', 0.2)), store_gamma=False,
                                      target_density=0.3, target_method='budget', constraint='layer', dual_lr=0.02))),
    # dual_lr and droprate_init were null (a default resolved later); L0's own defaults now.
    ('l0', train.TrainConfig(model='conv1d', dataset='mnist1d', optimizer='l0', epochs=2, lr=0.05,
                             lr_decay_epochs=(20,), widths=(4, 4, 4),
                             opt=train.optimizers.L0(target_density=0.25, gates_lr=5.0, dual_lr=0.1,
                                                     droprate_init=0.3))),
    ('gmp', train.TrainConfig(optimizer='gmp_structured', epochs=2, opt=train.optimizers.GMP(sparsity=0.5))),
])
def test_a_flat_config_json_of_before_the_registry_loads(name, expected):
    """tests/data/flat_config_*/config.json were written by the trainer before the registry (every
    optimizer's fields side by side); they load into the named optimizer's sub-config."""
    flat = json.loads((DATA / f'flat_config_{name}' / 'config.json').read_text())
    assert 'opt' not in flat and 'kappa' in flat and 'sparsity' in flat   # the old layout indeed
    cfg = train.load_config(DATA / f'flat_config_{name}')
    assert cfg == expected
    assert cfg.to_json()['opt'] == dataclasses.asdict(expected.opt)   # written back nested
    train.check_values(cfg)


def test_each_field_lives_in_its_optimizers_sub_config():
  l0 = train.TrainConfig(optimizer='l0', target_density=0.3)
  assert l0.opt == train.optimizers.L0(target_density=0.3) and l0.target_density == l0.opt.target_density
  # dual_lr: one field per optimizer, each with its own default.
  assert (train.preset().opt.dual_lr, l0.opt.dual_lr) == (0.01, 0.1)
  assert train.preset(target_density=0.3).opt.target_density == 0.3
  # Read and replaced flat, another optimizer's defaults on a change of optimizer.
  cfg = dataclasses.replace(train.preset('mnist1d'), kappa=2.0)
  assert (cfg.opt.kappa, cfg.kappa, cfg.opt.lambdas) == (2.0, 2.0, 0.1)
  assert dataclasses.replace(cfg, optimizer='gmp').opt == train.optimizers.GMP()
  # A field the optimizer does not have: one error naming the optimizers that have it.
  with pytest.raises(train.ConfigError, match=r'an option of --optimizer gmp or gmp_structured; --optimizer '
                                              r'dessilbi cannot take it') as error:
    train.TrainConfig(sparsity=0.5)
  assert error.value.with_flag().startswith('--sparsity: ')
  with pytest.raises(AttributeError, match="no field 'sparsity'.*gmp"):
    train.TrainConfig().sparsity
  assert train.TrainConfig(optimizer='l0_penalty', target_density=None, penalty=0.05).opt.penalty == 0.05
  with pytest.raises(train.ConfigError, match='--optimizer l0 needs --target-density'):
    train.check_values(train.TrainConfig(optimizer='l0'))
  with pytest.raises(TypeError, match="unexpected keyword argument 'kapa'"):
    train.TrainConfig(kapa=1.0)


def test_the_registry_builds_each_optimizer_once_per_setting(tiny):
  tx = train.make_optimizer(tiny, 11)
  # Fields that do not reach the optimizer (the seed, the epochs of a schedule that does not end) share it.
  assert train.make_optimizer(dataclasses.replace(tiny, seed=3, epochs=9), 11) is tx
  assert train.make_optimizer(dataclasses.replace(tiny, kappa=2.0), 11) is not tx
  gmp = dataclasses.replace(tiny, optimizer='gmp')
  assert train.make_optimizer(gmp, 11) is train.make_optimizer(dataclasses.replace(gmp, seed=1), 11)
  assert train.make_optimizer(gmp, 11) is not train.make_optimizer(dataclasses.replace(gmp, epochs=3), 11)


def test_the_target_fields_reach_dessilbis_update(tiny):
  """--target-density, --target-method, --constraint and --dual-lr: make_optimizer's DessiLBI takes the
  same steps as dl.dessilbi given that Target."""
  cfg = dataclasses.replace(tiny, target_density=0.2, constraint='layer', dual_lr=0.5)
  model, info = train.build_model(cfg)
  params = train.init_variables(model, info.input_shape, jax.random.PRNGKey(0))['params']
  grads = jax.tree.map(lambda w: jnp.full_like(w, 0.5), params)
  target = dl.core.target_density.Target(0.2, scope='layer', method='dual', rate=0.5)
  reference = dl.dessilbi(train.learning_rate_schedule(cfg, 11), mu=cfg.mu, lambdas=cfg.lambdas,
                          normalize_groups=True, target_density=target)
  default_rate = dl.dessilbi(train.learning_rate_schedule(cfg, 11), mu=cfg.mu, lambdas=cfg.lambdas,
                             normalize_groups=True, target_density=target._replace(rate=0.01))
  states = [_state_after(tx, params, grads, 30) for tx in (train.make_optimizer(cfg, 11), reference, default_rate)]
  _assert_trees_equal(dl.gamma(states[0]), dl.gamma(states[1]))
  assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, dl.gamma(states[0]), dl.gamma(states[2]))))


def test_a_new_optimizer_is_one_registry_entry(tiny, monkeypatch):
  """A sub-config, a build and an extension factory: the config, make_optimizer, fit's extensions and
  `dessilbi train --help` take it with no other edit."""
  from dessilbi_jax import cli

  @dataclasses.dataclass(frozen=True)
  class Lion:
    b1: float = train.optimizers.field(0.9, 'Lion\'s β₁')

    def check(self):
      train.optimizers.check_number('b1', self.b1, low=0, high=1, high_open=True)

  seen = train.Extension('seen', metrics=lambda epoch: {'seen': 1}, summary=lambda row: f'seen {row["seen"]}')
  entry = train.Optimizer(Lion, lambda opt, s: optax.lion(s.schedule, b1=opt.b1, weight_decay=s.weight_decay), (lambda cfg: seen,))
  monkeypatch.setitem(train.OPTIMIZERS, 'lion', entry)
  cfg = dataclasses.replace(tiny, optimizer='lion', b1=0.5)
  assert cfg.opt == Lion(0.5)
  with pytest.raises(train.ConfigError, match=r'b1: must be in \[0, 1\)'):
    train.check_values(dataclasses.replace(cfg, b1=1.0))
  params = {'w': jnp.ones(3)}
  updates, _ = train.make_optimizer(cfg, 11).update({'w': jnp.ones(3)}, train.make_optimizer(cfg, 11).init(params), params)
  np.testing.assert_allclose(updates['w'], -cfg.lr * np.ones(3))   # Lion without decay: −α·sign(update)
  assert [e.name for e in train.optimizers.default_extensions(cfg)] == ['seen']
  assert train.extensions.summaries(train.optimizers.default_extensions(cfg), {'seen': 1}) == ('seen 1',)
  help_text = cli.build_parser()._subparsers._group_actions[0].choices['train'].format_help()
  assert '--b1' in help_text and "lion: Lion's β₁ (default 0.9)" in ' '.join(help_text.split())
