"""The unit map: which slices of which arrays each removable set of units owns.

A **unit** is one output channel (conv filter) or hidden neuron; a
:class:`UnitGroup` is a set of units that can only be removed or added
together, with every :class:`Slice` of every array that belongs to it (see
``docs/STRUCTURE.md``). Residual additions tie channels, so one group may span many
layers (a residual stream); a :class:`UnitMap` is the tuple of a network's groups
plus the rule that rebuilds the model with other widths.

``trace`` (:mod:`dessilbi_jax.structure.trace`) derives the map of a Flax model
from its jaxpr; a map can also be declared by hand with these types, or a
traced one corrected with :meth:`UnitMap.replace`. The operations of
:mod:`dessilbi_jax.structure.surgery` (remove, zero, widen, gate) and
:mod:`dessilbi_jax.structure.count` act on any map.

Indices. Unit ``u`` of a group is channel ``u - slice.offset`` of a slice that
covers it (``offset <= u < offset + size``). Along the slice's ``axis`` of its
leaf, channel ``c`` is index ``p·size + c`` for ``p < repeat``: ``repeat`` is
``H·W`` where a dense layer reads a flattened ``H x W x C`` map (rows
``h·W·C + w·C + c``), 1 otherwise.

Example::

  >>> import jax, jax.numpy as jnp
  >>> from dessilbi_jax import models, structure
  >>> model = models.get_model('mlp', 10, (4,), widths=(3,))
  >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 4)))
  >>> unit_map = structure.trace(model, variables, jnp.zeros((1, 4)))
  >>> [(g.name, g.size, g.prunable) for g in unit_map.groups]
  [('input', 4, False), ('Dense_0', 3, True), ('Dense_1', 10, False)]
  >>> [(s.path, s.axis, s.role) for s in unit_map['Dense_0'].slices]
  [(('Dense_0', 'kernel'), 1, 'producer'), (('Dense_0', 'bias'), 0, 'bias'), (('Dense_1', 'kernel'), 0, 'consumer')]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Optional

import numpy as np

ROLES = ('producer', 'bias', 'norm', 'consumer')
COLLECTIONS = ('params', 'batch_stats')

# (model, its unit map, new widths of every group) -> the rebuilt Flax module.
# A group's ``sources`` are, per unit of the new network, its unit in the old
# one (-1: a new unit; new units come last).
RebuildRule = Callable[[Any, 'UnitMap', Mapping[str, np.ndarray]], Any]


@dataclasses.dataclass(frozen=True)
class Slice:
  """The part of one variable (a params or batch-statistics leaf) a unit group owns.

  Attributes:
    collection: ``'params'`` or ``'batch_stats'``.
    path: the leaf's key path inside the collection, e.g. ``('Conv_3', 'kernel')``.
    axis: the leaf's axis the units run along (non-negative).
    role: ``'producer'`` (the kernel whose outputs are the units), ``'bias'``
      (added to them), ``'norm'`` (a normalization's scale, bias, running mean
      or variance) or ``'consumer'`` (a kernel that reads the units).
    offset: the group's unit of this slice's channel 0.
    size: the number of channels of this slice.
    repeat: ``H·W`` for a dense consumer after a flatten (index ``p·size + c``).
    layer: for ``bias``/``norm`` slices, the module path of the producer
      kernel whose outputs they act on (``()`` if unknown).
  """
  collection: str
  path: tuple[str, ...]
  axis: int
  role: str
  offset: int
  size: int
  repeat: int = 1
  layer: tuple[str, ...] = ()

  def __post_init__(self):
    if self.collection not in COLLECTIONS:
      raise ValueError(f'Slice collection must be one of {COLLECTIONS}; got {self.collection!r}.')
    if self.role not in ROLES:
      raise ValueError(f'Slice role must be one of {ROLES}; got {self.role!r}.')
    if self.axis < 0 or self.offset < 0 or self.size < 0 or self.repeat < 1:
      raise ValueError(f'Slice of {"/".join(self.path)}: axis, offset and size must be >= 0 and repeat >= 1.')

  @property
  def key(self) -> tuple[str, tuple[str, ...]]:
    return (self.collection, self.path)

  def indices(self, channels) -> np.ndarray:
    """The leaf's indices along ``axis`` of these channels of the slice, sorted."""
    channels = np.asarray(channels, dtype=np.int64).reshape(-1)
    return np.sort((np.arange(self.repeat)[:, None] * self.size + channels[None, :]).reshape(-1))

  def channels(self, keep: np.ndarray) -> np.ndarray:
    """This slice's part (length ``size``) of a group's keep-mask."""
    return np.asarray(keep)[self.offset:self.offset + self.size]


