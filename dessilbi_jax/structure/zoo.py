"""How the zoo's models are rebuilt with new widths, and which of their groups are block-internal.

A traced map (:func:`dessilbi_jax.structure.trace`) names each group by its
first producer's module path; these rules read the new widths of the zoo's
models off those names (``Conv_3``, ``BasicBlock_4/Conv_0``, ...) and return
``model.clone(...)`` with them. A residual block's internal groups are
annotated with the block, so that one falling to 0 units makes the block the
identity.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Optional

import numpy as np

from dessilbi_jax import models
from dessilbi_jax.structure.unit_map import UnitMap, new_extent


def _width(sources: Mapping[str, np.ndarray], name: str) -> int:
  return int(len(sources[name])) if name in sources else 0


def _sequential(prefixes):
  def rule(model, unit_map: UnitMap, sources):
    return model.clone(widths=tuple(_width(sources, name) for name in prefixes(model)),
                       parent=None)
  return rule


def _cifar_stage_ranges(model: models.CifarResNet) -> list[tuple[int, int]]:
  """Per stage, the stream's channel range within the last stage's (option-A offsets)."""
  widths = list(model.widths)
  starts = [0] * len(widths)
  for s in range(len(widths) - 1, 0, -1):
    extra = widths[s] - widths[s - 1]
    offset = extra // 2 if model.shortcut_offsets is None else model.shortcut_offsets[s - 1]
    starts[s - 1] = starts[s] + offset
  return list(zip(starts, widths))


def _block_names(model, prefix: str):
  names, index = [], 0
  for blocks in model.stage_sizes:
    names.append([f'{prefix}_{index + b}' for b in range(blocks)])
    index += blocks
  return names


def _cifar_resnet(model: models.CifarResNet, unit_map: UnitMap, sources):
  stream = unit_map.owner(('Conv_0', 'kernel'))
  ranges = [new_extent(start, width, stream.size, sources[stream.name])
            for start, width in _cifar_stage_ranges(model)]
  widths = tuple(len(channels) for _, channels in ranges)
  offsets = tuple(ranges[s - 1][0] - ranges[s][0] for s in range(1, len(ranges)))
  blocks = [b for stage in _block_names(model, 'BasicBlock') for b in stage]
  return model.clone(widths=widths, shortcut_offsets=offsets, parent=None,
                     block_widths=tuple(_width(sources, f'{b}/Conv_0') for b in blocks))


def _resnet(model: models.ResNet, unit_map: UnitMap, sources):
  bottleneck = model.block is models.BottleneckBlock
  prefix = 'BottleneckBlock' if bottleneck else 'BasicBlock'
  names = _block_names(model, prefix)
  streams = []
  for stage, blocks in enumerate(names):
    projected = unit_map.owner((blocks[0], 'shortcut_conv', 'kernel'))
    streams.append(projected if projected is not None else unit_map.owner(('Conv_0', 'kernel')))
  if bottleneck:
    inner = tuple((_width(sources, f'{b}/Conv_0'), _width(sources, f'{b}/Conv_1')) for stage in names for b in stage)
  else:
    inner = tuple(_width(sources, f'{b}/Conv_0') for stage in names for b in stage)
  return model.clone(parent=None, stem_width=_width(sources, unit_map.owner(('Conv_0', 'kernel')).name),
                     stream_widths=tuple(_width(sources, g.name) for g in streams), block_widths=inner)


def _transformer(model, unit_map: UnitMap, sources):
  """The zoo's ViT and decoder: per block, its heads and MLP neurons kept (a half left out: 0)."""
  blocks = range(len(model.widths))
  return model.clone(parent=None, heads=tuple(_width(sources, f'Block_{i}/attention/query') for i in blocks),
                     widths=tuple(_width(sources, f'Block_{i}/mlp_up') for i in blocks))


_RULES = {
    models.MLP: _sequential(lambda m: [f'Dense_{i}' for i in range(len(m.widths))]),
    models.LeNet5: _sequential(lambda m: ['Conv_0', 'Conv_1', 'Dense_0', 'Dense_1']),
    models.Conv1DNet: _sequential(lambda m: [f'Conv_{i}' for i in range(3)]),
    models.VGG16: _sequential(lambda m: [f'Conv_{i}' for i in range(13)]),
    models.CifarResNet: _cifar_resnet,
    models.ResNet: _resnet,
    models.ViT: _transformer,
    models.GPT: _transformer,
}


def rebuild_rule(model) -> Optional[callable]:
  """The zoo's rule ``(model, unit_map, sources) -> module`` for ``model``'s class, or ``None``."""
  return _RULES.get(type(model))


def annotate(model, unit_map: UnitMap) -> UnitMap:
  """Marks the internal groups of the zoo's residual blocks with their block."""
  if not isinstance(model, (models.CifarResNet, models.ResNet)):
    return unit_map
  groups = []
  for group in unit_map.groups:
    head = group.name.split('/')[0]
    internal = (head.startswith(('BasicBlock_', 'BottleneckBlock_'))
                and group.name.split('/')[-1] in ('Conv_0', 'Conv_1') and not group.is_stream
                and not any(s.path[-2] == 'shortcut_conv' for s in group.producers))
    # A basic block's Conv_1 writes the stream; only a bottleneck's Conv_1 is internal.
    if internal and group.name.endswith('Conv_1') and head.startswith('BasicBlock_'):
      internal = False
    groups.append(dataclasses.replace(group, block=head) if internal else group)
  return dataclasses.replace(unit_map, groups=tuple(groups))
