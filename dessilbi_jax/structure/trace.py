"""Deriving a network's unit map by following channel axes through its jaxpr.

``trace(model, variables, x)`` runs ``jax.make_jaxpr`` on ``model.apply`` in eval
mode and interprets the jaxpr on *labels* instead of numbers: every
activation carries the axis its channels run along and the channel space
they belong to; every value computed from variables alone carries which
axes of which leaves it views. Then

* a convolution or ``dot_general`` with a kernel opens a new channel space
  (the kernel's output axis is its ``producer`` slice) and closes the input's
  (the kernel's input axis: a ``consumer`` slice, ``repeat = H·W`` after a
  flatten);
* an elementwise op between a variable and an activation makes the
  variable a ``bias`` or ``norm`` slice (batch norm's scale, bias, mean, var);
* an elementwise op between activations (a residual add) ties their channel
  spaces (union-find, with offsets), as do a channel ``pad`` (option-A
  shortcuts: channel ``c`` becomes ``c + offset``) and ``concatenate``;
* pooling, spatial slicing and padding, reshapes that keep or flatten the
  channel axis, transposes and reductions over other axes carry labels along;
  a reduction over channels makes their group unprunable (a LayerNorm keeps
  its residual stream whole);
* attention: a kernel with several output axes (``DenseGeneral``'s
  ``(D, H, K)``) produces its first (the heads), the others belong to each
  unit; a ``dot_general`` of two activations batched over their channels on
  both sides (``'...qhd,...khd->...hqk'`` and the weighted values) ties the
  query, key and value heads into one ``kind='head'`` group, whose consumer is
  the output kernel's ``(H, K, D)`` axis 0; key/value heads shared by several
  query heads (grouped or multi-query attention) raise;
* an embedding lookup (``gather`` of a table's rows) opens a channel space;
  a variable concatenated along positions (a class token) is a slice of it.

Each channel space that ends up in the model's outputs, or began as its
inputs, is a group with ``prunable=False``. An op the interpreter cannot follow
raises :class:`UntraceableError` naming it and its source line; declare the
map by hand then (:mod:`dessilbi_jax.structure.unit_map`), or correct a traced
one with ``UnitMap.replace``.

Example::

  >>> import jax, jax.numpy as jnp
  >>> from dessilbi_jax import models, structure
  >>> model = models.get_model('lenet5', 10, (8, 8, 1))
  >>> x = jnp.zeros((1, 8, 8, 1))
  >>> unit_map = structure.trace(model, jax.eval_shape(model.init, jax.random.key(0), x), x)
  >>> [(g.name, g.size) for g in unit_map.prunable()]
  [('Conv_0', 6), ('Conv_1', 16), ('Dense_0', 120), ('Dense_1', 84)]
  >>> [(s.path, s.axis, s.repeat) for s in unit_map['Conv_1'].slices if s.role == 'consumer']
  [(('Dense_0', 'kernel'), 0, 4)]
"""

from __future__ import annotations

import dataclasses
import math
import traceback
from collections.abc import Callable
from typing import Optional

import jax
import numpy as np
from jax.extend import core as jex_core

from dessilbi_jax.structure.unit_map import Slice, UnitGroup, UnitMap


class UntraceableError(ValueError):
  """The channels cannot be followed through an op of the traced function."""


_UNARY = {
    'neg', 'exp', 'exp2', 'log', 'log1p', 'expm1', 'tanh', 'logistic', 'abs', 'sqrt', 'rsqrt', 'cbrt', 'sign',
    'floor', 'ceil', 'round', 'convert_element_type', 'integer_pow', 'square', 'erf', 'erfc', 'erf_inv',
    'stop_gradient', 'copy', 'copy_p', 'reduce_precision', 'sin', 'cos', 'tan', 'not', 'is_finite', 'real',
    'imag', 'optimization_barrier',
}
_BINARY = {'add', 'add_any', 'sub', 'mul', 'div', 'max', 'min', 'pow', 'atan2', 'rem', 'nextafter', 'and', 'or',
           'xor', 'eq', 'ne', 'lt', 'le', 'gt', 'ge', 'select_n', 'clamp'}
_REDUCE = {'reduce_sum', 'reduce_max', 'reduce_min', 'reduce_prod', 'reduce_and', 'reduce_or', 'argmax', 'argmin'}
_WINDOW = {'reduce_window_sum', 'reduce_window_max', 'reduce_window_min', 'reduce_window'}
_CALL_PARAMS = ('jaxpr', 'call_jaxpr', 'fun_jaxpr')


@dataclasses.dataclass(frozen=True)
class _Label:
  """An activation: its channels run along ``axis`` (``repeat`` > 1: flattened with space dims)."""
  axis: int
  space: int
  repeat: int = 1
  layer: tuple[str, ...] = ()  # the producer kernel's module, while only elementwise ops followed it
  broadcast: bool = False  # broadcast along a new axis (jnp.repeat of key/value heads, before a reshape)


