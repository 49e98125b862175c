"""Growth in the training loop: widening in place, resume across a growth round, reset-state, the command."""

import dataclasses
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dessilbi_jax as dl
from dessilbi_jax import cli
from dessilbi_jax import data
from dessilbi_jax import growth
from dessilbi_jax import structure
from dessilbi_jax import train

# Small λ so that groups enter Γ's support within the first epochs and the layers saturate at once.
TINY = dict(model='lenet', dataset='digits', widths=(2, 4, 8, 8), batch_size=128, epochs=3, lr=0.05,
            lr_decay_epochs=(2,), lambdas=0.02, mu=2.0)
RULE = dict(grow_every=1, finetune_epochs=1, tau=0.5, min_add={'conv': 1, 'dense': 2})


@pytest.fixture(scope='module')
def tiny(data_dir):
  return train.TrainConfig(**TINY, data_dir=data_dir)


@pytest.fixture(scope='module')
def straight(tiny, tmp_path_factory):
  out = tmp_path_factory.mktemp('runs') / 'straight'
  return out, growth.grow(tiny, growth.GrowthSettings(**RULE), out, quiet=True)


def _same(a, b):
  equal = jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)
  return all(jax.tree.leaves(equal))


def _lenet_macs(c1, c2, f1, f2, classes=10):
  """LeNet-5 on 8×8 digits: conv 5×5 on 8×8 positions, conv 5×5 on 4×4, dense 2·2·c2 → f1 → f2 → classes."""
  return 64 * 25 * c1 + 16 * 25 * c1 * c2 + 4 * c2 * f1 + f1 * f2 + f2 * classes


def test_training_compute_is_three_forward_passes_per_example_seen(straight, tiny):
  out, result = straight
  rows = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
  examples = (data.dataset_info('digits').num_train // TINY['batch_size']) * TINY['batch_size']
  total = 0
  for row in rows:   # each epoch trains at the widths its row records (growth happens after the epoch)
    forward = _lenet_macs(*row['widths'].values())
    total += 3 * forward * examples
    assert row['macs'] == forward and row['train_macs'] == total, row['epoch']
  assert len({tuple(r['widths'].values()) for r in rows}) == 3   # three widths: the sum is not one width × epochs
  cost = growth.training_cost(result.history, tiny)
  assert cost['train_macs'] == total
  assert cost['reference_macs'] == _lenet_macs(6, 16, 120, 84)
  assert cost['reference_train_macs'] == 3 * _lenet_macs(6, 16, 120, 84) * examples * TINY['epochs']
  assert cost['seconds'] == pytest.approx(sum(r['seconds'] for r in rows)) and cost['seconds'] > 0


def test_a_budget_refuses_the_round_past_it_in_the_loop(one_epoch):
  cfg, model, info, tx, state = one_epoch
  cfg = dataclasses.replace(cfg, epochs=TINY['epochs'])   # epoch 1 of 3 is a check (of 1, it would fine-tune)
  free = growth.growth_extension(growth.GrowthSettings(**RULE), echo=False).metrics(_epoch(cfg, model, tx, state, {}))
  assert free['grown'], 'no layer saturates after one epoch: the test problem changed'
  proposed = _lenet_macs(*(free['grown'].get(n, w) for n, w in free['widths'].items()))
  for budget, grows in ((proposed, True), (proposed - 1, False)):
    settings = growth.GrowthSettings(**RULE, target_macs=budget)
    row = growth.growth_extension(settings, echo=False).metrics(_epoch(cfg, model, tx, state, {}))
    assert row['grown'] == (free['grown'] if grows else {})
    assert row['growth'] == ('growing' if grows else 'stopped')
    assert row.get('over_budget') == (None if grows else proposed)


def test_a_growth_run_widens_records_and_plots(straight):
  out, result = straight
  rows = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
  grown = [r for r in rows if r['grown']]
  assert grown, 'no layer grew: the test problem does not saturate'
  for before, after in zip(rows, rows[1:]):
    for name, width in after['widths'].items():   # a layer widens exactly when its round says so
      assert width == before['grown'].get(name, before['widths'][name])
  assert rows[-1]['growth'] == 'finetune' and not rows[-1]['grown']
  # The final network has the recorded widths, and so does the last checkpoint.
  model, _ = train.build_model(train.load_config(out), result.widths)
  assert tuple(model.widths) == tuple(rows[-1]['widths'].values())
  assert jax.tree.map(np.shape, result.params) == jax.tree.map(
      np.shape, jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))['params'])
  assert (out / 'plots' / 'widths.png').stat().st_size > 0
  assert json.loads((out / 'growth.json').read_text())['settings']['tau'] == RULE['tau']


