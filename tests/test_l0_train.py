"""`dessilbi train --optimizer l0 | l0_penalty`: L0 gates trained beside the weights by the trainer."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dessilbi_jax import cli
from dessilbi_jax.train import checkpoint
from dessilbi_jax import l0
from dessilbi_jax import models
from dessilbi_jax import structure
from dessilbi_jax import train
from dessilbi_jax.l0 import unit_gates
from dessilbi_jax.train import l0_gates


def _cfg(**changes):
  base = dict(model='mlp', widths=(32, 16), optimizer='l0', target_density=0.3, epochs=2, gates_lr=10.0,
              droprate_init=0.2)
  return train.preset('digits', **{**base, **changes})


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  out = tmp_path_factory.mktemp('l0') / 'run'
  return out, train.fit(_cfg(), out, quiet=True)


def _rows(out):
  return [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]


def test_metrics_against_the_gates_of_the_final_state(run):
  """Expected density, multipliers and the purged network's size, recomputed from the final gates."""
  out, result = run
  extra = result.state.extra['l0']
  row = _rows(out)[-1]
  hidden = sorted(extra['log_alpha'])   # the MLP's hidden layers
  # The expected kernel entries of the MLP 64-32-16-10: E[in]·E[out] per layer, independent gates.
  on = [64.0] + [float(np.sum(l0.prob_active(extra['log_alpha'][name]))) for name in hidden] + [10.0]
  dense = [64, 32, 16, 10]
  expected = sum(a * b for a, b in zip(on, on[1:])) / sum(a * b for a, b in zip(dense, dense[1:]))
  assert row['expected_density'] == pytest.approx(expected, rel=1e-5)
  assert row['expected_macs'] == pytest.approx(expected, rel=1e-5)   # an MLP's MACs are its kernel entries
  assert row['multipliers'] == pytest.approx(float(extra['multipliers'])) and row['multipliers'] >= 0
  assert all(np.all((a >= l0.LOG_ALPHA_MIN - 1e-6) & (a <= l0.LOG_ALPHA_MAX + 1e-6))
             for a in extra['log_alpha'].values())
  # An independent count of the purged MLP: the open units (median gate > 0) of each hidden layer.
  widths = [64] + [int(np.sum(l0.median_gates(extra['log_alpha'][name]) > 0)) for name in hidden] + [10]
  assert row['purged_params'] == sum(a * b + b for a, b in zip(widths, widths[1:]))
  assert row['purged_density'] == pytest.approx(sum(a * b for a, b in zip(widths, widths[1:])) /
                                                sum(a * b for a, b in zip(dense, dense[1:])))
  # The purged network is the median-gated one: the same predictions, hence the same accuracy.
  assert row['purged_test_acc'] == row['dense_test_acc']
  train.write_run_plots(out)
  assert (out / 'plots' / 'density.png').stat().st_size > 10_000   # density against epoch, with the target


def test_weights_start_rescaled_and_multipliers_at_zero(run):
  out, _ = run
  cfg = _cfg()
  model, info = train.build_model(cfg)
  fresh = train.init_variables(model, info.input_shape, jax.random.split(jax.random.PRNGKey(cfg.seed))[0])['params']
  saved = checkpoint.load_tree(out / 'init_params', fresh)
  np.testing.assert_allclose(saved['Dense_0']['kernel'], fresh['Dense_0']['kernel'] / (1 - 0.2), rtol=1e-6)
  np.testing.assert_allclose(saved['Dense_1']['kernel'], fresh['Dense_1']['kernel'] / (1 - 0.2), rtol=1e-6)
  np.testing.assert_array_equal(saved['Dense_2']['kernel'], fresh['Dense_2']['kernel'])   # the logits: ungated
  ext = l0_gates.l0_extension(cfg)
  assert float(ext.trainable.init(fresh, jax.random.PRNGKey(0))['multipliers']) == 0.0


def test_a_loose_target_never_raises_the_multiplier(tmp_path):
  """ε = 1: the constraint density − 1 ≤ 0 always holds, so dual ascent with restarts keeps λ at exactly 0."""
  rows = train.fit(_cfg(target_density=1.0, epochs=1), quiet=True).history
  assert rows[-1]['multipliers'] == 0.0


