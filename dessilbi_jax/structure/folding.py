"""What removed units still emit: folded into their readers' biases, so that removal stays exact.

A zeroed unit (:func:`~dessilbi_jax.structure.zero`: kernel, bias, norm scale
and bias 0) emits ``f(0)`` into the layers that read it; a removed one emits
nothing. For ReLU, GELU, tanh, ELU and batch norm ``f(0) = 0``; for sigmoid,
softplus or ``relu(conv(x) + 1)`` it is a constant ``c_u``. A dense reader
``y = x W + b`` then sees ``Σ_u c_u W[u, :]`` from the removed units, a
constant that removal moves into ``b``; where no bias follows the reader but a
batch norm does, into the norm's running mean (``BN(y + k) = BN'(y)`` with
``μ' = μ - k``). A convolution reads a constant exactly so only without
padding (a zero-padded border sees less of it).

:func:`fold` finds those constants by running the masked network once on
random inputs (the jaxpr evaluated op by op, each reader's input recorded)
and returns the variables with them folded. Where a constant cannot be folded
(a padded convolution, a reader with neither bias nor norm, a value that is
not constant) it raises :class:`InexactRemovalError` naming the op that makes
it non-zero and its source line: never a silent difference.

Example::

  >>> import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
  >>> from dessilbi_jax import structure
  >>> sigmoid_mlp = nn.Sequential([nn.Dense(4), nn.sigmoid, nn.Dense(2)])
  >>> x = jnp.ones((3, 5))
  >>> variables = sigmoid_mlp.init(jax.random.key(0), x)
  >>> unit_map = structure.trace(sigmoid_mlp, variables, x)
  >>> keep = {'layers_0': np.array([True, False, True, True])}
  >>> small, small_vars, _ = structure.remove(sigmoid_mlp, variables, unit_map, keep)
  >>> masked = structure.zero(variables, unit_map, keep)
  >>> bool(jnp.allclose(small.apply(small_vars, x), sigmoid_mlp.apply(masked, x), atol=1e-6))
  True
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from dessilbi_jax.structure import trace as trace_lib
from dessilbi_jax.structure.unit_map import UnitMap


class InexactRemovalError(ValueError):
  """Removed units emit a constant into a layer where it cannot be folded: removal would change the function."""


_SHAPE_ONLY = {'convert_element_type', 'copy', 'copy_p'}


def _sub_jaxpr(eqn, n_values: int):
  for param in trace_lib._CALL_PARAMS:  # pylint: disable=protected-access
    sub = eqn.params.get(param)
    if sub is not None:
      inner = sub.jaxpr if hasattr(sub, 'jaxpr') else sub
      consts = list(getattr(sub, 'consts', ()))
      if len(inner.invars) == n_values:
        return inner, consts
  return None


class _Run:
  """Evaluates a jaxpr op by op, recording each kernel-reading op's operands and every value's origin."""

  def __init__(self):
    self.sites: list = []       # (eqn, operand values, kernel leaf key, kernel operand index, call stack)
    self.made_by: dict = {}     # var -> (eqn, call stack) that defined it
    self.links: dict = {}       # an outer var -> the inner var it is (across call boundaries)
    self.stack: list = []

  def run(self, jaxpr, consts, args, origins):
    env, origin = {}, {}
    read = lambda v: v.val if isinstance(v, jex_core.Literal) else env[v]
    for v, a in zip(jaxpr.constvars, consts):
      env[v] = a
    for v, a, o in zip(jaxpr.invars, args, origins):
      env[v], origin[v] = a, o
    for eqn in jaxpr.eqns:
      values = [read(v) for v in eqn.invars]
      value_origins = [None if isinstance(v, jex_core.Literal) else origin.get(v) for v in eqn.invars]
      sub = _sub_jaxpr(eqn, len(values))
      if sub is not None:
        inner, inner_consts = sub
        for outer, inner_in in zip(eqn.invars, inner.invars):
          self.links[inner_in] = outer
        self.stack.append(eqn)
        try:
          outs = self.run(inner, inner_consts, values, value_origins)
        finally:
          self.stack.pop()
        for outer, inner_out in zip(eqn.outvars, inner.outvars):
          self.links[outer] = inner_out
          if not isinstance(inner_out, jex_core.Literal):
            origin[outer] = self._inner_origin.get(inner_out)
      else:
        outs = eqn.primitive.bind(*values, **eqn.params)
        outs = outs if eqn.primitive.multiple_results else [outs]
        if eqn.primitive.name in _SHAPE_ONLY and value_origins[0] is not None:
          origin[eqn.outvars[0]] = value_origins[0]
        if eqn.primitive.name in ('conv_general_dilated', 'dot_general'):
          kernels = [i for i, o in enumerate(value_origins) if o is not None]
          if len(kernels) == 1:
            self.sites.append((eqn, values, value_origins[kernels[0]], kernels[0], tuple(self.stack)))
      for v, o in zip(eqn.outvars, outs):
        env[v] = o
        self.made_by[v] = (eqn, tuple(self.stack))
    self._inner_origin = origin
    return [read(v) for v in jaxpr.outvars]

  _inner_origin: dict = {}

  def culprit(self, var) -> str:
    """The op on the way back from ``var`` that maps 0 to a non-zero value, with its source line."""
    named = None
    for _ in range(200):
      while var in self.links and var not in self.made_by:
        var = self.links[var]
      if var not in self.made_by:
        break
      eqn, stack = self.made_by[var]
      if var in self.links:  # a call's output: go inside, remember its name
        named = named or (eqn, stack)
        var = self.links[var]
        continue
      name = eqn.primitive.name
      if name in ('conv_general_dilated', 'dot_general'):
        break
      if _nonzero_at_zero(eqn):
        return _describe(eqn, stack)
      floats = [v for v in eqn.invars if not isinstance(v, jex_core.Literal)
                and jnp.issubdtype(v.aval.dtype, jnp.floating) and v.aval.shape == eqn.outvars[0].aval.shape]
      if not floats:
        break
      var = floats[0]
    if named is not None:
      return _describe(*named)
    return 'an op after the removed units'


def _nonzero_at_zero(eqn) -> bool:
  """Whether an elementwise op sends a zero activation to a non-zero value (its other operands as given)."""
  if len(eqn.outvars) != 1 or eqn.primitive.multiple_results:
    return False
  if eqn.primitive.name not in trace_lib._UNARY | trace_lib._BINARY:  # pylint: disable=protected-access
    return False
  args = []
  for v in eqn.invars:
    if isinstance(v, jex_core.Literal):
      args.append(v.val)
    elif jnp.issubdtype(v.aval.dtype, jnp.floating) and not args:
      args.append(jnp.zeros((), v.aval.dtype))
    else:
      return False  # another activation or a variable: not this op alone
  try:
    return bool(jnp.any(eqn.primitive.bind(*args, **eqn.params) != 0))
  except Exception:  # pylint: disable=broad-except
    return False


def _describe(eqn, stack) -> str:
  name = eqn.params.get('name') if eqn.primitive.name in ('pjit', 'jit', 'custom_jvp_call') else None
  label = f'`{name}`' if name else f'`{eqn.primitive.name}`'
  for candidate in (eqn, *stack[::-1]):
    line = trace_lib._summary(candidate)  # pylint: disable=protected-access
    if line:
      return f'{label} at {line}'
  return label


def _axes(eqn, kernel_index: int):
  """``(activation operand, its channel axis, kernel's input axis, kernel's output axis, padded)``."""
  if eqn.primitive.name == 'conv_general_dilated':
    lhs_spec, rhs_spec, _ = eqn.params['dimension_numbers']
    padded = any(p != (0, 0) for p in eqn.params['padding']) or eqn.params.get('lhs_dilation') not in (
        None, (1,) * len(lhs_spec[2:]))
    if eqn.params['feature_group_count'] != 1:
      return None
    return 0, lhs_spec[1], rhs_spec[1], rhs_spec[0], padded
  (lhs_c, rhs_c), _ = eqn.params['dimension_numbers']
  act_c, kernel_c = (lhs_c, rhs_c) if kernel_index == 1 else (rhs_c, lhs_c)
  ndim = len(eqn.invars[kernel_index].aval.shape)
  free = [a for a in range(ndim) if a not in kernel_c]
  if len(act_c) != 1 or len(free) != 1:
    return None
  return 1 - kernel_index, act_c[0], kernel_c[0], free[0], False


def fold(model, variables, masked, unit_map: UnitMap, keep, dead_layers) -> dict[str, Any]:
  """``variables`` with the constants the removed units emit (in ``masked``) folded into their readers.

  Args:
    model: the traced module; ``variables`` its variables; ``masked`` the same
      with the removed units zeroed (:func:`~dessilbi_jax.structure.zero`).
    unit_map: its map; ``keep``: the resolved keep-mask of every group.
    dead_layers: the modules removed whole (an emptied block's layers).

  Raises:
    InexactRemovalError: a constant that cannot be folded (named, with its op and source line).
  """
  removed = {g.name: ~keep[g.name] for g in unit_map.groups if g.size and not keep[g.name].all()}
  if not removed:
    return variables
  readers = {}
  for group in unit_map.groups:
    if group.name in removed:
      for s in group.slices:
        if s.role == 'consumer' and s.collection == 'params':
          channels = np.flatnonzero(s.channels(removed[group.name]))
          if channels.size:
            readers.setdefault((s.path, s.axis), []).append((group, s.indices(channels)))
  if not readers:
    return variables
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, *unit_map.input_shape)), jnp.float32)
  closed, _ = trace_lib._eval_jaxpr(model, masked, x, unit_map.eval_kwargs)  # pylint: disable=protected-access
  keys = trace_lib._flat_keys(masked)  # pylint: disable=protected-access
  leaves = jax.tree.leaves(masked)
  run = _Run()
  run.run(closed.jaxpr, closed.consts, leaves + [x], [key for key in keys] + [None])
  folds: dict = {}
  for eqn, values, key, kernel_index, stack in run.sites:
    collection, path = key
    axes = _axes(eqn, kernel_index)
    for group, index in (readers.get((path, axes[2]), ()) if axes else ()):
      act, act_axis, in_axis, out_axis, padded = axes
      taken = np.moveaxis(np.asarray(jnp.take(values[act], jnp.asarray(index), axis=act_axis)), act_axis, 0)
      flat = taken.reshape(len(index), -1)
      constant = flat[:, 0]
      scale = max(1.0, float(np.max(np.abs(np.asarray(values[act])))))
      if np.max(np.abs(flat)) <= 1e-7 * scale:
        continue
      where = run.culprit(eqn.invars[act])
      layer = '/'.join(path[:-1])
      if np.max(np.abs(flat - constant[:, None])) > 1e-6 * scale:
        raise InexactRemovalError(
            f'The removed units of {group.name!r} emit a value that varies with the input into {layer} (made '
            f'non-zero by {where}): removing them would change the logits. Keep them (keep[{group.name!r}]) '
            'or mark the group unprunable (UnitMap.replace).')
      if padded or path[:-1] in dead_layers:
        why = 'a zero-padded convolution' if padded else 'a layer removed whole'
        raise InexactRemovalError(
            f'The removed units of {group.name!r} emit the constant {float(constant[np.argmax(np.abs(constant))]):.4g}'
            f' (made non-zero by {where}) into {layer}, {why}, where it cannot be folded into a bias: removing '
            f'them would change the logits. Keep them (keep[{group.name!r}]) or mark the group unprunable.')
      kernel = np.asarray(values[kernel_index])
      rows = np.take(kernel, index, axis=in_axis)
      shape = [1] * rows.ndim
      shape[in_axis] = len(index)
      contribution = (rows * constant.reshape(shape)).sum(axis=tuple(a for a in range(rows.ndim) if a != out_axis))
      folds.setdefault(path, []).append((contribution, group, where, id(eqn)))
  return _add_folds(variables, unit_map, folds)


def _add_folds(variables, unit_map: UnitMap, folds) -> dict[str, Any]:
  if not folds:
    return variables
  names = lambda path: tuple(str(getattr(k, 'key', k)) for k in path)
  flat = {(c, names(p)): np.asarray(leaf) for c in variables
          for p, leaf in jax.tree_util.tree_flatten_with_path(variables[c])[0]}
  for kernel, entries in folds.items():
    layer = kernel[:-1]
    if len({e[3] for e in entries}) > 1:
      raise InexactRemovalError(f'{"/".join(layer)} is applied more than once to removed units that emit a '
                                'constant: no single bias can absorb it. Keep those units.')
    total = sum(e[0] for e in entries)
    after = [s for g in unit_map.groups for s in g.slices
             if s.layer == layer and s.role in ('bias', 'norm') and s.size]
    bias = [s for s in after if s.role == 'bias' and s.collection == 'params']
    mean = [s for s in after if s.collection == 'batch_stats' and s.path[-1] == 'mean']
    if bias:
      target, sign = bias[0], 1.0
    elif mean:
      target, sign = mean[0], -1.0
    else:
      raise InexactRemovalError(
          f'The removed units of {entries[0][1].name!r} emit a constant (made non-zero by {entries[0][2]}) into '
          f'{"/".join(layer)}, which has no bias or batch norm right after it to absorb it: removing them would '
          f'change the logits. Keep them, or give {"/".join(layer)} a bias.')
    leaf = flat[target.key].copy()
    if leaf.ndim != 1 or leaf.shape[0] != total.shape[0]:
      raise InexactRemovalError(f'{"/".join(target.path)} does not match {"/".join(layer)}\'s outputs; cannot fold '
                                'the removed units\' constant into it.')
    flat[target.key] = (leaf + sign * total).astype(leaf.dtype)
  return {c: jax.tree_util.tree_map_with_path(lambda p, leaf, c=c: jnp.asarray(flat[(c, names(p))]), variables[c])
          for c in variables}
