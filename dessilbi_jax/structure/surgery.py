"""Operations on a unit map: remove, zero, widen and gate whole units.

All of them take a network's ``variables`` (``{'params': ..., 'batch_stats':
...}``) and a :class:`~dessilbi_jax.structure.unit_map.UnitMap`:

* :func:`remove` slices every array of every group to the kept units (params,
  batch statistics and any optimizer state shaped like the params) and
  rebuilds the model with the new widths;
* :func:`zero` sets the same units to zero as a whole (kernel, bias,
  normalization scale and bias), so that the masked network computes what the
  removed one computes (``unit_masks`` gives the masks); a model without a
  rebuild rule (outside the zoo) comes back as a
  :class:`~dessilbi_jax.structure.resized.Resized` module;
* :func:`widen` appends units: new producer slices from the layer's
  initializer, new consumer slices zero (the function is unchanged), new
  normalization channels scale 1, bias 0, mean 0, var 1, new optimizer state 0
  (integer state such as ``entry_step``: -1), old values bit-identical;
* :func:`gate` multiplies a group's output by ``z``: after a conv + batch norm
  the norm's scale and bias, else the kernel and bias (differentiable in ``z``).

Keep-masks are per group name, boolean of the group's size; groups left out
are kept whole. :func:`resolve_keep` applies the rules: unprunable groups
(inputs, logits) are never cut, ``cut_streams=False`` keeps residual streams
whole, a residual block whose internal width falls to 0 becomes the identity
(all its internal groups emptied), any other layer keeps at least one unit
(with a warning), and ``round_to`` rounds each kept count up to a multiple.

Example::

  >>> import jax, jax.numpy as jnp, numpy as np
  >>> from dessilbi_jax import models, structure
  >>> model = models.get_model('mlp', 10, (4,), widths=(3,))
  >>> x = jnp.ones((2, 4))
  >>> variables = model.init(jax.random.key(0), x)
  >>> unit_map = structure.trace(model, variables, x)
  >>> keep = {'Dense_0': np.array([True, False, True])}
  >>> small, small_vars, _ = structure.remove(model, variables, unit_map, keep)
  >>> small.widths, small_vars['params']['Dense_1']['kernel'].shape
  ((2,), (2, 10))
  >>> masked = structure.zero(variables, unit_map, keep)
  >>> bool(jnp.allclose(small.apply(small_vars, x), model.apply(masked, x), rtol=1e-5))
  True
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dessilbi_jax.core import grouping
from dessilbi_jax.structure import folding
from dessilbi_jax.structure import resized
from dessilbi_jax.structure.unit_map import Slice, UnitGroup, UnitMap, new_extent

Keep = Mapping[str, Any]


# -- keep-masks --------------------------------------------------------------

def _named_group(unit_map: UnitMap, name: str, what: str) -> UnitGroup:
  """The group ``name`` of the map; ValueError naming ``what`` (the argument) and the map's groups if none."""
  if name not in unit_map.names:
    raise ValueError(f'{what} names unit group {name!r}, which this unit map does not have; its groups are: '
                     f'{", ".join(unit_map.names)}.')
  return unit_map[name]


def _check_mask(unit_map: UnitMap, name: str, mask, what: str = 'keep') -> np.ndarray:
  group = _named_group(unit_map, name, what)
  array = np.asarray(mask)
  if array.shape != (group.size,):
    raise ValueError(f'{what}[{name!r}] has shape {array.shape}; group {name!r} has {group.size} units: pass '
                     f'a boolean mask of shape ({group.size},).')
  if array.dtype != bool:
    if not np.all(np.isin(array, (0, 1))):
      raise ValueError(f'{what}[{name!r}] must be a boolean mask (True: keep the unit); got values other '
                       'than 0 and 1.')
    array = array.astype(bool)
  return array