def test_resume_across_a_growth_round_is_bit_identical(tiny, straight, tmp_path):
  # A run interrupted after epoch 1 (its later checkpoints and rows gone, as after a kill) and resumed
  # must cross the rounds at epochs 1 (restored widths) and 2 (grown after the resume) as the straight run.
  out, expected = straight
  copy = tmp_path / 'resumed'
  shutil.copytree(out, copy)
  for epoch in (2, 3):
    shutil.rmtree(copy / 'checkpoints' / str(epoch))
  assert [r['epoch'] for r in expected.history if r['grown']] == [1, 2]
  resumed = growth.grow(tiny, growth.GrowthSettings(**RULE), copy, resume=True, quiet=True)
  assert resumed.resumed_from == 1
  assert resumed.widths == expected.widths
  assert _same(resumed.params, expected.params)
  assert _same(resumed.opt_state, expected.opt_state)


@pytest.fixture(scope='module')
def one_epoch(tiny):
  """A 1-epoch run's config, model, dataset info, optimizer and final state."""
  cfg = dataclasses.replace(tiny, epochs=1)
  result = train.fit(cfg, quiet=True)
  model, info = train.build_model(cfg, result.widths)
  tx = train.make_optimizer(cfg, 11)
  return cfg, model, info, tx, result.state


def _epoch(cfg, model, tx, state, grown):
  widths = tuple(model.widths)
  return train.Epoch(1, cfg, model, widths, state, tx, 11, {'grown': grown}, None, ())


@pytest.mark.parametrize('reset_state', [False, True])
def test_widening_in_the_loop_keeps_the_function_and_the_state(one_epoch, reset_state):
  cfg, model, info, tx, state = one_epoch
  extension = growth.growth_extension(growth.GrowthSettings(**RULE), reset_state=reset_state, echo=False)
  reshaped = extension.epoch_end(_epoch(cfg, model, tx, state, {'Conv_1': 6, 'Dense_0': 11}))
  assert reshaped.widths == (2, 6, 11, 8)
  wide, _ = train.build_model(cfg, reshaped.widths)
  x = next(iter(data.eval_batches('digits', 'test', 64, data_dir=cfg.data_dir)))['image']
  before = model.apply({'params': state.params}, x)
  after = wide.apply({'params': reshaped.state.params}, x)
  if reset_state:   # the official behaviour: random fan-out changes the function, the state restarts
    assert not np.allclose(before, after, rtol=1e-3)
    assert all(float(jnp.max(jnp.abs(z))) == 0 for z in jax.tree.leaves(dl.z(reshaped.state.opt_state)))
  else:
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)
    old_z = dl.z(state.opt_state)['Conv_1']['kernel']
    new_z = dl.z(reshaped.state.opt_state)['Conv_1']['kernel']
    assert np.array_equal(new_z[..., :4], old_z) and not np.any(new_z[..., 4:])
    entry = dl.entry_step(reshaped.state.opt_state)['Conv_1']['kernel']
    assert np.all(np.asarray(entry)[..., 4:] == -1)
    assert np.array_equal(reshaped.state.params['Conv_0']['kernel'], state.params['Conv_0']['kernel'])


