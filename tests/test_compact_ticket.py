"""Tickets retrained on the removed network equal, on the kept units, the masked full-size retrain."""

import contextlib
import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dessilbi_jax import models
from dessilbi_jax import structure
from dessilbi_jax import train
from dessilbi_jax.structure import masks as structure_masks


@pytest.fixture(scope='module')
def run(tmp_path_factory, data_dir):
  root = tmp_path_factory.mktemp('ticket')
  # λ small enough that some filters and weights enter Γ's support in two epochs, large enough that not all do.
  cfg = train.TrainConfig(model='lenet', dataset='digits', widths=(4, 8, 16, 16), batch_size=128, epochs=2,
                          lr=0.05, mu=5.0, lambdas=0.05, data_dir=data_dir)
  train.fit(cfg, root / 'run', quiet=True)
  return root


@pytest.mark.filterwarnings('ignore:Unit group')
def test_removed_ticket_trains_the_masked_tickets_weights(run):
  compact = train.retrain_ticket(run / 'run', 2, epochs=1, out_dir=run / 'compact', quiet=True)
  full = train.retrain_ticket(run / 'run', 2, epochs=1, out_dir=run / 'full', quiet=True, compact=False)
  assert compact['compact'] and not full['compact']
  # The full-size ticket also trains weights whose unit no layer reads (or that read a dead unit): they
  # change nothing, and the removed network drops them.
  assert compact['params_kept'] <= full['params_kept']
  assert compact['trained_params'] < full['trained_params']      # a smaller network
  assert compact['flops'] <= full['flops']
  assert compact['test_acc'] == pytest.approx(full['test_acc'], abs=1.5 / 355)
  # The kept units' weights after the retraining: the full-size ones sliced to the removed network's.
  cfg = train.load_config(run / 'full')
  model, info = train.build_model(cfg)
  full_params = _final_params(run / 'full', model, info)
  small_params = _final_params(run / 'compact', *train.build_model(train.load_config(run / 'compact')))
  variables = {'params': full_params}
  unit_map = structure.trace(model, variables, jnp.zeros((1, *info.input_shape)))
  masks = train.ticket_masks(run / 'run', 2, full_params)
  keep = structure_masks.keep_from_weights(unit_map, masks)
  _, sliced, _ = structure.remove(model, variables, unit_map, keep)
  for a, b in zip(jax.tree.leaves(sliced['params']), jax.tree.leaves(small_params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def _final_params(run_dir, model, info):
  cfg = train.load_config(run_dir)
  result = train.fit(cfg, run_dir, resume=True, quiet=True)   # nothing left to train: the restored state
  return result.params


# -- ResNets: the removed network is rebuilt from the config's widths and per-layer widths ------------------

RESNET = dict(model='resnet20', dataset='digits', widths=(4, 8, 8), batch_size=32, epochs=1, lr=0.05)


def _resnet_support(params):
  """Γ's support of a ResNet-20 (4, 8, 8) ticket, per group: filters of convs, single weights of the classifier.

  The stream has 8 channels; stage 1 holds channels 2..5 of it (option-A offset 2). Block 1 loses all its
  inner filters (it becomes the identity), block 4 half of them, stream channel 3 (stage 1's channel 1) and
  channel 7 lose every writer; block 3's last conv alone drops channel 0 (kept: other blocks write it).
  """
  support = {'Conv_0/kernel': np.array([1, 0, 1, 1], bool)}
  for b in range(9):
    width = 4 if b < 3 else 8
    inner = np.ones(width, bool)
    if b == 1:
      inner[:] = False
    if b == 4:
      inner[:4] = False
    out = np.ones(width, bool)
    out[1 if b < 3 else 3] = False
    if b >= 3:
      out[7] = False
    if b == 3:
      out[0] = False
    support[f'BasicBlock_{b}/Conv_0/kernel'] = inner
    support[f'BasicBlock_{b}/Conv_1/kernel'] = out
  support = {k: v.reshape(1, 1, 1, -1) for k, v in support.items()}
  support['Dense_0/kernel'] = np.random.default_rng(0).random(params['Dense_0']['kernel'].shape) < 0.7
  return support


@pytest.fixture(scope='module')
def resnet_run(tmp_path_factory, rbg_keys, data_dir):
  """A ResNet-20 run directory holding what a ticket reads (config, init params, Γ's support after epoch 1)."""
  from dessilbi_jax.train import checkpoint
  from dessilbi_jax.train import run_dir as files
  root = tmp_path_factory.mktemp('resnet_ticket')
  cfg = train.TrainConfig(**RESNET, data_dir=data_dir)
  model, info = train.build_model(cfg)
  variables = train.init_variables(model, info.input_shape, jax.random.PRNGKey(cfg.seed))
  run_dir = root / 'run'
  run_dir.mkdir()
  files.write_config(run_dir, cfg)
  checkpoint.save_tree(run_dir / 'init_params', variables['params'])
  support = _resnet_support(variables['params'])
  np.savez(run_dir / 'path.npz', epoch=np.array([1]), step=np.array([44]), steps_per_epoch=np.array(44),
           **{f'support/{k}': v[None] for k, v in support.items()})
  return run_dir, model, variables


@pytest.fixture(scope='module')
def resnet_ticket(resnet_run, tmp_path_factory):
  """``retrain_ticket``'s compact ResNet ticket: its report, and the config, masks and init it trains from."""
  from dessilbi_jax.train import steps, tickets
  run_dir, _, _ = resnet_run
  calls = []

  def fit(cfg, out_dir, *, masks=None, init_params=None, **unused):   # what the ticket hands the trainer
    calls.append((cfg, masks, init_params))
    out_dir.mkdir(parents=True, exist_ok=True)
    params = _masked(init_params, steps.full_masks(masks, init_params))
    return train.TrainResult(params, {}, None, init_params, [{'dense_test_acc': 0.0}])

  with pytest.MonkeyPatch.context() as patch:   # no stage loses every channel: no warning
    patch.setattr(tickets, 'fit', fit)
    report = train.retrain_ticket(run_dir, 1, out_dir=tmp_path_factory.mktemp('out') / 'ticket', quiet=True)
  (cfg, masks, init_params), = calls
  return report, cfg, masks, init_params


def test_resnet_ticket_trains_the_removed_network(resnet_run, resnet_ticket):
  run_dir, model, variables = resnet_run
  report, cfg, _, _ = resnet_ticket
  small, info = train.build_model(cfg)
  assert report['compact'] and cfg.layer_widths is not None
  kwargs = dict(cfg.layer_widths)
  assert kwargs['block_widths'][1] == 0 and kwargs['block_widths'][4] == 4       # block 1 is the identity
  assert report['model_kwargs'] == models.model_kwargs(small)
  # Its reported size is what the unit map counts for the removed network.
  unit_map = structure.trace(model, variables, jnp.zeros((1, *info.input_shape)))
  with warnings.catch_warnings():   # every stage keeps a channel under the keep rule: nothing to warn of
    warnings.simplefilter('error', UserWarning)
    keep = structure_masks.keep_from_weights(unit_map, train.ticket_masks(run_dir, 1, variables['params']))
    counted = structure.count(unit_map, variables, keep)
  assert (report['trained_params'], report['trained_macs']) == counted
  assert counted == (models.count_params(jax.eval_shape(small.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))[
      'params']), models.count_flops(small, info.input_shape))
  assert report['trained_params'] < report['params'] and report['trained_macs'] < report['dense_flops']


def test_resnet_ticket_steps_match_the_masked_full_size_network(resnet_run, resnet_ticket):
  """The removed ResNet's first steps are the full-size ones with the same units masked (as a whole)."""
  from flax import jax_utils
  from dessilbi_jax import data
  from dessilbi_jax.train import checkpoint
  from dessilbi_jax.train import steps
  run_dir, model, variables = resnet_run
  _, cfg, small_masks, small_init = resnet_ticket
  small, info = train.build_model(cfg)
  # The full-size network: the ticket's weight masks, and its dead units masked whole (BN scale and bias too).
  unit_map = structure.trace(model, variables, jnp.zeros((1, *info.input_shape)))
  masks = train.ticket_masks(run_dir, 1, variables['params'])
  with warnings.catch_warnings():   # every stage keeps a channel under the keep rule: nothing to warn of
    warnings.simplefilter('error', UserWarning)
    keep = structure_masks.keep_from_weights(unit_map, masks)
    units = structure.unit_masks(variables, unit_map, keep, inputs=True)['params']
  full_masks = jax.tree.map(lambda m, u: m & (u > 0), steps.full_masks(masks, variables['params']), units)
  init = checkpoint.load_tree(run_dir / 'init_params', variables['params'])
  with warnings.catch_warnings():   # every stage keeps a channel under the keep rule: nothing to warn of
    warnings.simplefilter('error', UserWarning)
    small_stats = structure.remove(model, variables, unit_map, keep)[1]['batch_stats']   # fresh: mean 0, var 1
  tx = train.make_optimizer(cfg, data.steps_per_epoch(cfg.dataset, cfg.batch_size))
  devices = jax.local_device_count()
  rng = np.random.default_rng(1)
  batches = [{'image': rng.random((devices, 32 // devices, 8, 8, 1), np.float32),
              'label': rng.integers(0, 10, (devices, 32 // devices))} for _ in range(3)]

  def first_steps(net, params, batch_stats, masks):   # as fit starts a masked run
    masks = steps.full_masks(masks, params)
    params = _masked(params, masks)
    state = train.TrainState(jnp.zeros([], jnp.int32), params, batch_stats, tx.init(params), jax.random.PRNGKey(0))
    step, replicated_masks, losses = steps.make_train_step(steps.training_model(net), tx), jax_utils.replicate(masks), []
    for batch in batches:   # replicated anew each step: one compilation
      replicated, metrics = step(jax_utils.replicate(state), batch, replicated_masks)
      state, metrics = jax.device_get(jax_utils.unreplicate((replicated, metrics)))
      losses.append(float(metrics['loss']))
    return state, losses

  with _quick_compiles():
    full_state, full_losses = first_steps(model, init, variables['batch_stats'], full_masks)
    small_state, small_losses = first_steps(small, small_init, small_stats, small_masks)
  np.testing.assert_allclose(small_losses, full_losses, rtol=1e-5)
  full_vars = steps.variables(full_state.params, full_state.batch_stats)
  small_vars = steps.variables(small_state.params, small_state.batch_stats)
  with warnings.catch_warnings():   # every stage keeps a channel under the keep rule: nothing to warn of
    warnings.simplefilter('error', UserWarning)
    sliced = structure.remove(model, full_vars, unit_map, keep)[1]
  assert jax.tree.structure(sliced) == jax.tree.structure(small_vars)
  for a, b in zip(jax.tree.leaves(sliced), jax.tree.leaves(small_vars)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def _masked(params, masks):
  return jax.tree.map(lambda w, m: np.where(m, np.asarray(w), 0), params, masks)


@contextlib.contextmanager
def _quick_compiles():
  """XLA without most of its optimizations: ResNet-20's step compiles in about half the time."""
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  try:
    yield
  finally:
    jax.config.update('jax_disable_most_optimizations', previous)


def test_a_runs_model_record_rebuilds_its_model(resnet_ticket):
  """The config and checkpoint record of a run rebuild its model, per-layer widths included; old ones too."""
  import json
  from dessilbi_jax.train import steps
  _, cfg, _, _ = resnet_ticket
  small, _ = train.build_model(cfg)
  start = train.TrainConfig(**RESNET)
  assert train.build_model(dataclasses.replace(start, **train.model_fields(small)))[0] == small
  saved = train.TrainConfig.from_json(json.loads(json.dumps(cfg.to_json())))
  assert saved == cfg and train.build_model(saved)[0] == small
  record = json.loads(json.dumps(steps.model_record(cfg)))   # what every checkpoint holds
  assert record['layer_widths'] == {k: v for k, v in models.model_kwargs(small).items() if k != 'widths'}
  assert train.build_model(steps.recorded_config(start, record))[0] == small
  # Records and configs of before the per-layer widths: widths alone.
  old = {k: v for k, v in start.to_json().items() if k != 'layer_widths'}
  assert train.TrainConfig.from_json(old) == start
  grown = steps.recorded_config(start, {'epoch': 3, 'widths': [4, 8, 12]})
  assert models.model_kwargs(train.build_model(grown)[0]) == {'widths': [4, 8, 12]}
  assert steps.recorded_config(start, {'epoch': 3, 'widths': None}) == start
  with pytest.raises(train.ConfigError, match='layer_widths'):
    train.check_values(dataclasses.replace(start, layer_widths=(('depth', 3),)))
  # An extension's new state (growth) names the model it belongs to the same way, and the loop rebuilds it.
  from dessilbi_jax.train import loop
  shapes = jax.eval_shape(small.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  tx = train.make_optimizer(start, 10)
  state = train.TrainState(jnp.zeros([], jnp.int32), shapes['params'], shapes['batch_stats'],
                           jax.eval_shape(tx.init, shapes['params']), jax.random.PRNGKey(0))
  arch, _ = loop._check_reshaped(train.Reshaped(state=state, **train.model_fields(small)), start, tx, ())
  assert train.build_model(arch)[0] == small
  with pytest.raises(ValueError, match='does not match the model'):   # widths alone: another model
    loop._check_reshaped(train.Reshaped(small.widths, state), start, tx, ())