def resolve_keep(unit_map: UnitMap, keep: Keep, *, cut_streams: bool = True, round_to: int = 1
                 ) -> dict[str, np.ndarray]:
  """The keep-mask of every group after the rules of the module docstring."""
  if not isinstance(keep, Mapping):
    raise ValueError(f'keep must be a mapping {{group name: boolean mask}}; got {type(keep).__name__}.')
  if not isinstance(round_to, (int, np.integer)) or round_to < 1:
    raise ValueError(f'round_to must be a positive integer; got {round_to!r}.')
  masks = {name: _check_mask(unit_map, name, mask) for name, mask in keep.items()}
  resolved = {}
  for group in unit_map.groups:
    mask = masks.get(group.name, np.ones(group.size, bool)).copy()
    if not group.prunable:
      if not mask.all():
        raise ValueError(f'Unit group {group.name!r} cannot lose units: {group.reason}.')
    elif group.is_stream and not cut_streams:
      mask[:] = True
    resolved[group.name] = mask
  blocks: dict[str, list[UnitGroup]] = {}
  for group in unit_map.groups:
    if group.block is not None:
      blocks.setdefault(group.block, []).append(group)
  for members in blocks.values():
    if any(not resolved[g.name].any() for g in members):
      for g in members:
        resolved[g.name][:] = False  # the block becomes the identity
  for group in unit_map.prunable():
    mask = resolved[group.name]
    if group.block is None and group.size and not mask.any():  # a width-0 layer stays empty
      warnings.warn(f'Unit group {group.name!r} would lose all its {group.size} units; keeping its first unit '
                    '(only a residual block can vanish).', stacklevel=3)
      mask[0] = True
    if group.block is None:
      # A stream's stages are ranges of it (option-A offsets): each keeps a channel.
      for s in group.producers:
        if s.size and not mask[s.offset:s.offset + s.size].any():
          warnings.warn(f'Unit group {group.name!r} would leave {"/".join(s.path[:-1])} no channel; keeping '
                        f'its first.', stacklevel=3)
          mask[s.offset] = True
    short = -int(mask.sum()) % round_to
    if mask.any() and short:
      mask[np.flatnonzero(~mask)[:short]] = True
  return resolved


def _dead_layers(unit_map: UnitMap, keep: Mapping[str, np.ndarray]) -> set[tuple[str, ...]]:
  """Modules whose every input unit is gone: their outputs are constants, removed with them."""
  dead = set()
  for group in unit_map.groups:
    if group.size and not keep[group.name].any():
      dead.update(s.path[:-1] for s in group.slices if s.role == 'consumer')
  return dead


def _leaf_plan(unit_map: UnitMap, sources: Mapping[str, np.ndarray]
               ) -> dict[tuple[str, tuple[str, ...]], dict[int, tuple[np.ndarray, Slice]]]:
  """Per leaf and cut axis: per new index, the old index (-1: a new entry), and one slice there."""
  plan: dict = {}
  for group in unit_map.groups:
    for s in group.slices:
      new_offset, channels = new_extent(s.offset, s.size, group.size, sources[group.name])
      del new_offset
      p = np.arange(s.repeat)[:, None]
      index = np.where(channels[None, :] >= 0, p * s.size + channels[None, :], -1).reshape(-1)
      plan.setdefault(s.key, {})[s.axis] = (index, s)
  return plan


def _regather(leaf, cuts: Mapping[int, np.ndarray], reference_shape, fill=None):
  """``leaf`` with each cut axis re-indexed (-1: taken from ``fill``); broadcast (size-1) axes kept.

  Concrete arrays are gathered in NumPy (one host copy, no compilation per shape); traced ones in jnp.
  """
  xp = jnp if isinstance(leaf, jax.core.Tracer) else np
  out = xp.asarray(leaf)
  new_entry = None
  for axis, index in cuts.items():
    if out.ndim != len(reference_shape):
      raise ValueError(f'A state leaf of shape {out.shape} does not broadcast against its parameter of shape '
                       f'{tuple(reference_shape)}.')
    if out.shape[axis] == 1 and reference_shape[axis] != 1:
      continue  # per-group state along another axis (entry_step of a filter kernel: (1, 1, 1, O))
    out = xp.take(out, np.maximum(index, 0), axis=axis)
    if (index < 0).any():
      shape = [1] * out.ndim
      shape[axis] = len(index)
      new = (index < 0).reshape(shape)
      new_entry = new if new_entry is None else (new_entry | new)
  if new_entry is not None:
    out = xp.where(new_entry, xp.asarray(fill), out).astype(out.dtype)
  return jnp.asarray(out)