def test_support_rates_count_units_with_a_weight_in_the_support(one_epoch):
  cfg, model, info, tx, state = one_epoch
  variables = {'params': state.params}
  unit_map = structure.trace(model, variables, jnp.zeros((1, *info.input_shape)))
  kinds = growth.growable_layers(unit_map, state.params)
  assert kinds == {'Conv_0': 'conv', 'Conv_1': 'conv', 'Dense_0': 'dense', 'Dense_1': 'dense'}
  rates = growth.support_rates(unit_map, state.opt_state, kinds)
  support = dl.support(state.opt_state)
  for name, kernel in (('Conv_0', support['Conv_0']['kernel']), ('Dense_0', support['Dense_0']['kernel'])):
    per_unit = np.asarray(kernel).reshape(-1, np.shape(kernel)[-1]).any(axis=0)
    assert rates[name] == pytest.approx(per_unit.mean())


@pytest.mark.parametrize('argv, message', [
    (['--tau', '1.5'], r'`tau` must be in \(0, 1\]'),
    (['--finetune-epochs', '60'], '--finetune-epochs 60 leaves no epoch to grow'),
    (['--grow-every', '50'], '--grow-every 50 is longer than the 40 epochs before fine-tuning'),
    (['--start-widths', '2', '6', '200', '28', '--max-width', '128'], 'has a width above --max-width 128'),
    (['--dataset', 'mnist', '--out', 'x'], "No growth preset for dataset 'mnist'"),
    (['--target-macs', '0'], r'--target-macs must be a fraction in \(0, 1\] .* got 0.0'),
    (['--target-macs', '-0.5'], r'--target-macs must be a fraction in \(0, 1\]'),
    (['--target-macs', 'nan'], r'--target-macs must be a fraction in \(0, 1\] .* got nan'),
    (['--target-macs', 'inf'], r'--target-macs must be a fraction in \(0, 1\]'),
    (['--target-macs', '2.5'], r'--target-macs 2.5 is above 1, so a count of MACs, and must be a whole number'),
    (['--target-macs', '0.5', '--reference-widths', '6'], r'--target-macs 0.5 is a fraction .* no reference at '
                                                          r'widths \[6\]'),
    # The preset starts at 2 6 40 28: 64·25·2 + 16·25·2·6 + 24·40 + 40·28 + 28·10 = 10,360 MACs.
    (['--target-macs', '10000'], r"--target-macs is 10,000 MACs, below the starting network's 10,360"),
    # The reference 6 16 120 84: 9,600 + 38,400 + 7,680 + 10,080 + 840 = 66,600 MACs; a tenth of it is 6,660.
    (['--target-macs', '0.1'], r"--target-macs is 6,660 MACs, below the starting network's 10,360"),
    (['--resume', '--target-macs', '0.5'], r'--target-macs and --reference-widths are fixed when a growth run '
                                           r'starts'),
])
def test_bad_growth_flags_get_one_clear_line(argv, message, tmp_path, capsys):
  assert cli.main(['grow', '--out', str(tmp_path / 'run'), *argv]) == 1
  err = capsys.readouterr().err
  assert 'dessilbi grow: error:' in err
  assert re.search(message, err), err
  assert not (tmp_path / 'run').exists()


def test_grow_with_a_budget_stops_and_reports_its_cost(tmp_path, capsys):
  start = _lenet_macs(2, 4, 8, 8)   # a budget of the start's own MACs: the first round is refused
  out = tmp_path / 'run'
  argv = ['grow', '--start-widths', '2', '4', '8', '8', '--epochs', '3', '--batch-size', '128', '--lr', '0.05',
          '--lr-decay-epochs', '2', '--lambda', '0.02', '--mu', '2', '--grow-every', '1', '--finetune-epochs', '1',
          '--tau', '0.5', '--target-macs', str(start), '--out', str(out), '--quiet']
  assert cli.main(argv) == 0
  rows = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
  assert [r['growth'] for r in rows] == ['stopped', 'stopped', 'finetune']
  assert rows[0]['over_budget'] > start and all(not r['grown'] for r in rows)
  assert json.loads((out / 'growth.json').read_text())['settings']['target_macs'] == start
  summary = capsys.readouterr().out
  examples = (data.dataset_info('digits').num_train // 128) * 128
  ratio = 3 * start * examples * 3 / (3 * _lenet_macs(6, 16, 120, 84) * examples * 3)
  assert f'Forward MACs {start:,} (budget {start:,})' in summary
  assert f'{ratio:.2f} of the reference trained as long' in summary, summary
