r"""The growth rule: which layers widen at a check, and to what width.

At a check (every ``grow_every`` epochs) layer ``l`` of width ``n_l`` has the
support rate ``r_l``: the fraction of its units (conv filters, ResNet blocks'
internal channels, dense neurons with any weight in Γ's support) in Γ's
support. Every layer with ``r_l ≥ τ_l`` grows, all in the same round, to

    n_l' = min(cap_l, max(n_l + a_kind, ⌊f·n_l⌋))

with ``f = 1.1`` and ``a = 8`` for plain conv (VGG-style) and dense layers,
``a = 4`` for ResNet blocks (the paper's defaults). Growth stops at the first
check where no layer grows (a layer at its cap does not count as growing);
fine-tuning follows.

With a budget (``target_macs``, multiply-accumulates of one forward pass of
one example) growth also stops at the first round whose widths would cost
more: that round is not taken (no layer of it grows), the widths stay and
fine-tuning follows. The rule asks ``macs(widths)`` of the caller (the
extension counts the network of those widths with
:func:`dessilbi_jax.models.count_flops`).

Example::

  >>> from dessilbi_jax.growth import GrowthSettings, Layer, next_widths
  >>> layers = {'Conv_0': Layer(16, rate=1.0, kind='conv'),
  ...           'Conv_1': Layer(16, rate=0.5, kind='conv'),
  ...           'block_3': Layer(40, rate=0.85, kind='block')}
  >>> next_widths(layers, GrowthSettings())
  {'Conv_0': 24, 'Conv_1': 16, 'block_3': 44}

With a budget, a round that would pass it is not taken::

  >>> chain = lambda w: 10 * w['a'] + w['a'] * w['b']   # the MACs of a two-layer chain
  >>> two = {'a': Layer(8, rate=1.0), 'b': Layer(8, rate=1.0)}
  >>> next_widths(two, GrowthSettings(target_macs=500), macs=chain)   # 16·10 + 16·16 = 416
  {'a': 16, 'b': 16}
  >>> next_widths(two, GrowthSettings(target_macs=400), macs=chain)
  {'a': 8, 'b': 8}
"""

from __future__ import annotations

import dataclasses
import fractions
import math
import numbers
from collections.abc import Callable, Mapping
from typing import NamedTuple, Optional

KINDS = ('conv', 'block', 'dense')


class Layer(NamedTuple):
  """One growable layer at a check: its width, its support rate in [0, 1], its kind."""
  width: int
  rate: float
  kind: str = 'conv'


def _default_min_add() -> dict[str, int]:
  return {'conv': 8, 'block': 4, 'dense': 8}


@dataclasses.dataclass(frozen=True)
class GrowthSettings:
  """Settings of the growth rule (the paper's defaults).

  Attributes:
    tau: τ in (0, 1], the support rate at which a layer grows.
    tau_per_layer: τ for named layers, overriding ``tau``.
    grow_every: epochs between checks (a check after epochs k·grow_every).
    finetune_epochs: epochs of fine-tuning after the last growth.
    factor: f >= 1 of ``⌊f·n⌋``.
    min_add: the least number of units added, per kind (``conv``, ``block``, ``dense``).
    max_width: a cap on every layer's width (None: no cap).
    max_width_per_layer: caps for named layers, overriding ``max_width``.
    grow_dense: whether dense layers grow at all.
    target_macs: the budget, an absolute number of forward MACs of one
      example (None: none); growth stops before the first round past it.
  """
  tau: float = 0.8
  tau_per_layer: Mapping[str, float] = dataclasses.field(default_factory=dict)
  grow_every: int = 10
  finetune_epochs: int = 40
  factor: float = 1.1
  min_add: Mapping[str, int] = dataclasses.field(default_factory=_default_min_add)
  max_width: Optional[int] = None
  max_width_per_layer: Mapping[str, int] = dataclasses.field(default_factory=dict)
  grow_dense: bool = True
  target_macs: Optional[int] = None

  def __post_init__(self):
    for name, tau in [('tau', self.tau)] + [(f'tau_per_layer[{k!r}]', v) for k, v in self.tau_per_layer.items()]:
      if not _is_real(tau) or not 0 < tau <= 1:
        raise ValueError(f'growth: `{name}` must be in (0, 1] (the fraction of a layer\'s units in Γ\'s '
                         f'support at which it grows), got {tau!r}.')
    _check_int('`grow_every`', self.grow_every, minimum=1)
    _check_int('`finetune_epochs`', self.finetune_epochs, minimum=0)
    if not _is_real(self.factor) or not 1 <= self.factor < math.inf:
      raise ValueError(f'growth: `factor` must be a finite number >= 1, got {self.factor!r}.')
    unknown = set(self.min_add) - set(KINDS)
    if unknown:
      raise ValueError(f'growth: `min_add` names unknown layer kind(s) {sorted(unknown)}; kinds are {KINDS}.')
    for kind, add in self.min_add.items():
      _check_int(f'`min_add[{kind!r}]`', add, minimum=1)
    if self.max_width is not None:
      _check_int('`max_width`', self.max_width, minimum=1)
    for name, cap in self.max_width_per_layer.items():
      _check_int(f'`max_width_per_layer[{name!r}]`', cap, minimum=1)
    if self.target_macs is not None:
      _check_int('`target_macs`', self.target_macs, minimum=1)

  def tau_of(self, name: str) -> float:
    return self.tau_per_layer.get(name, self.tau)

  def cap_of(self, name: str) -> Optional[int]:
    return self.max_width_per_layer.get(name, self.max_width)

  def is_check(self, epoch: int) -> bool:
    """Whether the end of ``epoch`` (1-based) is a growth check."""
    return epoch > 0 and epoch % self.grow_every == 0