def _paths(tree) -> dict[tuple[str, ...], Any]:
  return {tuple(str(getattr(k, 'key', k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=grouping.is_placeholder)[0]}


def _unflatten_like(template, values: Mapping[tuple[str, ...], Any]):
  paths = [tuple(str(getattr(k, 'key', k)) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(template)[0]]
  return jax.tree.unflatten(jax.tree.structure(template), [values[p] for p in paths])


def _rebuilt(model, unit_map: UnitMap, sources, what: str):
  if unit_map.rebuild is None:
    raise ValueError(f'{what} needs a unit map that can rebuild its model: pass trace(..., rebuild=rule) for a '
                     'model outside the zoo (rule(model, unit_map, sources) -> flax module).')
  if not unit_map.input_shape:
    raise ValueError(f'{what} needs the unit map\'s input_shape (one example\'s shape).')
  model = unit_map.rebuild(model, unit_map, sources)
  x = jax.ShapeDtypeStruct((1, *unit_map.input_shape), jnp.float32)
  return model, x


def _sliced(variables, plan):
  """Every leaf of ``variables`` re-indexed along the axes ``plan`` cuts."""
  out = {}
  for collection in variables:
    values = {}
    for path, leaf in _paths(variables[collection]).items():
      cuts = {axis: index for axis, (index, _) in plan.get((collection, path), {}).items()}
      values[path] = _regather(leaf, cuts, np.shape(leaf)) if cuts else leaf
    out[collection] = _unflatten_like(variables[collection], values)
  return out


def _resized(model, variables, unit_map: UnitMap, plan):
  """The model without a rebuild rule: the same module on the sliced arrays (:mod:`.resized`)."""
  if not unit_map.input_shape:
    raise ValueError('remove needs the unit map\'s input_shape (one example\'s shape).')
  kwargs = unit_map.eval_kwargs
  new_model = resized.Resized(model, lambda v: _sliced(dict(v), plan), kwargs)
  new_vars = _sliced(dict(variables), plan)
  x = jax.ShapeDtypeStruct((1, *unit_map.input_shape), jnp.float32)
  try:
    jax.eval_shape(lambda v, inputs: new_model.apply(v, inputs, **kwargs), new_vars, x)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f'remove: {type(model).__name__} does not run on its narrower arrays ({type(e).__name__}: '
        f'{str(e).splitlines()[0][:300]}); its code fixes a width the unit map cuts. Pass '
        'trace(..., rebuild=rule) (rule(model, unit_map, sources) -> flax module), or mark that group '
        'unprunable with UnitMap.replace(name, prunable=False).') from None
  return new_model, new_vars


def _new_variables(variables, template, plan, fills=None, what='remove'):
  """The template's leaves gathered from ``variables`` by ``plan`` (new entries from ``fills``)."""
  old = {(c, p): leaf for c in variables for p, leaf in _paths(variables[c]).items()}
  fill_leaves = {} if fills is None else {(c, p): leaf for c in fills for p, leaf in _paths(fills[c]).items()}
  out = {}
  for collection in template:
    values = {}
    for path, target in _paths(template[collection]).items():
      key = (collection, path)
      if key not in old:
        raise ValueError(f'The rebuilt model has {collection}/{"/".join(path)}, which the variables lack; the '
                         'rebuild rule and the unit map disagree.')
      cuts = {axis: index for axis, (index, _) in plan.get(key, {}).items()}
      leaf = _regather(old[key], cuts, np.shape(old[key]), fill_leaves.get(key))
      if tuple(leaf.shape) != tuple(target.shape):
        raise ValueError(
            f'{what}: {collection}/{"/".join(path)} comes out with shape {tuple(leaf.shape)} but the rebuilt model '
            f'has {tuple(target.shape)}: the unit map misses a slice of this leaf (declare it, or correct the '
            'traced map).')
      values[path] = leaf
    out[collection] = _unflatten_like(template[collection], values)
  return out


def _map_state(opt_state, old_params, new_params, fn):
  """Applies ``fn(state_leaf, path)`` to every optimizer-state subtree shaped like the params."""
  treedef = jax.tree.structure(old_params)

  def params_like(node) -> bool:
    return isinstance(node, Mapping) and jax.tree.structure(node, is_leaf=grouping.is_placeholder) == treedef

  def walk(node):
    if params_like(node):
      leaves = _paths(node)
      return _unflatten_like(new_params, {p: None if grouping.is_placeholder(leaves[p]) else fn(leaves[p], p)
                                          for p in _paths(new_params)})
    if isinstance(node, tuple) and hasattr(node, '_fields'):
      return type(node)(*(walk(c) for c in node))
    if isinstance(node, (tuple, list)):
      return type(node)(walk(c) for c in node)
    if isinstance(node, Mapping):
      return type(node)({k: walk(v) for k, v in node.items()})
    return node

  return walk(opt_state)


def _regathered_state(opt_state, variables, new_vars, plan, fill=None):
  """``opt_state`` with every params-shaped (or per-group) leaf regathered like the params by ``plan``.

  ``fill(leaf)`` gives the value of new entries (widening); removal has none.
  """
  old_params = _paths(variables['params'])

  def regather(leaf, path):
    if np.ndim(leaf) == 0:
      return leaf
    cuts = {axis: index for axis, (index, _) in plan.get(('params', path), {}).items()}
    return _regather(leaf, cuts, np.shape(old_params[path]), None if fill is None else fill(leaf))

  return _map_state(opt_state, variables['params'], new_vars['params'], regather)


def _sources_of(unit_map: UnitMap, keep: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {g.name: np.flatnonzero(keep[g.name]) for g in unit_map.groups}


# -- operations --------------------------------------------------------------

def remove(model, variables, unit_map: UnitMap, keep: Keep, opt_state=None, *, cut_streams: bool = True,
           round_to: int = 1):
  """The narrower network: ``(model, variables, opt_state)`` with only the kept units.

  Args:
    model: the Flax module the map was traced from.
    variables: its variables.
    unit_map: its :class:`UnitMap`.
    keep: ``{group name: boolean mask of the group's size}`` (left-out groups kept).
    opt_state: optionally, an optax state; every subtree shaped like the
      params (momentum, ``Z``, ``Γ``, Adam's moments) is sliced like them,
      per-group leaves (``entry_step``, ``gamma_scale``) along their group
      axis, scalars and ``None`` kept.
    cut_streams: cut residual streams (a stream channel stays while any tensor
      summed into it keeps it); ``False`` never cuts them.
    round_to: round each layer's kept count up to a multiple (e.g. 8).

  Returns:
    ``(model, variables, opt_state)`` of the removed network (``opt_state``
    ``None`` when none was given).
  """
  resolved = resolve_keep(unit_map, keep, cut_streams=cut_streams, round_to=round_to)
  sources = _sources_of(unit_map, resolved)
  plan = _leaf_plan(unit_map, sources)
  if unit_map.input_shape and any(not m.all() for m in resolved.values()):
    # What the removed units still emit (sigmoid(0), softplus(0), ...) moves into their readers' biases.
    masked = jax.tree.map(_masked, variables, unit_masks(variables, unit_map, resolved))
    variables = folding.fold(model, variables, masked, unit_map, resolved, _dead_layers(unit_map, resolved))
  if unit_map.rebuild is None:
    new_model, new_vars = _resized(model, variables, unit_map, plan)
  else:
    new_model, x = _rebuilt(model, unit_map, sources, 'remove')
    template = jax.eval_shape(new_model.init, jax.random.key(0), x)
    new_vars = _new_variables(variables, template, plan)
  new_state = None if opt_state is None else _regathered_state(opt_state, variables, new_vars, plan)
  return new_model, new_vars, new_state


def unit_masks(variables, unit_map: UnitMap, keep: Keep, *, cut_streams: bool = True, round_to: int = 1,
               inputs: bool = False):
  """0/1 masks with the variables' structure that zero the removed units as a whole.

  Producer kernels, biases and normalization scale and bias of removed units
  are 0, and so are the biases and norms of layers all of whose inputs are
  removed (an emptied residual block's last conv); batch statistics are 1.
  Consumer kernels are 1, unless ``inputs``: then the entries that read a
  removed unit are 0 too, so that every weight of the removed network is
  exactly one weight of the masked one (a masked retrain, a DessiLBI step on
  the masked network, equal those on the removed network).
  """
  resolved = resolve_keep(unit_map, keep, cut_streams=cut_streams, round_to=round_to)
  dead = _dead_layers(unit_map, resolved)
  factors: dict = {}
  for group in unit_map.groups:
    for s in group.slices:
      if s.collection != 'params' or (s.role == 'consumer' and not inputs):
        continue
      channels = s.channels(resolved[group.name]).astype(np.float32)
      if s.role != 'producer' and s.layer in dead:
        channels = np.zeros_like(channels)
      factors.setdefault(s.key, []).append((s.axis, np.tile(channels, s.repeat)))

  def mask_of(collection):
    def fn(path, leaf):
      key = (collection, tuple(str(getattr(k, 'key', k)) for k in path))
      m = np.ones(np.shape(leaf), np.float32)
      for axis, f in factors.get(key, ()):
        shape = [1] * m.ndim
        shape[axis] = len(f)
        m = m * f.reshape(shape)
      return m
    return fn

  return {c: jax.tree_util.tree_map_with_path(mask_of(c), variables[c]) for c in variables}


def zero(variables, unit_map: UnitMap, keep: Keep, *, cut_streams: bool = True, round_to: int = 1):
  """``variables`` with the removed units zeroed as a whole (see :func:`unit_masks`)."""
  masks = unit_masks(variables, unit_map, keep, cut_streams=cut_streams, round_to=round_to)
  return jax.tree.map(_masked, variables, masks)


def _masked(value, mask: np.ndarray):
  if mask.all():
    return value
  if isinstance(value, jax.core.Tracer):
    return jnp.where(mask > 0, value, jnp.zeros_like(value))
  value = np.asarray(value)
  return jnp.asarray(np.where(mask > 0, value, np.zeros_like(value)))


def widen(model, variables, unit_map: UnitMap, new_units: Mapping[str, int], key: jax.Array, opt_state=None,
          *, fan_out: str = 'zero'):
  """The wider network: ``new_units[name]`` units appended to each named group.

  New producer entries come from the rebuilt model's initializer (``key``),
  new consumer entries are zero, so the logits are unchanged; old values are
  kept to the bit. New optimizer-state entries are 0 (integer leaves such as
  ``entry_step``: -1, never entered). ``fan_out='fresh'`` initializes the new
  consumer entries too (the official growth code's behaviour: the function changes).

  Returns:
    ``(model, variables, opt_state)`` of the widened network.
  """
  if fan_out not in ('zero', 'fresh'):
    raise ValueError(f"widen: fan_out must be 'zero' (the function is unchanged) or 'fresh'; got {fan_out!r}.")
  for name, n in new_units.items():
    group = _named_group(unit_map, name, 'new_units')
    if not group.prunable:
      raise ValueError(f'Unit group {name!r} cannot gain units: {group.reason}.')
    if not isinstance(n, (int, np.integer)) or n < 0:
      raise ValueError(f'new_units[{name!r}] must be a non-negative integer; got {n!r}.')
  sources = {g.name: np.concatenate([np.arange(g.size), -np.ones(new_units.get(g.name, 0), np.int64)])
             for g in unit_map.groups}
  new_model, x = _rebuilt(model, unit_map, sources, 'widen')
  fresh = jax.jit(new_model.init)(key, jnp.zeros(x.shape, x.dtype))
  plan = _leaf_plan(unit_map, sources)
  fills = {}
  for collection in fresh:
    def fill(path, leaf, collection=collection):
      names = tuple(str(getattr(k, 'key', k)) for k in path)
      for axis, (index, s) in plan.get((collection, names), {}).items():
        if s.role == 'consumer' and fan_out == 'zero':  # new inputs read nothing yet: the function is unchanged
          shape = [1] * leaf.ndim
          shape[axis] = len(index)
          leaf = jnp.where((index < 0).reshape(shape), jnp.zeros_like(leaf), leaf)
      return leaf
    fills[collection] = jax.tree_util.tree_map_with_path(fill, fresh[collection])
  new_vars = _new_variables(variables, fresh, plan, fills, what='widen')
  # New units' state: 0 (Z, Γ, momentum, moments); integer leaves -1 (entry_step: never entered).
  fill = lambda leaf: jnp.asarray(-1 if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.integer) else 0,
                                  jnp.asarray(leaf).dtype)
  new_state = None if opt_state is None else _regathered_state(opt_state, variables, new_vars, plan, fill)
  return new_model, new_vars, new_state


def gate(variables, unit_map: UnitMap, z: Mapping[str, jax.Array]):
  """``variables`` with each named group's output multiplied by ``z[name]`` (shape ``(size,)``).

  After a conv + batch norm the norm's scale and bias are scaled (exactly
  ``z·BN(x)``); without a norm, the producer kernel and its bias; for an
  attention head, the output projection's input slice (exactly ``z·head(x)``). ``z`` may be
  traced: the result is differentiable in it. For ReLU networks and ``z >= 0``,
  ``z = 0`` / ``1`` is :func:`zero` / the identity on a unit.
  """
  factors: dict = {}
  for name, values in z.items():
    group = _named_group(unit_map, name, 'z')
    values = jnp.asarray(values)
    if values.shape != (group.size,):
      raise ValueError(f'z[{name!r}] has shape {values.shape}; group {name!r} has {group.size} units.')
    # A norm after a concatenation (no single producer) scales the combined tensor once.
    combined = [s for s in group.slices if s.role == 'norm' and s.collection == 'params' and not s.layer]
    scaled = list(combined)
    if group.kind == 'head':
      # A head's output enters the output projection linearly: scaling its input rows is exactly z·head.
      scaled += [s for s in group.slices if s.role == 'consumer' and s.collection == 'params']
    for producer in group.producers if group.kind != 'head' else ():
      layer = producer.path[:-1]
      after = [s for s in group.slices if s.layer == layer and s.collection == 'params' and s.role != 'producer']
      norms = [s for s in after if s.role == 'norm']
      if norms:
        scaled += norms
      elif not combined:
        scaled += [producer] + after
    for s in scaled:
      factors.setdefault(s.key, []).append((s.axis, jnp.tile(values[s.offset:s.offset + s.size], s.repeat)))

  def scale(path, leaf):
    key = ('params', tuple(str(getattr(k, 'key', k)) for k in path))
    for axis, f in factors.get(key, ()):
      shape = [1] * leaf.ndim
      shape[axis] = f.shape[0]
      leaf = leaf * f.reshape(shape).astype(leaf.dtype)
    return leaf

  out = dict(variables)
  out['params'] = jax.tree_util.tree_map_with_path(scale, variables['params'])
  return out
