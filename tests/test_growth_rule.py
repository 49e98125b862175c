"""The growth rule (docs/GROWTH.md) on constructed supports: thresholds, amounts, caps, stop, bad settings."""

import math

import pytest

from dessilbi_jax.growth import GrowthSettings, Layer, grown_width, next_widths


def _reference_width(n, add, factor_tenths=11):
  """max(n + a, ⌊1.1·n⌋) in integers: ⌊11·n/10⌋."""
  return max(n + add, (factor_tenths * n) // 10)


def test_amounts_are_the_papers_for_every_width():
  s = GrowthSettings()
  for n in range(1, 2049):
    assert grown_width(n, 'conv', s) == _reference_width(n, 8), n
    assert grown_width(n, 'block', s) == _reference_width(n, 4), n
    assert grown_width(n, 'dense', s) == _reference_width(n, 8), n


def test_known_widths():
  s = GrowthSettings()
  # below 80 (VGG) / 40 (ResNet) the additive term wins; above, the 10 %.
  assert [grown_width(n, 'conv', s) for n in (16, 24, 79, 80, 81, 100, 512)] == [24, 32, 87, 88, 89, 110, 563]
  assert [grown_width(n, 'block', s) for n in (16, 39, 40, 41, 50, 64)] == [20, 43, 44, 45, 55, 70]


def test_threshold_is_inclusive_and_per_layer():
  layers = {'a': Layer(10, 0.8, 'conv'), 'b': Layer(10, 0.7999, 'conv'), 'c': Layer(10, 0.5, 'conv')}
  assert next_widths(layers, GrowthSettings()) == {'a': 18, 'b': 10, 'c': 10}
  assert next_widths(layers, GrowthSettings(tau_per_layer={'c': 0.5})) == {'a': 18, 'b': 10, 'c': 18}
  assert next_widths(layers, GrowthSettings(tau=1.0)) == {'a': 10, 'b': 10, 'c': 10}


def test_caps_and_stop():
  layers = {'a': Layer(60, 1.0, 'conv'), 'b': Layer(60, 1.0, 'block'), 'c': Layer(60, 0.0, 'conv')}
  s = GrowthSettings(max_width=64, max_width_per_layer={'b': 100})
  assert next_widths(layers, s) == {'a': 64, 'b': 66, 'c': 60}
  # at the cap a saturated layer stays: the widths do not change, which is the stop signal.
  at_cap = {'a': Layer(64, 1.0, 'conv')}
  assert next_widths(at_cap, GrowthSettings(max_width=64)) == {'a': 64}


def test_dense_layers_grow_unless_disabled():
  layers = {'Dense_0': Layer(120, 0.9, 'dense')}
  assert next_widths(layers, GrowthSettings()) == {'Dense_0': 132}
  assert next_widths(layers, GrowthSettings(grow_dense=False)) == {'Dense_0': 120}


def test_custom_amounts_and_factor():
  s = GrowthSettings(factor=1.5, min_add={'conv': 2})
  assert grown_width(10, 'conv', s) == 15
  assert grown_width(2, 'conv', s) == 4
  assert grown_width(10, 'block', s) == 15   # kinds not named keep the paper's amount (4 < 5)


def test_checks_every_grow_every_epochs():
  s = GrowthSettings(grow_every=10)
  assert [e for e in range(0, 41) if s.is_check(e)] == [10, 20, 30, 40]


@pytest.mark.parametrize('kwargs, message', [
    ({'tau': 0.0}, r'`tau` must be in \(0, 1\]'),
    ({'tau': 1.2}, r'`tau` must be in \(0, 1\]'),
    ({'tau': math.nan}, r'`tau` must be in \(0, 1\]'),
    ({'tau_per_layer': {'a': -1}}, r"tau_per_layer\['a'\]"),
    ({'grow_every': 0}, '`grow_every` must be an integer >= 1'),
    ({'grow_every': 2.5}, '`grow_every` must be an integer >= 1'),
    ({'finetune_epochs': -1}, '`finetune_epochs` must be an integer >= 0'),
    ({'factor': 0.9}, '`factor` must be a finite number >= 1'),
    ({'min_add': {'lstm': 3}}, 'unknown layer kind'),
    ({'min_add': {'conv': 0}}, r"min_add\['conv'\]"),
    ({'max_width': 0}, '`max_width` must be an integer >= 1'),
])
def test_bad_settings_are_named(kwargs, message):
  with pytest.raises(ValueError, match=message):
    GrowthSettings(**kwargs)


def test_bad_layers_are_named():
  with pytest.raises(ValueError, match='no units to grow'):
    next_widths({}, GrowthSettings())
  with pytest.raises(ValueError, match="starts at width 80, above its cap 64"):
    next_widths({'a': Layer(80, 0.1, 'conv')}, GrowthSettings(max_width=64))
  with pytest.raises(ValueError, match=r"support rate of 'a' must be in \[0, 1\]"):
    next_widths({'a': Layer(8, 1.5, 'conv')}, GrowthSettings())
  with pytest.raises(ValueError, match="unknown kind 'lstm'"):
    next_widths({'a': Layer(8, 0.5, 'lstm')}, GrowthSettings())
  with pytest.raises(ValueError, match=r"`tau_per_layer` names no growable layer: \['b'\]"):
    next_widths({'a': Layer(8, 0.5, 'conv')}, GrowthSettings(tau_per_layer={'b': 0.5}))
  with pytest.raises(ValueError, match="width of 'a' must be an integer >= 1"):
    next_widths({'a': Layer(0, 0.5, 'conv')}, GrowthSettings())


def _lenet_convs_macs(widths):
  """The two convs of LeNet-5 on 8×8 digits: 64 positions × 5·5·1·a + 16 positions × 5·5·a·b."""
  return 64 * 25 * widths['a'] + 16 * 25 * widths['a'] * widths['b']


def _rounds(settings, start, rates, n):
  widths, seen = dict(start), [tuple(start.values())]
  for _ in range(n):
    widths = next_widths({k: Layer(w, rates[k], 'conv') for k, w in widths.items()}, settings, _lenet_convs_macs)
    seen.append(tuple(widths.values()))
  return seen


def test_a_budget_stops_before_the_round_that_would_pass_it():
  # MACs of (2, 6), (4, 8), (6, 10), (8, 12): 8,000, 19,200, 33,600, 51,200.
  s = dict(min_add={'conv': 2})
  saturated = {'a': 1.0, 'b': 1.0}
  assert _rounds(GrowthSettings(**s), {'a': 2, 'b': 6}, saturated, 3) == [(2, 6), (4, 8), (6, 10), (8, 12)]
  assert _rounds(GrowthSettings(**s, target_macs=40_000), {'a': 2, 'b': 6}, saturated, 4) == [
      (2, 6), (4, 8), (6, 10), (6, 10), (6, 10)]
  # The budget is inclusive: a round costing exactly the budget is taken.
  assert _rounds(GrowthSettings(**s, target_macs=33_600), {'a': 2, 'b': 6}, saturated, 3)[-1] == (6, 10)
  assert _rounds(GrowthSettings(**s, target_macs=33_599), {'a': 2, 'b': 6}, saturated, 3)[-1] == (4, 8)
  # Only b saturates: each round +2 on b costs 16·25·2·2 = 1,600: (2, 8) 9,600, (2, 10) 11,200, (2, 12) 12,800.
  assert _rounds(GrowthSettings(**s, target_macs=12_000), {'a': 2, 'b': 6}, {'a': 0.1, 'b': 0.9}, 3) == [
      (2, 6), (2, 8), (2, 10), (2, 10)]


def test_a_budget_needs_macs_and_a_count():
  for rate in (1.0, 0.0):   # even where no round is proposed: the error shows at the first check
    with pytest.raises(ValueError, match='`target_macs` is set, so next_widths needs `macs`'):
      next_widths({'a': Layer(2, rate, 'conv')}, GrowthSettings(target_macs=10))
  for bad in (0, -5, 2.5, True, math.nan):
    with pytest.raises(ValueError, match='`target_macs` must be an integer >= 1'):
      GrowthSettings(target_macs=bad)