@dataclasses.dataclass(frozen=True)
class _Origin:
  """A value computed from one leaf: ``axes[i]`` is the leaf axis behind axis i (None: broadcast)."""
  key: tuple[str, tuple[str, ...]]
  axes: tuple[Optional[int], ...]


class _Spaces:
  """Channel spaces under union-find with offsets: channel c of a space is c + offset of its root."""

  def __init__(self):
    self.parent, self.offset, self.low, self.high, self.fixed = [], [], [], [], []
    self.kind: list = []  # 'head': tied by attention products

  def new(self, size: int) -> int:
    self.parent.append(len(self.parent))
    self.offset.append(0)
    self.low.append(0)
    self.high.append(size)
    self.fixed.append('')
    self.kind.append(None)
    return len(self.parent) - 1

  def find(self, s: int) -> tuple[int, int]:
    offset = 0
    while self.parent[s] != s:
      offset += self.offset[s]
      s = self.parent[s]
    return s, offset

  def tie(self, a: int, b: int, shift: int = 0) -> None:
    """Channel c of space a is channel c + shift of space b."""
    (ra, oa), (rb, ob) = self.find(a), self.find(b)
    d = ob + shift - oa  # channel x of root ra is channel x + d of root rb
    if ra == rb:
      if d != 0:
        raise UntraceableError('A residual stream is added to itself at two different channel offsets.')
      return
    self.parent[ra], self.offset[ra] = rb, d
    self.low[rb] = min(self.low[rb], self.low[ra] + d)
    self.high[rb] = max(self.high[rb], self.high[ra] + d)
    self.fixed[rb] = self.fixed[rb] or self.fixed[ra]
    self.kind[rb] = self.kind[rb] or self.kind[ra]

  def fix(self, s: int, reason: str) -> None:
    root, _ = self.find(s)
    self.fixed[root] = self.fixed[root] or reason

  def mark(self, s: int, kind: str) -> None:
    root, _ = self.find(s)
    self.kind[root] = kind


def _positions(out_shape, channel_axis: int) -> int:
  """Output positions of one example: every axis but the batch (0) and the channels (0 channels allowed)."""
  return math.prod(n for i, n in enumerate(out_shape) if i not in (0, channel_axis))


def _summary(eqn) -> str:
  try:
    from jax._src import source_info_util  # pylint: disable=g-import-not-at-top
    return source_info_util.summarize(eqn.source_info)
  except Exception:  # pylint: disable=broad-except
    return ''


_LIBRARIES = ('/flax/', '/jax/', '/optax/', '/dessilbi_jax/structure/')


def _user_line(eqn) -> str:
  """The innermost frame of the op's traceback outside Flax, JAX and this tracer (the user's line)."""
  try:
    from jax._src import source_info_util  # pylint: disable=g-import-not-at-top
    for frame in source_info_util.user_frames(eqn.source_info.traceback):
      if not any(lib in frame.file_name.replace('\\', '/') for lib in _LIBRARIES):
        return source_info_util._summarize_frame(frame)  # pylint: disable=protected-access
  except Exception:  # pylint: disable=broad-except
    pass
  return ''