def grown_width(width: int, kind: str, settings: GrowthSettings, name: str = '') -> int:
  """``min(cap, max(n + a_kind, ⌊f·n⌋))``; ⌊f·n⌋ is exact (f read as the decimal it prints as)."""
  add = {**_default_min_add(), **settings.min_add}[kind]
  scaled = math.floor(fractions.Fraction(repr(float(settings.factor))) * width)
  new = max(width + add, scaled)
  cap = settings.cap_of(name)
  return new if cap is None else min(new, cap)


def next_widths(layers: Mapping[str, Layer], settings: GrowthSettings,
                macs: Optional[Callable[[Mapping[str, int]], int]] = None) -> dict[str, int]:
  """The widths after a check: layers at ``rate ≥ τ`` grow, all others keep theirs.

  Args:
    layers: per growable layer (by name), its width, support rate and kind.
    settings: the rule's settings.
    macs: ``{name: width} -> MACs`` of the network of those widths; needed
      with ``settings.target_macs``: a round with ``macs(new) > target_macs``
      is not taken (the input widths come back: growth stops).

  Returns:
    ``{name: new width}`` for every layer; growth has stopped when it equals
    the input widths.

  Raises:
    ValueError: no layer to grow, a rate outside [0, 1], an unknown kind, a
      width below 1 or above its cap, a setting naming an unknown layer.
  """
  if not layers:
    raise ValueError('growth: the model has no units to grow (no conv filter, block or dense neuron '
                     'in its unit map); growth needs at least one growable layer.')
  for field_name in ('tau_per_layer', 'max_width_per_layer'):
    unknown = set(getattr(settings, field_name)) - set(layers)
    if unknown:
      raise ValueError(f'growth: `{field_name}` names no growable layer: {sorted(unknown)}; '
                       f'the layers are {sorted(layers)}.')
  widths = {}
  for name, layer in layers.items():
    width, rate, kind = layer
    if kind not in KINDS:
      raise ValueError(f'growth: layer {name!r} has unknown kind {kind!r}; kinds are {KINDS}.')
    _check_int(f'the width of {name!r}', width, minimum=1)
    cap = settings.cap_of(name)
    if cap is not None and width > cap:
      raise ValueError(f'growth: layer {name!r} starts at width {width}, above its cap {cap}; '
                       f'raise the cap or start narrower.')
    if not _is_real(rate) or not 0 <= rate <= 1:
      raise ValueError(f'growth: the support rate of {name!r} must be in [0, 1], got {rate!r}.')
    grows = rate >= settings.tau_of(name) and (kind != 'dense' or settings.grow_dense)
    widths[name] = grown_width(width, kind, settings, name) if grows else width
  if settings.target_macs is not None:
    if macs is None:
      raise ValueError('growth: `target_macs` is set, so next_widths needs `macs`, the MACs of a network '
                       'of given widths.')
    unchanged = {name: layer.width for name, layer in layers.items()}
    if widths != unchanged and macs(widths) > settings.target_macs:
      return unchanged
  return widths


def _is_real(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _check_int(name: str, value, *, minimum: int) -> None:
  if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
    raise ValueError(f'growth: {name} must be an integer >= {minimum}, got {value!r}.')
