"""Tests of keep-masks from weights / Γ / GMP, of compact export and load, and of compact_run."""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dessilbi_jax as dl
from dessilbi_jax import cli
from dessilbi_jax import baselines
from dessilbi_jax import models
from dessilbi_jax import structure
from dessilbi_jax import train
from dessilbi_jax.train import compact


pytestmark = pytest.mark.usefixtures('rbg_keys')   # conftest.py: fast init of the large models


@pytest.fixture(scope='module')
def lenet():
  model = models.get_model('lenet5', 10, (8, 8, 1), widths=(6, 8, 12, 10))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 1)), jnp.float32)
  variables = model.init(jax.random.key(0), x)
  return model, variables, x, structure.trace(model, variables, x)


# -- masks -------------------------------------------------------------------------------------

def test_keep_from_weights_drops_units_without_fan_in_or_readers(lenet):
  model, variables, x, unit_map = lenet
  weight_masks = jax.tree.map(lambda w: np.ones(np.shape(w), bool), variables['params'])
  weight_masks['Conv_0']['kernel'][..., 2] = False                  # filter 2: no weight left
  weight_masks['Dense_0']['kernel'][:, 5] = False                   # neuron 5: its whole fan-in gone
  weight_masks['Dense_1']['kernel'][7, :] = False                   # Dense_0's unit 7: nobody reads it
  rows = np.arange(4) * 8 + 3                                       # Conv_1's channel 3 at the 2x2 positions
  weight_masks['Dense_0']['kernel'][rows, :] = False                # ... read by no row: gone
  keep = structure.keep_from_weights(unit_map, weight_masks)
  np.testing.assert_array_equal(keep['Conv_0'], np.arange(6) != 2)
  np.testing.assert_array_equal(keep['Conv_1'], np.arange(8) != 3)
  np.testing.assert_array_equal(keep['Dense_0'], ~np.isin(np.arange(12), (5, 7)))
  assert keep['Dense_1'].all()
  weight_masks['Dense_0']['kernel'][rows[:3], :] = True             # one position still reads it: kept
  assert structure.keep_from_weights(unit_map, weight_masks)['Conv_1'][3]


def test_keep_from_support_reads_gamma_per_filter_and_neuron(lenet):
  model, variables, x, unit_map = lenet
  tx = dl.dessilbi(0.5, mu=1.0, lambdas=0.01, groups={'Dense_0/kernel': 'neuron'})
  params, state = variables['params'], tx.init(variables['params'])
  labels = jnp.arange(4) % 10

  @jax.jit
  def step(params, state):
    grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply({'params': p}, x), labels).mean())(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(3):
    params, state = step(params, state)
  # Some groups out of Γ's support (a large λ would do it too, after more steps).
  gamma = jax.tree.map(np.array, state.gamma, is_leaf=lambda g: g is None)
  gamma['Conv_0']['kernel'][..., [1, 4]] = 0
  gamma['Dense_0']['kernel'][:, 3] = 0
  gamma['Dense_1']['kernel'][6, :] = 0
  state = state._replace(gamma=gamma)
  keep = structure.keep_from_support(unit_map, state)
  gamma = jax.tree.map(np.asarray, dl.gamma(state), is_leaf=lambda g: g is None)
  # The reference: a filter / neuron is kept while its Γ has a non-zero entry, and something reads it.
  conv0 = np.any(gamma['Conv_0']['kernel'] != 0, axis=(0, 1, 2))
  conv0_read = np.any(gamma['Conv_1']['kernel'] != 0, axis=(0, 1, 3))
  np.testing.assert_array_equal(keep['Conv_0'], conv0 & conv0_read)
  dense0 = np.any(gamma['Dense_0']['kernel'] != 0, axis=0) & np.any(gamma['Dense_1']['kernel'] != 0, axis=1)
  np.testing.assert_array_equal(keep['Dense_0'], dense0)
  assert 0 < sum(int(k.sum()) for k in keep.values()) < sum(k.size for k in keep.values())


def test_keep_from_gmp_and_gates(lenet):
  model, variables, x, unit_map = lenet
  tx = baselines.gmp(optax.sgd(0.1), 0.5, begin_step=0, end_step=1, frequency=1)
  state = tx.init(variables['params'])
  for _ in range(2):
    _, state = tx.update(jax.tree.map(jnp.zeros_like, variables['params']), state, variables['params'])
  gmp_masks = jax.device_get(baselines.masks(state))
  full = lambda name: np.broadcast_to(gmp_masks[name]['kernel'], variables['params'][name]['kernel'].shape)
  keep = structure.keep_from_gmp(unit_map, state)
  # Filters GMP pruned are gone; the dense layers' unstructured masks leave every neuron some weight.
  reference = full('Conv_0').any(axis=(0, 1, 2)) & full('Conv_1').any(axis=(0, 1, 3))
  np.testing.assert_array_equal(keep['Conv_0'], reference)
  assert keep['Conv_0'].sum() == 3
  gates = structure.keep_from_gates(unit_map, {'Conv_0': jnp.array([0.0, 0.3, 0.0, 1.0, 0.0, 0.2])}, 0.25)
  np.testing.assert_array_equal(gates['Conv_0'], [False, True, False, True, False, False])


# -- export and load ---------------------------------------------------------------------------

@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """A removed ResNet-20 (an emptied block, offsets off-centre) saved as a compact model."""
  model = models.get_model('resnet20', 10, (8, 8, 3), widths=(4, 8, 8))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 8, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), x)
  unit_map = structure.trace(model, variables, x)
  keep = {g.name: np.random.default_rng(2).random(g.size) < 0.6 for g in unit_map.prunable()}
  keep['BasicBlock_4/Conv_0'][:] = False
  small, small_vars, _ = structure.remove(model, variables, unit_map, keep)
  directory = tmp_path_factory.mktemp('compact') / 'model'
  structure.save_compact(directory, small, small_vars, input_shape=(8, 8, 3))
  return directory, small, small_vars, x