def test_penalized_multiplier_is_the_penalty():
  result = train.fit(_cfg(optimizer='l0_penalty', target_density=None, penalty=0.05, epochs=1), quiet=True)
  assert float(result.state.extra['l0']['multipliers']) == pytest.approx(0.05)
  assert result.history[-1]['multiplier_max'] == pytest.approx(0.05)


def test_resume_continues_bit_for_bit(run, tmp_path):
  _, whole = run
  out = tmp_path / 'split'
  train.fit(_cfg(epochs=1), out, quiet=True)
  resumed = train.fit(_cfg(), out, resume=True, quiet=True)
  for a, b in zip(jax.tree.leaves((whole.params, whole.state.extra)), jax.tree.leaves((resumed.params,
                                                                                     resumed.state.extra))):
    np.testing.assert_array_equal(a, b)


def test_the_gates_land_near_the_target_on_digits():
  """A short constrained run with a fast dual: the expected density ends within 5 points of 40 % (the
  benchmark's 60-epoch LeNet runs land within a tenth of a point)."""
  rows = train.fit(_cfg(target_density=0.4, epochs=4, dual_lr=1.0), quiet=True).history   # measured: 35.7 %
  assert rows[0]['expected_density'] < 0.7   # from about 95 % (p₀ = 0.2) at the start
  assert rows[-1]['expected_density'] == pytest.approx(0.4, abs=0.05)


def test_a_macs_target_per_layer_through_the_extension():
  """target_macs, layer-wise: one multiplier per kernel, each fed its layer's expected MACs fraction minus μ."""
  cfg = _cfg(constraint='layer', epochs=1, dual_lr=1.0)
  ext = l0_gates.l0_extension(cfg, target_density=None, target_macs=0.2)
  result = train.fit(cfg, quiet=True, extensions=[ext])
  row, extra = result.history[-1], result.state.extra['l0']
  assert sorted(row['multipliers']) == ['Dense_0', 'Dense_1', 'Dense_2']
  assert all(v >= 0 for v in row['multipliers'].values())
  probs = {n: l0.prob_active(a) for n, a in extra['log_alpha'].items()}
  variables = {'params': result.params}
  model, info = train.build_model(cfg)
  unit_map = structure.trace(model, variables, jnp.zeros((1, *info.input_shape)))
  layers = unit_gates.expected_size(unit_map, variables, probs)['layers']
  assert row['layer_densities'] == pytest.approx({k: float(v) for k, v in layers.items()}, rel=1e-5)
  # From about 90 % at the start every layer came down to μ = 20 % within the epoch (measured: 10 / 1 / 11 %);
  # the middle layer's fraction is the product of its neighbours' (mean P(in on) · mean P(out on)).
  layer = row['layer_densities']
  assert all(v <= 0.22 for v in layer.values()), layer
  assert layer['Dense_1'] == pytest.approx(layer['Dense_0'] * layer['Dense_2'], rel=1e-4)
  with pytest.raises(ValueError, match='Give one of'):
    l0_gates.l0_extension(cfg, target_macs=0.2)   # and cfg's target density: both at once


@pytest.mark.parametrize('argv,message', [
    (['--optimizer', 'l0'], '--target-density: --optimizer l0 needs --target-density'),
    (['--optimizer', 'l0', '--target-density', '0.3', '--gates-lr', '0'], '--gates-lr: must be in'),
    (['--optimizer', 'l0', '--target-density', '0.3', '--droprate-init', '1'], '--droprate-init: must be in'),
    (['--optimizer', 'l0', '--target-density', '0.3', '--constraint', 'net'], '--constraint: must be one of'),
    (['--optimizer', 'gmp', '--target-density', '0.3'], 'cannot take it'),
])
def test_bad_flags_are_named(argv, message, tmp_path, capsys):
  assert cli.main(['train', *argv, '--epochs', '1', '--out', str(tmp_path / 'run')]) == 1
  assert message in capsys.readouterr().err
  assert not (tmp_path / 'run').exists()


def test_gates_on_a_model_without_units_are_refused():
  """A linear classifier has no hidden unit: its only groups are the inputs and the logits."""
  model = models.get_model('mlp', 10, (4,), widths=())
  x = jnp.ones((1, 4))
  with pytest.raises(ValueError, match='no unit group to gate'):
    unit_gates.gated_groups(structure.trace(model, model.init(jax.random.PRNGKey(0), x), x))