class _Interpreter:
  """Runs a jaxpr on labels, recording slices."""

  def __init__(self, normalized_modules: set[tuple[str, ...]]):
    self.spaces = _Spaces()
    self.records: list[tuple[int, int, dict]] = []  # (space, channel offset in it, Slice fields)
    self.normalized_modules = normalized_modules
    self.positions: list = []  # (kernel path, output positions of one example)
    self.call_sites: list = []  # the eqns whose sub-jaxprs are being run (a library function's call site)

  def where(self, eqn) -> str:
    """The op's source line, or that of the user's call into the library function holding it."""
    for candidate in [eqn] + self.call_sites[::-1]:
      line = _summary(candidate)
      if line:
        user = _user_line(candidate)
        return line if not user or user == line else f'{line}, called from {user}'
    return 'an unknown source line'

  # -- helpers ---------------------------------------------------------------
  def fail(self, eqn, why: str):
    raise UntraceableError(
        f'Cannot follow the channels through `{eqn.primitive.name}` at {self.where(eqn)}: {why}. '
        'Declare this part of the unit map by hand (dessilbi_jax.structure.UnitGroup / Slice), or correct the '
        'traced map with UnitMap.replace.')

  def record(self, space: int, key, axis: int, role: str, size: int, repeat: int = 1, layer=()):
    self.records.append((space, 0, dict(collection=key[0], path=key[1], axis=axis, role=role, size=size,
                                        repeat=repeat, layer=tuple(layer))))

  def role_of(self, key) -> str:
    collection, path = key
    if collection == 'batch_stats' or path[:-1] in self.normalized_modules or path[-1] == 'scale':
      return 'norm'
    return 'bias'

  # -- the interpreter -------------------------------------------------------
  def run(self, jaxpr, inputs: list) -> list:
    env = {}

    def read(v):
      if isinstance(v, jex_core.Literal):
        return None
      return env.get(v)

    for var, value in zip(jaxpr.invars, inputs):
      env[var] = value
    for eqn in jaxpr.eqns:
      values = [read(v) for v in eqn.invars]
      outs = self.eqn(eqn, values)
      for var, value in zip(eqn.outvars, outs):
        env[var] = value
    return [read(v) for v in jaxpr.outvars]

  def eqn(self, eqn, values: list) -> list:
    name = eqn.primitive.name
    n_out = len(eqn.outvars)
    if all(v is None for v in values):
      return [None] * n_out
    for param in _CALL_PARAMS:
      sub = eqn.params.get(param)
      if sub is not None:
        closed = sub if hasattr(sub, 'jaxpr') else None
        inner = closed.jaxpr if closed is not None else sub
        if len(inner.invars) == len(values):
          self.call_sites.append(eqn)
          try:
            return self.run(inner, values)
          finally:
            self.call_sites.pop()
    shape_in = [getattr(v.aval, 'shape', ()) for v in eqn.invars]
    shape_out = eqn.outvars[0].aval.shape
    labels = [v if isinstance(v, _Label) else None for v in values]
    views = [v if isinstance(v, list) else None for v in values]
    if name == 'conv_general_dilated':
      return [self.conv(eqn, values)]
    if name == 'dot_general':
      if not any(isinstance(v, list) for v in values):
        return [self.product(eqn, values)]
      return [self.dot(eqn, values)]
    if name == 'gather':
      return [self.gather(eqn, values)]
    if name in _UNARY or (name in _BINARY) or name == 'select_n':
      return [self.elementwise(eqn, labels, views, shape_in, shape_out)]
    label, view = labels[0], views[0]
    if name == 'broadcast_in_dim':
      dims = eqn.params['broadcast_dimensions']
      if label is not None:
        inserted = any(i not in dims and n > 1 for i, n in enumerate(shape_out))
        return [dataclasses.replace(label, axis=dims[label.axis], broadcast=label.broadcast or inserted)]
      return [self.map_view(view, lambda axes: tuple(
          axes[dims.index(i)] if i in dims and shape_in[0][dims.index(i)] == shape_out[i] else None
          for i in range(len(shape_out))))]
    if name == 'reshape':
      return [self.shared_heads_reshape(eqn, label, view, shape_in[0], shape_out)]
    if name == 'squeeze':
      dims = sorted(d % len(shape_in[0]) for d in eqn.params['dimensions'])
      keep = [i for i in range(len(shape_in[0])) if i not in dims]
      if label is not None:
        return [dataclasses.replace(label, axis=keep.index(label.axis))]
      return [self.map_view(view, lambda axes: tuple(axes[i] for i in keep))]
    if name == 'transpose':
      perm = tuple(eqn.params['permutation'])
      if label is not None:
        return [dataclasses.replace(label, axis=perm.index(label.axis))]
      return [self.map_view(view, lambda axes: tuple(axes[p] for p in perm))]
    if name in _REDUCE:
      axes = tuple(eqn.params['axes'])
      if label is None:
        return [self.map_view(view, lambda va: tuple(a for i, a in enumerate(va) if i not in axes))] * n_out
      if label.axis in axes:
        self.spaces.fix(label.space, self.reduction_reason(eqn))
        return [None] * n_out
      return [dataclasses.replace(label, axis=label.axis - sum(a < label.axis for a in axes))] * n_out
    if name in _WINDOW or name == 'cumsum' or name.startswith('cum'):
      if label is None:
        self.fail(eqn, 'a window over a value computed from the variables')
      window = eqn.params.get('window_dimensions')
      if window is None or window[label.axis] != 1 or eqn.params.get('padding', ((0, 0),) * 8)[label.axis] != (0, 0):
        self.fix_or_fail(eqn, label, 'a window across channels')
        return [None] * n_out
      return [label] * n_out
    if name == 'pad':
      return [self.pad(eqn, values, shape_in, shape_out)]
    if name == 'concatenate':
      if any(isinstance(v, list) for v in values):
        return [self.concatenate_variables(eqn, values, shape_in)]
      return [self.concatenate(eqn, values, shape_in)]
    if name == 'slice':
      if label is None:
        return [self.slice_variable(eqn, view, shape_in[0])]
      start, limit = eqn.params['start_indices'][label.axis], eqn.params['limit_indices'][label.axis]
      strides = eqn.params.get('strides') or (1,) * len(shape_in[0])
      if (start, limit, strides[label.axis]) != (0, shape_in[0][label.axis], 1):
        if strides[label.axis] != 1 or label.repeat != 1:
          self.fail(eqn, 'it keeps every other channel (a strided channel slice)')
        return [self.channel_part(eqn, label, start, limit - start)]
      return [label]
    if name == 'split' and isinstance(label, _Label):
      if eqn.params['axis'] != label.axis:
        return [label] * n_out
      if label.repeat != 1:
        self.fail(eqn, 'it splits flattened channels')
      starts = np.cumsum([0, *eqn.params['sizes']])
      return [self.channel_part(eqn, label, int(a), int(b - a)) for a, b in zip(starts[:-1], starts[1:])]
    self.fail(eqn, 'this op is not one the unit-map tracer knows')

  def channel_part(self, eqn, label: _Label, start: int, size: int) -> _Label:
    """Channels ``[start, start + size)`` of a space (a static slice or split): a range of it, kept whole.

    Its readers are followed (their slices sit at ``offset = start``), but the bounds are written in the
    model's code, so removing a channel would shift them: the space is not prunable.
    """
    space = self.spaces.new(size)
    self.spaces.tie(space, label.space, start)
    self.spaces.fix(label.space, f'a static channel slice or split (`{eqn.primitive.name}` at {self.where(eqn)}) '
                                 'has its bounds in the code')
    return dataclasses.replace(label, space=space, layer=())

  def fix_or_fail(self, eqn, label, why):
    self.spaces.fix(label.space, f'{why} (`{eqn.primitive.name}` at {self.where(eqn)})')

  @staticmethod
  def map_view(view, fn: Callable):
    if view is None:
      return None
    return [dataclasses.replace(o, axes=fn(o.axes)) for o in view]

  def kernel_of(self, eqn, view) -> _Origin:
    if view is None or len(view) != 1:
      self.fail(eqn, 'its kernel is not one variable (a product of two activations, or a computed kernel)')
    return view[0]

  def consume(self, label: Optional[_Label], kernel: _Origin, kernel_axis: int, eqn, size: int):
    if label is None:
      return
    leaf_axis = kernel.axes[kernel_axis]
    if leaf_axis is None:
      self.fail(eqn, 'its kernel is broadcast along the input channels')
    self.record(label.space, kernel.key, leaf_axis, 'consumer', size // label.repeat, label.repeat)

  def produce(self, kernel: _Origin, kernel_axis: int, out_axis: int, size: int, eqn, free: int = 0) -> _Label:
    leaf_axis = kernel.axes[kernel_axis]
    if leaf_axis is None:
      self.fail(eqn, 'its kernel is broadcast along the output channels')
    space = self.spaces.new(size)
    self.record(space, kernel.key, leaf_axis, 'producer', size)
    out_shape = eqn.outvars[0].aval.shape
    # A kernel with several output axes (attention's (D, H, K)): ``free`` is their product.
    self.positions.append((kernel.key[1], math.prod(out_shape) // out_shape[0] // free if free
                           else _positions(out_shape, out_axis)))
    return _Label(out_axis, space, 1, kernel.key[1][:-1])

  def conv(self, eqn, values) -> _Label:
    lhs, rhs = values
    if isinstance(lhs, list) or not isinstance(rhs, list):
      self.fail(eqn, 'the kernel must be a variable and the input an activation')
    if eqn.params['batch_group_count'] != 1:
      self.fail(eqn, 'a batch-grouped convolution mixes the batch into the channels')
    if eqn.params['feature_group_count'] != 1:
      return self.grouped_conv(eqn, values)
    lhs_spec, rhs_spec, out_spec = eqn.params['dimension_numbers']
    kernel = self.kernel_of(eqn, rhs)
    if lhs is not None:
      if lhs.axis != lhs_spec[1] or lhs.repeat != 1:
        self.fail(eqn, 'its input channels are not the traced channel axis')
      self.consume(lhs, kernel, rhs_spec[1], eqn, eqn.invars[0].aval.shape[lhs_spec[1]])
    return self.produce(kernel, rhs_spec[0], out_spec[1], eqn.outvars[0].aval.shape[out_spec[1]], eqn)

  def grouped_conv(self, eqn, values) -> _Label:
    """A depthwise conv (one filter per channel) keeps its input's channel space: it ties, like a norm.

    Its kernel's output axis is a ``producer`` slice of that space (a unit goes with its filter). Other
    grouped convs tie whole groups of channels: their input and output spaces are kept whole.
    """
    lhs, rhs = values
    lhs_spec, rhs_spec, out_spec = eqn.params['dimension_numbers']
    kernel = self.kernel_of(eqn, rhs)
    groups = eqn.params['feature_group_count']
    size_in = eqn.invars[0].aval.shape[lhs_spec[1]]
    size_out = eqn.outvars[0].aval.shape[out_spec[1]]
    if not isinstance(lhs, _Label) or lhs.axis != lhs_spec[1] or lhs.repeat != 1:
      self.fail(eqn, 'its input channels are not the traced channel axis')
    if groups == size_in == size_out:
      leaf_axis = kernel.axes[rhs_spec[0]]
      if leaf_axis is None:
        self.fail(eqn, 'its kernel is broadcast along the channels')
      self.record(lhs.space, kernel.key, leaf_axis, 'producer', size_out)
      self.positions.append((kernel.key[1], _positions(eqn.outvars[0].aval.shape, out_spec[1])))
      return _Label(out_spec[1], lhs.space, 1, kernel.key[1][:-1])
    why = f'a grouped convolution ({groups} groups) ties its channels group by group (`conv` at {self.where(eqn)})'
    self.spaces.fix(lhs.space, why)
    label = self.produce(kernel, rhs_spec[0], out_spec[1], size_out, eqn)
    self.spaces.fix(label.space, why)
    return label

  def dot(self, eqn, values) -> _Label:
    (lhs_c, rhs_c), (lhs_b, rhs_b) = eqn.params['dimension_numbers']
    if lhs_b or rhs_b:
      self.fail(eqn, 'batched matrix products (attention) are not followed')
    if isinstance(values[1], list) and not isinstance(values[0], list):
      act, kernel_view, act_c, kernel_c, kernel_is_rhs = values[0], values[1], lhs_c, rhs_c, True
    elif isinstance(values[0], list) and not isinstance(values[1], list):
      act, kernel_view, act_c, kernel_c, kernel_is_rhs = values[1], values[0], rhs_c, lhs_c, False
    else:
      self.fail(eqn, 'one operand must be a variable (the kernel) and the other an activation')
    kernel = self.kernel_of(eqn, kernel_view)
    shapes = [v.aval.shape for v in eqn.invars]
    act_shape, kernel_shape = (shapes[0], shapes[1]) if kernel_is_rhs else (shapes[1], shapes[0])
    if act is not None:
      if act.axis not in act_c or (len(act_c) != 1 and act.repeat != 1):
        self.fail(eqn, 'it does not contract the channel axis')
      # Other contracted axes (a head's dimensions, (H, K, D) output kernels) are read with the unit.
      self.consume(act, kernel, kernel_c[act_c.index(act.axis)], eqn, act_shape[act.axis])
    kernel_free = [i for i in range(len(kernel_shape)) if i not in kernel_c]
    act_free = [i for i in range(len(act_shape)) if i not in act_c]
    if not kernel_free:
      self.fail(eqn, 'its kernel has no output axis')
    # Several output axes, (D, H, K) in Flax's DenseGeneral layout: the first (heads) are the units,
    # the others (each head's dimensions) belong to them.
    out_axis = len(act_free) if kernel_is_rhs else 0
    return self.produce(kernel, kernel_free[0], out_axis, kernel_shape[kernel_free[0]], eqn,
                        free=math.prod(kernel_shape[i] for i in kernel_free))

  def elementwise(self, eqn, labels, views, shape_in, shape_out):
    present = [(i, l) for i, l in enumerate(labels) if l is not None]
    if not present:
      merged = [o for v in views if v is not None for o in v
                if len(o.axes) == len(shape_out)]
      return merged or None
    axes = {l.axis for _, l in present}
    repeats = {l.repeat for _, l in present}
    if len(axes) > 1 or len(repeats) > 1:
      self.fail(eqn, 'it combines activations whose channels run along different axes')
    first = present[0][1]
    for _, other in present[1:]:
      self.spaces.tie(other.space, first.space)
    for view, shape in zip(views, shape_in):
      for origin in view or ():
        if len(shape) != len(shape_out) or shape[first.axis] != shape_out[first.axis]:
          continue  # broadcast along the channels: not a per-channel variable
        leaf_axis = origin.axes[first.axis]
        if leaf_axis is None:
          continue
        self.record(first.space, origin.key, leaf_axis, self.role_of(origin.key), shape_out[first.axis],
                    layer=first.layer)
    layer = first.layer if len(present) == 1 else ()
    return dataclasses.replace(first, layer=layer)

  def reshape(self, eqn, label, view, old, new):
    if label is None:
      # Map the non-unit axes in order (a bias (C,) viewed as (1, 1, 1, C)).
      def fn(axes):
        old_axes = [a for a, n in zip(axes, old) if n != 1]
        old_sizes = [n for n in old if n != 1]
        new_sizes = [n for n in new if n != 1]
        if old_sizes != new_sizes:
          return None
        it = iter(old_axes)
        return tuple(next(it) if n != 1 else None for n in new)
      mapped = [o for o in self.map_view(view, fn) if o.axes is not None]
      return mapped or None
    before, channels = math.prod(old[:label.axis]), old[label.axis]
    after = math.prod(old[label.axis + 1:])
    for j in range(len(new)):
      if math.prod(new[j + 1:]) == after and math.prod(new[:j]) * new[j] == before * channels:
        merged = new[j] // channels if new[j] % channels == 0 else 0
        if merged >= 1 and (after == 1 or merged == 1):
          return dataclasses.replace(label, axis=j, repeat=label.repeat * merged)
    self.fail(eqn, f'it reshapes the channel axis {label.axis} of {tuple(old)} into {tuple(new)}')

  def pad(self, eqn, values, shape_in, shape_out):
    label = values[0]
    if not isinstance(label, _Label):
      self.fail(eqn, 'padding a value computed from the variables')
    low, high, interior = eqn.params['padding_config'][label.axis]
    if (low, high, interior) == (0, 0, 0):
      return label
    if interior or low < 0 or high < 0 or label.repeat != 1:
      self.fail(eqn, 'only zero padding at the ends of the channel axis is followed')
    space = self.spaces.new(shape_out[label.axis])
    self.spaces.tie(label.space, space, low)
    return dataclasses.replace(label, space=space, layer=())

  def concatenate(self, eqn, values, shape_in):
    dim = eqn.params['dimension']
    present = [v for v in values if isinstance(v, _Label)]
    if any(isinstance(v, list) for v in values) or len({v.axis for v in present}) > 1:
      self.fail(eqn, 'it concatenates variables or activations with different channel axes')
    first = present[0]
    if dim != first.axis:
      for other in present[1:]:
        self.spaces.tie(other.space, first.space)
      return dataclasses.replace(first, layer=())
    space = self.spaces.new(sum(s[dim] for s in shape_in))
    start = 0
    for value, shape in zip(values, shape_in):
      if isinstance(value, _Label):
        self.spaces.tie(value.space, space, start)
      start += shape[dim]
    return _Label(dim, space)

  # -- attention: products of two activations, embeddings, tokens --------------
  def product(self, eqn, values) -> Optional[_Label]:
    """``dot_general`` of two activations (attention's scores and weighted values).

    Batched over the heads on both sides (``'...qhd,...khd->...hqk'``), the
    products tie the query, key and value heads: one ``'head'`` group. Channels
    contracted on both sides (one head written with 2-D kernels: the head's
    dimensions) are tied too, but kept: removing one changes the ``1/√d``
    scale that is computed from the shape. A channel axis met by an axis that
    is not the other side's channels (key/value heads shared by several query
    heads) cannot be followed.
    """
    (lhs_c, rhs_c), (lhs_b, rhs_b) = eqn.params['dimension_numbers']
    shapes = [v.aval.shape for v in eqn.invars]
    free = [[i for i in range(len(shape)) if i not in c and i not in b]
            for shape, c, b in zip(shapes, (lhs_c, rhs_c), (lhs_b, rhs_b))]

    def place(side: int, label: _Label):
      c, b = (lhs_c, rhs_c)[side], (lhs_b, rhs_b)[side]
      if label.axis in b:
        return 'batch', b.index(label.axis)
      if label.axis in c:
        return 'contract', c.index(label.axis)
      return 'free', len(lhs_b) + (0 if side == 0 else len(free[0])) + free[side].index(label.axis)

    present = [(side, v) for side, v in enumerate(values) if isinstance(v, _Label)]
    if any(v.repeat != 1 for _, v in present):
      self.fail(eqn, 'a product of activations whose channels were flattened with other axes')
    places = [place(side, v) for side, v in present]
    if len(present) == 2:
      (_, a), (_, b) = present
      if places[0] == places[1] and places[0][0] == 'batch':
        self.spaces.tie(b.space, a.space)
        self.spaces.mark(a.space, 'head')
        return _Label(places[0][1], a.space)
      if places[0] == places[1] and places[0][0] == 'contract':
        self.spaces.tie(b.space, a.space)
        self.spaces.fix(a.space, f'attention contracts these channels (one head\'s dimensions) at {self.where(eqn)}: '
                                 'removing one changes the 1/sqrt(d) scale computed from the shape')
        return None
      if 'contract' in (places[0][0], places[1][0]) or places[0][0] == places[1][0] == 'batch':
        self.fail(eqn, 'one side\'s channels (heads) meet an axis of the other that is not its channels: grouped or '
                       'multi-query attention, where several query heads share a key/value head, is not supported '
                       '(give every query head its own key and value head)')
      self.fail(eqn, 'an outer product of two activations\' channels')
    (kind, axis), = places
    if kind == 'contract':
      self.fail(eqn, 'it contracts the channels with an array computed from neither the variables nor the channels')
    return _Label(axis, present[0][1].space)

  def reduction_reason(self, eqn) -> str:
    """Why a reduction over the channels keeps them: a LayerNorm's residual stream is said as such."""
    where = self.where(eqn)
    if 'Norm' in where or 'normalization.py' in where:
      return (f'a normalization over the channels (a LayerNorm of the residual stream at {where}): removing '
              'a channel changes the others\' outputs, so the stream is kept whole')
    return f'`{eqn.primitive.name}` over the channels at {where}'

  def gather(self, eqn, values) -> Optional[_Label]:
    """An embedding lookup ``table[ids]``: the table's feature axis produces a new channel space."""
    operand, _ = values
    if isinstance(operand, _Label):
      self.fail(eqn, 'indexing an activation by computed positions')
    table = self.kernel_of(eqn, operand)
    numbers = eqn.params['dimension_numbers']
    sizes, shape = eqn.params['slice_sizes'], eqn.invars[0].aval.shape
    kept = [a for a in range(len(shape)) if a not in numbers.collapsed_slice_dims]
    if getattr(numbers, 'operand_batching_dims', ()) or len(kept) != 1 or sizes[kept[0]] != shape[kept[0]]:
      self.fail(eqn, 'only embedding lookups (whole rows of a table) are followed')
    leaf_axis = table.axes[kept[0]]
    if leaf_axis is None:
      self.fail(eqn, 'its table is broadcast along the features')
    space = self.spaces.new(shape[kept[0]])
    self.record(space, table.key, leaf_axis, 'producer', shape[kept[0]])
    return _Label(numbers.offset_dims[0], space, 1, table.key[1][:-1])

  def shared_heads_reshape(self, eqn, label, view, old, new):
    """``reshape``, with the error of grouped or multi-query attention (``jnp.repeat`` of key/value heads)."""
    try:
      return self.reshape(eqn, label, view, old, new)
    except UntraceableError:
      if label is None or not label.broadcast:
        raise
      self.fail(eqn, 'it folds heads repeated along a new axis into the head axis: grouped or multi-query attention, '
                     'where several query heads share a key/value head, is not supported (give every query head its '
                     'own key and value head)')

  def concatenate_variables(self, eqn, values, shape_in):
    """A variable concatenated to an activation along another axis (a class token): a slice of its channels."""
    dim = eqn.params['dimension']
    present = [v for v in values if isinstance(v, _Label)]
    if not present or len({v.axis for v in present}) > 1 or present[0].axis == dim:
      self.fail(eqn, 'it concatenates variables with activations along their channels')
    first = present[0]
    for other in present[1:]:
      self.spaces.tie(other.space, first.space)
    for value, shape in zip(values, shape_in):
      for origin in value if isinstance(value, list) else ():
        leaf_axis = origin.axes[first.axis]
        if leaf_axis is None:
          self.fail(eqn, 'the concatenated variable is broadcast along the channels')
        self.record(first.space, origin.key, leaf_axis, 'bias', shape[first.axis])
    return dataclasses.replace(first, layer=())

  def slice_variable(self, eqn, view, shape):
    """A variable cut along an axis (a position table cut to the sequence): that axis maps to no leaf axis."""
    start, limit = eqn.params['start_indices'], eqn.params['limit_indices']
    strides = eqn.params.get('strides') or (1,) * len(shape)
    whole = [(s, l, st) == (0, n, 1) for s, l, st, n in zip(start, limit, strides, shape)]
    return self.map_view(view, lambda axes: tuple(a if w else None for a, w in zip(axes, whole)))


def _flat_keys(variables) -> list[tuple[str, tuple[str, ...]]]:
  keys = []
  for path, _ in jax.tree_util.tree_flatten_with_path(variables)[0]:
    names = tuple(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)
    keys.append((names[0], names[1:]))
  return keys


def trace(model, variables, x, *, rebuild=None, apply_kwargs: Optional[dict] = None) -> UnitMap:
  """The unit map of ``model`` (a Flax module), derived from ``model.apply``'s jaxpr.

  Args:
    model: a Flax module called as ``model.apply(variables, x, train=False)``.
    variables: its variables (arrays or ``jax.ShapeDtypeStruct``; e.g. from
      ``jax.eval_shape(model.init, ...)``); collections other than ``params``
      and ``batch_stats`` are not allowed.
    x: an example batch (array or ``ShapeDtypeStruct``) with channels last.
    rebuild: the rule ``rebuild(model, unit_map, sources) -> module`` that
      rebuilds the model with new widths
      (:data:`~dessilbi_jax.structure.unit_map.RebuildRule`); default: the
      zoo's rule for the zoo's models, none for others.
    apply_kwargs: keyword arguments of ``model.apply`` (default ``{'train': False}``,
      or none for a module whose ``__call__`` takes no ``train``, e.g. ``nn.Sequential``).

  Returns:
    A :class:`~dessilbi_jax.structure.unit_map.UnitMap`.

  Raises:
    UntraceableError: for an op whose channels cannot be followed (named, with its source line).
  """
  from dessilbi_jax.structure import zoo  # pylint: disable=g-import-not-at-top
  _check_linen(model)
  unknown = sorted(set(variables) - {'params', 'batch_stats'})
  if unknown:
    raise ValueError(f'trace handles the params and batch_stats collections; got also {unknown}.')
  closed, kwargs = _eval_jaxpr(model, variables, x, apply_kwargs)
  jaxpr = closed.jaxpr
  keys = _flat_keys(variables)
  # Batch norms (statistics) and LayerNorms (a scale): their bias is a norm slice too.
  normalized = {path[:-1] for collection, path in keys if collection == 'batch_stats' or path[-1:] == ('scale',)}
  interp = _Interpreter(normalized)
  x_shape = np.shape(x)
  leaves = [[_Origin(key, tuple(range(len(var.aval.shape))))] for key, var in zip(keys, jaxpr.invars)]
  if np.issubdtype(np.dtype(x.dtype), np.integer):  # token ids: no channels until an embedding looks them up
    outputs = interp.run(jaxpr, leaves + [None])
  else:
    input_space = interp.spaces.new(x_shape[-1])
    outputs = interp.run(jaxpr, leaves + [_Label(len(x_shape) - 1, input_space)])
    interp.spaces.fix(input_space, 'the network\'s input channels')
  for out in outputs:
    if isinstance(out, _Label):
      interp.spaces.fix(out.space, 'the network\'s outputs (the classifier\'s logits are never units)')
  unit_map = _groups(interp)
  rule = rebuild if rebuild is not None else zoo.rebuild_rule(model)
  unit_map = dataclasses.replace(unit_map, rebuild=rule, input_shape=tuple(x_shape[1:]),
                                 apply_kwargs=tuple(sorted(kwargs.items())))
  return zoo.annotate(model, unit_map)


_TRACEBACK_LIBRARIES = ('/jax/', '/jaxlib/', '/flax/', '/dessilbi_jax/', '/contextlib.py', '/functools.py')


def _error_user_line(error: BaseException) -> str:
  """The innermost frame of the traceback outside JAX, Flax and this library: the user's line."""
  frames = [f for f in traceback.extract_tb(error.__traceback__)
            if not any(part in f.filename.replace('\\', '/') for part in _TRACEBACK_LIBRARIES)]
  if not frames:
    return 'an unknown source line'
  frame = frames[-1]
  return f'{frame.filename}:{frame.lineno} ({frame.line})' if frame.line else f'{frame.filename}:{frame.lineno}'


def _check_linen(model) -> None:
  """An nnx module gets the bridge named: the unit map acts on a linen module's variables."""
  try:
    from flax import nnx  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  if isinstance(model, nnx.Module):
    raise ValueError(
        f'trace takes a linen module and its variables; {type(model).__name__} is an nnx module. Wrap its class: '
        f'model = flax.nnx.bridge.to_linen({type(model).__name__}, *constructor_args); '
        'variables = model.init(key, x); then trace, remove and save_compact as for linen.')


def _takes_no_train(model, error: TypeError) -> bool:
  return "'train'" in str(error) and 'keyword' in str(error)


def _eval_jaxpr(model, variables, x, apply_kwargs):
  """``(jaxpr of model.apply in eval mode, the keyword arguments used)``.

  Without ``apply_kwargs``: ``train=False``, or none where the module takes
  no ``train`` (``nn.Sequential`` passes it on to its first layer). Python
  control flow on an array's value cannot be traced: an :class:`UntraceableError`
  names the user's line.
  """
  candidates = [apply_kwargs] if apply_kwargs is not None else [{'train': False}, {}]
  for i, kwargs in enumerate(candidates):
    try:
      return jax.make_jaxpr(lambda v, inputs, kwargs=kwargs: model.apply(v, inputs, **kwargs))(variables, x), kwargs
    except (jax.errors.TracerBoolConversionError, jax.errors.ConcretizationTypeError,
            jax.errors.TracerIntegerConversionError) as e:
      raise UntraceableError(
          f'Cannot trace the model: Python control flow on an array\'s value at {_error_user_line(e)} '
          f'({type(e).__name__}). The unit map follows one computation for every input: use jnp.where / '
          'jax.lax.cond there, or a static (Python) value.') from None
    except TypeError as e:
      if i + 1 < len(candidates) and _takes_no_train(model, e):
        continue
      raise
  raise AssertionError('unreachable')


def _groups(interp: _Interpreter) -> UnitMap:
  spaces = interp.spaces
  by_root: dict[int, list] = {}
  order: list[int] = []
  roots_seen = set()
  for space in range(len(spaces.parent)):
    root, _ = spaces.find(space)
    if root not in roots_seen:
      roots_seen.add(root)
      order.append(root)
  for space, _, fields in interp.records:
    root, offset = spaces.find(space)
    by_root.setdefault(root, [])
    s = Slice(offset=int(offset - spaces.low[root]), **fields)
    if s not in by_root[root]:
      by_root[root].append(s)
  groups = []
  for root in order:
    slices = tuple(by_root.get(root, ()))
    producers = [s for s in slices if s.role == 'producer']
    name = '/'.join(producers[0].path[:-1]) if producers else 'input'
    reason = spaces.fixed[root]
    groups.append(UnitGroup(name=name, size=spaces.high[root] - spaces.low[root], slices=slices,
                            prunable=not reason, reason=reason, kind=spaces.kind[root]))
  return UnitMap(tuple(groups), positions=tuple(interp.positions))