@dataclasses.dataclass(frozen=True)
class UnitGroup:
  """One independent set of units and every slice that belongs to it.

  Attributes:
    name: the group's name: the module path of its first producer (or ``'input'``).
    size: the number of units.
    slices: every :class:`Slice` of every leaf that belongs to it.
    prunable: ``False`` for the network's inputs and outputs (the classifier's
      logits are never units) and where tracing found channels mixed; see ``reason``.
    reason: why the group is not prunable.
    block: the residual block whose internal width this is: such a group may
      fall to 0 units, the block becoming the identity (its other groups with
      it); ``None``: the layer keeps at least one unit.
    kind: ``'head'`` for attention heads: unit ``h`` is head ``h`` of the
      query, key and value projections (tied by the attention products, not
      by a residual addition) and the output projection's input slice;
      ``None`` for channels and neurons.
  """
  name: str
  size: int
  slices: tuple[Slice, ...]
  prunable: bool = True
  reason: str = ''
  block: Optional[str] = None
  kind: Optional[str] = None

  @property
  def producers(self) -> tuple[Slice, ...]:
    return tuple(s for s in self.slices if s.role == 'producer')

  @property
  def is_stream(self) -> bool:
    """Whether residual additions (several producers) tie this group's channels."""
    return len(self.producers) > 1 and self.kind != 'head'


@dataclasses.dataclass(frozen=True)
class UnitMap:
  """The unit groups of a network and the rule that rebuilds it with other widths.

  Attributes:
    groups: the :class:`UnitGroup` s, in the order the forward pass meets them.
    rebuild: ``rebuild(model, unit_map, sources) -> flax Module`` for new widths
      (:data:`RebuildRule`); ``None`` where the map cannot rebuild its model.
    positions: per kernel (its params path), the output positions of one
      example (1 for a dense layer on a vector): multiply-accumulates are
      positions times kernel entries.
    input_shape: the shape of one example the map was traced with (no batch axis).
    apply_kwargs: the keyword arguments of ``model.apply`` it was traced with,
      as ``((name, value), ...)``; ``None``: ``train=False``.
  """
  groups: tuple[UnitGroup, ...]
  rebuild: Optional[RebuildRule] = None
  positions: tuple[tuple[tuple[str, ...], int], ...] = ()
  input_shape: tuple[int, ...] = ()
  apply_kwargs: Optional[tuple[tuple[str, Any], ...]] = None

  @property
  def eval_kwargs(self) -> dict[str, Any]:
    """The keyword arguments of ``model.apply`` in eval mode."""
    return {'train': False} if self.apply_kwargs is None else dict(self.apply_kwargs)

  def __post_init__(self):
    names = [g.name for g in self.groups]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
      raise ValueError(f'Unit group names must be unique; repeated: {duplicates}.')
    owner = {}
    for group in self.groups:
      for s in group.slices:
        where = (s.key, s.axis)
        if where in owner and owner[where] != group.name:
          raise ValueError(
              f'{s.collection}/{"/".join(s.path)} axis {s.axis} belongs to two unit groups, {owner[where]!r} '
              f'and {group.name!r}; tie them into one group.')
        owner[where] = group.name

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(g.name for g in self.groups)

  def __getitem__(self, name: str) -> UnitGroup:
    for group in self.groups:
      if group.name == name:
        return group
    raise KeyError(f'No unit group {name!r}; the groups are: {", ".join(self.names)}.')

  def prunable(self) -> tuple[UnitGroup, ...]:
    """The groups whose units may be removed."""
    return tuple(g for g in self.groups if g.prunable)

  def owner(self, path: tuple[str, ...], role: str = 'producer') -> Optional[UnitGroup]:
    """The group with a ``role`` slice of params leaf ``path`` (``None``: no such group)."""
    for group in self.groups:
      if any(s.path == tuple(path) and s.role == role and s.collection == 'params' for s in group.slices):
        return group
    return None

  def replace(self, name: str, **changes) -> 'UnitMap':
    """A copy with group ``name``'s fields changed, e.g. ``prunable=False``."""
    self[name]  # a clear error for an unknown name
    return dataclasses.replace(self, groups=tuple(
        dataclasses.replace(g, **changes) if g.name == name else g for g in self.groups))

  def leaves(self) -> dict[tuple[str, tuple[str, ...]], list[tuple[UnitGroup, Slice]]]:
    """Per ``(collection, path)``: the ``(group, slice)`` pairs that cut it."""
    table: dict[Any, list] = {}
    for group in self.groups:
      for s in group.slices:
        table.setdefault(s.key, []).append((group, s))
    return table


def new_extent(offset: int, size: int, group_size: int, sources: np.ndarray) -> tuple[int, np.ndarray]:
  """A channel range ``[offset, offset + size)`` of a group in the new network.

  Returns its new offset and, per new channel, its old channel (-1: a new one).
  New units (``sources == -1``, last) join the ranges that reach the group's end.
  """
  sources = np.asarray(sources)
  old = sources[sources >= 0]
  inside = (old >= offset) & (old < offset + size)
  channels = old[inside] - offset
  if offset + size == group_size:
    channels = np.concatenate([channels, sources[sources < 0]])
  return int(np.sum(old < offset)), channels.astype(np.int64)