def test_a_compact_model_loads_with_nothing_else(saved):
  directory, small, small_vars, x = saved
  model, variables = structure.load_compact(directory)
  assert model == small and model.block_widths[4] == 0
  np.testing.assert_array_equal(model.apply(variables, x), small.apply(small_vars, x))
  description = json.loads((directory / 'model.json').read_text())
  assert description['params'] == models.count_params(variables['params'])
  assert description['macs'] == models.count_flops(model, (8, 8, 3))


def _largest_file(directory):
  return max((p for p in (directory / 'variables').rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize('damage', ['truncate', 'flip', 'missing_json', 'missing_arrays', 'bad_json', 'widths'])
def test_a_damaged_compact_model_gets_a_clear_error(saved, tmp_path, damage):
  source, *_ = saved
  directory = tmp_path / 'copy'
  shutil.copytree(source, directory)
  if damage == 'truncate':
    target = _largest_file(directory)
    target.write_bytes(target.read_bytes()[:target.stat().st_size // 2])
  elif damage == 'flip':
    target = _largest_file(directory)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x10
    target.write_bytes(bytes(data))
  elif damage == 'missing_json':
    (directory / 'model.json').unlink()
  elif damage == 'missing_arrays':
    shutil.rmtree(directory / 'variables')
  elif damage == 'bad_json':
    (directory / 'model.json').write_text((directory / 'model.json').read_text()[:100])
  else:  # model.json describes other widths than the arrays have
    description = json.loads((directory / 'model.json').read_text())
    description['kwargs']['widths'] = [4, 8, 16]
    (directory / 'model.json').write_text(json.dumps(description))
  error = FileNotFoundError if damage == 'missing_json' else ValueError
  with pytest.raises(error, match=str(directory)):
    structure.load_compact(directory)


def test_save_compact_never_overwrites(saved):
  directory, small, small_vars, _ = saved
  with pytest.raises(FileExistsError, match='not empty'):
    structure.save_compact(directory, small, small_vars, input_shape=(8, 8, 3))


# -- a run's compact network -------------------------------------------------------------------

@pytest.mark.filterwarnings('ignore:Unit group')  # after one epoch, layers with no filter in Γ keep one
def test_compact_run_writes_the_removed_network_of_a_checkpoint(tmp_path, data_dir):
  cfg = train.TrainConfig(model='lenet', dataset='digits', widths=(4, 8, 16, 16), batch_size=128, epochs=1,
                          lr=0.05, lambdas=(('filter', 0.02), ('lasso', 0.02)), data_dir=data_dir)
  result = train.fit(cfg, tmp_path / 'run', quiet=True)
  report = compact.compact_run(tmp_path / 'run', None, tmp_path / 'compact')
  model, variables = structure.load_compact(tmp_path / 'compact')
  dense_model, _ = train.build_model(cfg)
  expected, expected_vars, _ = compact.compact(dense_model, {'params': result.params}, result.opt_state, (8, 8, 1))
  assert model == expected
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(expected_vars)):
    np.testing.assert_array_equal(a, b)
  assert report['compact_params'] == models.count_params(variables['params']) < report['dense_params']
  assert report['compact_macs'] == models.count_flops(model, (8, 8, 1)) < report['dense_macs']
  assert report['compact_test_acc'] == train.evaluate(model, variables, 'digits', data_dir=cfg.data_dir)
  assert json.loads((tmp_path / 'compact' / 'compact.json').read_text()) == report
  # The trainer's per-epoch compact metrics are those of this network (its accuracy measured on the
  # whole-unit-masked network, which computes the same function).
  last = result.history[-1]
  assert (last['compact_params'], last['compact_macs']) == (report['compact_params'], report['compact_macs'])
  assert last['compact_test_acc'] == pytest.approx(report['compact_test_acc'], abs=1.5 / 355)
  # The command: the same network, and nothing overwritten.
  assert cli.main(['compact', '--run', str(tmp_path / 'run'), '--out', str(tmp_path / 'cli')]) == 0
  again, again_vars = structure.load_compact(tmp_path / 'cli')
  assert again == model
  assert cli.main(['compact', '--run', str(tmp_path / 'run'), '--out', str(tmp_path / 'cli')]) == 1
  assert cli.main(['compact', '--run', str(tmp_path / 'run'), '--epoch', '7', '--out', str(tmp_path / 'e7')]) == 1
