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
