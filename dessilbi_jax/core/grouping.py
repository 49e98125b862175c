"""The grouping rule: which structure (group kind) each parameter leaf carries.

A group kind names the axes one group of weights spans; the remaining axis
indexes the groups (Flax layouts):

============  ==================  ===================  ==========================
kind          leaf                axes one group spans  a zero group removes
============  ==================  ===================  ==========================
``lasso``     any                 none (elementwise)    one weight
``filter``    conv (…, I, O)      all but the last      one output filter
``neuron``    dense (I, O)        I                     one output unit
``input``     dense (I, O)        O                     one input feature
``head``      attention (D, H, K) D, K                  one attention head
``None``      any                 –                     nothing: no Γ, no Z
============  ==================  ===================  ==========================

The default rule reproduces the reference implementation: conv kernels
(``ndim >= 3``) -> ``filter``, 2-D kernels -> ``lasso``, 1-D and scalar leaves
(biases, normalization scales) -> ``None``.

``groups`` may be

* ``None``: the default rule;
* a callable ``(path, leaf) -> kind | None``, ``path`` being the leaf's
  ``'/'``-joined key path such as ``'Conv_0/kernel'``;
* a pytree of kinds with the params' structure;
* a mapping ``{pattern: kind}``: the first pattern (``re.search`` on the path)
  that matches a leaf gives its kind; leaves no pattern matches follow the
  default rule (end with ``'.*': None`` to switch them off). A pattern that
  matches no leaf is an error: it is almost always a typo.

Example::

  >>> import jax.numpy as jnp
  >>> from dessilbi_jax.core import grouping
  >>> params = {'Conv_0': {'kernel': jnp.zeros((3, 3, 1, 8)), 'bias': jnp.zeros(8)},
  ...           'Dense_0': {'kernel': jnp.zeros((8, 10))}}
  >>> grouping.resolve_kinds(params, {'Dense_0/kernel': 'neuron'})
  {'Conv_0': {'bias': None, 'kernel': 'filter'}, 'Dense_0': {'kernel': 'neuron'}}
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any, Optional, Union

import jax
import numpy as np
import optax

KINDS = ('lasso', 'filter', 'neuron', 'input', 'head')

GroupKind = Optional[str]
GroupsRule = Union[None, Callable[[str, Any], GroupKind], Mapping[str, GroupKind], Any]

# The ranks each kind fits, and the axes one group spans for a leaf of rank ndim.
_FITS = {
    'lasso': lambda ndim: ndim >= 1,
    'filter': lambda ndim: ndim >= 3,
    'neuron': lambda ndim: ndim == 2,
    'input': lambda ndim: ndim == 2,
    'head': lambda ndim: ndim == 3,
}
_FITS_TEXT = {
    'lasso': 'any leaf of rank >= 1',
    'filter': 'conv kernels of rank >= 3 (..., in, out)',
    'neuron': 'dense kernels of rank 2 (in, out)',
    'input': 'dense kernels of rank 2 (in, out)',
    'head': 'attention projections of rank 3 (features, heads, head_dim)',
}


def reduce_axes(kind: str, ndim: int) -> tuple[int, ...]:
  """The axes one group of ``kind`` spans in a leaf of rank ``ndim``."""
  if kind == 'lasso':
    return ()
  if kind in ('filter', 'neuron'):
    return tuple(range(ndim - 1))
  if kind == 'input':
    return (1,)
  if kind == 'head':
    return (0, 2)
  raise ValueError(f'Unknown group kind {kind!r}; use one of {KINDS} or None.')


def group_axis(kind: str, ndim: int) -> Optional[int]:
  """The axis that indexes the groups (``None`` for ``lasso``: every entry)."""
  if kind == 'lasso':
    return None
  (axis,) = sorted(set(range(ndim)) - set(reduce_axes(kind, ndim)))
  return axis


def group_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """Shape of a per-group array, broadcastable against the leaf (keepdims)."""
  spanned = reduce_axes(kind, len(shape))
  return tuple(1 if a in spanned else d for a, d in enumerate(shape))


def group_size(kind: str, shape: tuple[int, ...]) -> int:
  """Number of weights in one group."""
  return math.prod(shape[a] for a in reduce_axes(kind, len(shape)))


def kind_of(shape: tuple[int, ...], per_group_shape: tuple[int, ...]) -> str:
  """The kind whose groups have ``per_group_shape`` in a leaf of ``shape``.

  Inverse of :func:`group_shape` (``lasso`` when a group is one entry).
  """
  shape, per_group_shape = tuple(shape), tuple(per_group_shape)
  if per_group_shape == shape:
    return 'lasso'
  for kind in KINDS[1:]:
    if _FITS[kind](len(shape)) and group_shape(kind, shape) == per_group_shape:
      return kind
  raise ValueError(f'No group kind has groups of shape {per_group_shape} in a leaf of shape {shape}.')


def default_kind(path: str, leaf) -> GroupKind:
  """The reference rule: conv kernels -> filter, 2-D -> lasso, else none."""
  del path
  ndim = np.ndim(leaf)
  if ndim >= 3:
    return 'filter'
  if ndim == 2:
    return 'lasso'
  return None


def path_str(path) -> str:
  """``'/'``-joined key path of a leaf, e.g. ``'Conv_0/kernel'``."""
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return '/'.join(parts)


def _is_kind_leaf(x) -> bool:
  return x is None or isinstance(x, str)


def _validate(kind: GroupKind, path: str, leaf) -> GroupKind:
  if kind is None:
    return None
  if kind not in KINDS:
    raise ValueError(f'Unknown group kind {kind!r} for leaf {path!r}; use one of {KINDS} or None.')
  ndim = np.ndim(leaf)
  if not _FITS[kind](ndim):
    raise ValueError(
        f'Group kind {kind!r} does not fit leaf {path!r} of shape {np.shape(leaf)}: '
        f'{kind!r} is for {_FITS_TEXT[kind]}. Pick another kind for it in `groups`.')
  return kind


def is_placeholder(x) -> bool:
  """Whether a state leaf stands for no array: ``None`` (a leaf without structure) or ``optax.MaskedNode``."""
  return x is None or isinstance(x, optax.MaskedNode)


def resolve_kinds(params, groups: GroupsRule = None):
  """A pytree with the params' structure holding each leaf's kind (str or None).

  Raises ``ValueError`` for an unknown kind, a kind that does not fit the
  leaf's rank, or a pattern that matches no leaf.
  """
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [path_str(p) for p, _ in leaves_with_path]
  leaves = [leaf for _, leaf in leaves_with_path]

  if groups is None:
    kinds = [default_kind(p, x) for p, x in zip(paths, leaves)]
  elif callable(groups):
    kinds = [groups(p, x) for p, x in zip(paths, leaves)]
  else:
    kinds = _kinds_from_pytree(paths, groups)
    if kinds is None:
      kinds = _kinds_from_patterns(groups, paths, leaves)
  kinds = [_validate(k, p, x) for k, p, x in zip(kinds, paths, leaves)]
  return jax.tree.unflatten(treedef, kinds)


def _kinds_from_pytree(paths, groups):
  """The kinds of a pytree of kinds, matched to the params by leaf path.

  By path, not by node type, so that a nested dict of kinds fits params held in
  another container (a ``flax.nnx.State``, a ``FrozenDict``).
  """
  try:
    flat = jax.tree_util.tree_flatten_with_path(groups, is_leaf=_is_kind_leaf)[0]
  except (ValueError, TypeError):
    return None
  by_path = {path_str(p): k for p, k in flat}
  if len(by_path) != len(paths) or set(by_path) != set(paths) or not all(map(_is_kind_leaf, by_path.values())):
    return None
  return [by_path[p] for p in paths]


def _kinds_from_patterns(groups, paths, leaves):
  if not isinstance(groups, Mapping) or not all(isinstance(p, str) for p in groups):
    raise ValueError(
        '`groups` must be None, a callable (path, leaf) -> kind, a pytree of kinds with the '
        f'params\' structure, or a mapping from path patterns to kinds; got {type(groups).__name__}.')
  compiled = {}
  for pattern in groups:
    try:
      compiled[pattern] = re.compile(pattern)
    except re.error as e:
      raise ValueError(f'Pattern {pattern!r} in `groups` is not a valid regular expression: {e}.') from None
  used = set()
  kinds = []
  for path, leaf in zip(paths, leaves):
    for pattern, regex in compiled.items():
      if regex.search(path):
        used.add(pattern)
        kinds.append(groups[pattern])
        break
    else:
      kinds.append(default_kind(path, leaf))
  unused = [p for p in groups if p not in used]
  if unused and paths:   # no params at all (a masked-out part, optax.tree.map_params' placeholder): nothing to match
    raise ValueError(
        f'Pattern(s) {unused} in `groups` match no parameter. Patterns are searched '
        f'(re.search) in leaf paths; the paths are: {paths}.')
  return kinds
