"""Reading the regularization path off a DessiLBI state.

Every function takes the state of :func:`dessilbi_jax.dessilbi` or any optax
state that contains it (``optax.chain``, ``optax.inject_hyperparams``,
``optax.masked``, ``optax.partition``; several DessiLBI states under a
partition are merged). Trees come back with the params' structure and ``None``
on leaves that carry no structure variable. Under ``pmap`` pass one replica
(``flax.jax_utils.unreplicate(state)``).

Example::

  >>> import jax.numpy as jnp
  >>> import dessilbi_jax as dl
  >>> params = {'kernel': jnp.ones((3, 3, 1, 4)), 'bias': jnp.zeros(4)}
  >>> state = dl.dessilbi(0.1).init(params)
  >>> dl.sparsity_summary(params, state)['kernel']
  {'kind': 'filter', 'groups': 4, 'groups_in_support': 0, 'weights': 36, 'weights_kept': 0}
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dessilbi_jax.core import grouping
from dessilbi_jax.core.optimizer import DessiLBIState
from dessilbi_jax.core.optimizer import gamma_of

try:
  from flax import nnx as _nnx
except ImportError:   # flax is only needed for its nnx Variables
  _nnx = None


def _as_arrays(tree):
  """An nnx optimizer or model, or a tree of nnx Variables, as plain arrays (``nnx.as_pure``)."""
  if _nnx is None:
    return tree
  if isinstance(tree, _nnx.Optimizer):
    tree = tree.opt_state
  elif isinstance(tree, _nnx.Module):
    tree = _nnx.state(tree, _nnx.Param)
  return _nnx.as_pure(tree)


def find_states(opt_state) -> list[DessiLBIState]:
  """All DessiLBI states inside an optax state, outermost first."""
  nodes = jax.tree.leaves(_as_arrays(opt_state), is_leaf=lambda x: isinstance(x, DessiLBIState))
  return [x for x in nodes if isinstance(x, DessiLBIState)]


def _children(tree):
  """One level of ``tree``: its children (``None`` kept), their keys, and the node that holds them."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is not tree)
  return [k for k, _ in flat], [c for _, c in flat], treedef


def _merge(trees, path=()):
  """One tree out of several with the same structure where each leaf is set in at most one.

  ``optax.masked`` and ``optax.partition`` leave ``None`` or ``MaskedNode`` where
  a transformation does not apply, also for whole subtrees (a mask given as a
  prefix of the params); what is set nowhere comes back ``None``.
  """
  present = [t for t in trees if not grouping.is_placeholder(t)]
  if len(present) <= 1:
    return jax.tree.map(lambda x: None if grouping.is_placeholder(x) else x, present[0], is_leaf=grouping.is_placeholder) \
        if present else None
  split = [_children(t) for t in present]
  if any(jax.tree_util.treedef_is_leaf(d) for _, _, d in split) or len({d for _, _, d in split}) > 1:
    raise ValueError(
        f'Leaf {grouping.path_str(path)!r} is updated by {len(present)} DessiLBI transformations in this state; '
        'the path is ambiguous. Apply dl.dessilbi once per parameter.')
  keys, _, treedef = split[0]
  return treedef.unflatten([_merge(list(children), path + key)
                            for key, children in zip(keys, zip(*(c for _, c, _ in split)))])


def _field(opt_state, name: str, of=getattr):
  states = find_states(opt_state)
  if not states:
    raise ValueError(
        'No DessiLBI state found in this optimizer state: pass the state of dl.dessilbi '
        f'or of an optax transformation built around it (got {type(opt_state).__name__}).')
  return _merge([of(s, name) for s in states])


def _like_params(tree, params):
  """``tree`` with the params' structure: a ``None`` standing for a whole subtree becomes its leaves."""
  return jax.tree.map(lambda t, p: jax.tree.map(lambda _: None, p) if grouping.is_placeholder(t) else t,
                      tree, params, is_leaf=grouping.is_placeholder)


def gamma(opt_state):
  """The structure variable ``Γ``: a pytree with the params' structure.

  A lean state (``dl.dessilbi(..., store_gamma=False)``) keeps no ``Γ``: it is
  rebuilt from ``Z`` (:func:`dessilbi_jax.core.optimizer.gamma_of`), to the bit what
  the stored one would be; so are the helpers below that read it.
  """
  return _field(opt_state, 'gamma', lambda s, _: gamma_of(s))


def z(opt_state):
  """The dual variable ``Z``: a pytree with the params' structure."""
  return _field(opt_state, 'z')


def entry_step(opt_state):
  """Per group: the step after which ``Γ_g`` first became non-zero, ``-1`` never."""
  return _field(opt_state, 'entry_step')


def support(opt_state):
  """Boolean masks ``Γ != 0`` (``None`` on leaves without structure)."""
  return jax.tree.map(lambda g: None if g is None else g != 0, gamma(opt_state),
                      is_leaf=lambda x: x is None)


def sparse_params(params, opt_state):
  """``W ⊙ 1[Γ != 0]`` on structured leaves; the other leaves unchanged."""
  params = _as_arrays(params)
  return jax.tree.map(
      lambda w, s: w if s is None else jnp.where(s, w, jnp.zeros_like(w)),
      params, _like_params(support(opt_state), params), is_leaf=lambda x: x is None)


def _leaf_table(params, opt_state):
  """(path, W, Γ, entry step) per leaf, in numpy."""
  params = _as_arrays(params)
  gam, entry = (_like_params(t, params) for t in (gamma(opt_state), entry_step(opt_state)))
  treedef = jax.tree.structure(params)
  rows = []
  for (path, w), g, e in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                             treedef.flatten_up_to(gam), treedef.flatten_up_to(entry)):
    w, g = np.asarray(w), None if g is None else np.asarray(g)
    if g is not None and g.shape != w.shape:
      raise ValueError(
          f'Leaf {grouping.path_str(path)!r} has shape {w.shape} but its Γ has shape {g.shape}. Pass the params '
          'and optimizer state of one replica (under pmap: flax.jax_utils.unreplicate of both).')
    if g is not None and not np.all(np.isfinite(g)):
      raise ValueError(
          f'Γ of leaf {grouping.path_str(path)!r} holds {np.count_nonzero(~np.isfinite(g))} NaN or infinite values: '
          'a non-finite gradient or parameter reached the optimizer state, so its support (NaN counts as '
          'non-zero) and entry steps mean nothing. Guard the loop with optax.apply_if_finite(dl.dessilbi(...), '
          'max_consecutive_errors=5) and restart from a finite state.')
    rows.append((grouping.path_str(path), w, g, None if e is None else np.asarray(e)))
  return rows


def _groups_nonzero(g: np.ndarray, per_group_shape) -> np.ndarray:
  """Per group (keepdims shape): whether any entry of the group is non-zero."""
  axes = tuple(a for a, (n, m) in enumerate(zip(g.shape, per_group_shape)) if m == 1 and n != 1)
  return np.any(g != 0, axis=axes, keepdims=True) if axes else g != 0


def _summary_row(kind, w: np.ndarray, kept: Optional[np.ndarray], per_group_shape) -> dict:
  """One row of the summaries: a group is kept while any entry of ``kept`` in it is non-zero."""
  if kind is None:
    return dict(kind=None, groups=0, groups_in_support=0, weights=int(w.size), weights_kept=int(w.size))
  return dict(kind=kind, groups=int(np.prod(per_group_shape)),
              groups_in_support=int(_groups_nonzero(kept, per_group_shape).sum()),
              weights=int(w.size), weights_kept=int(np.count_nonzero(kept)))


def sparsity_summary(params, opt_state) -> dict[str, dict]:
  """Per leaf path: ``kind``, ``groups``, ``groups_in_support``, ``weights``, ``weights_kept``.

  Leaves without structure have ``kind`` ``None``, no groups and every weight kept.
  """
  return {path: _summary_row(None if g is None else grouping.kind_of(w.shape, e.shape), w, g,
                             None if e is None else e.shape)
          for path, w, g, e in _leaf_table(params, opt_state)}


def nonzero_summary(params, groups: grouping.GroupsRule = None) -> dict[str, dict]:
  """:func:`sparsity_summary`'s table where the zeros of W are the structure.

  For a pruned network (a retrained ticket, gradual magnitude pruning, the
  group lasso): a group counts as kept while any of its weights is non-zero.
  ``groups`` is the grouping rule (default: the reference rule).
  """
  kinds = jax.tree.structure(params).flatten_up_to(grouping.resolve_kinds(params, groups))
  summary = {}
  for (keypath, w), kind in zip(jax.tree_util.tree_flatten_with_path(params)[0], kinds):
    w = np.asarray(w)
    per_group_shape = None if kind is None else grouping.group_shape(kind, w.shape)
    summary[grouping.path_str(keypath)] = _summary_row(kind, w, w, per_group_shape)
  return summary


def prune_by_order(params, opt_state, fraction: float, leaves: Optional[Sequence[str]] = None):
  """Zeroes the lowest-ranked ``fraction`` of the groups of each structured leaf.

  Groups are ranked by their entry step (earlier first; never-entered last),
  ties broken by larger ``‖W_g‖``. ``leaves`` lists the leaf paths to prune
  (default: every structured leaf).
  """
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f'`fraction` must be in [0, 1], got {fraction}.')
  table = _leaf_table(params, opt_state)
  structured = [path for path, _, g, _ in table if g is not None]
  if leaves is not None:
    unknown = sorted(set(leaves) - set(structured))
    if unknown:
      raise ValueError(f'`leaves` names {unknown}, which are not structured leaves; these are: {structured}.')
  chosen = set(structured if leaves is None else leaves)
  pruned = []
  for path, w, g, e in table:
    if path not in chosen:
      pruned.append(w)
      continue
    axes = tuple(a for a, (n, m) in enumerate(zip(w.shape, e.shape)) if m == 1 and n != 1)
    norms = np.sqrt(np.sum(np.square(w.astype(np.float64)), axis=axes, keepdims=True)) if axes else np.abs(w)
    entry = np.where(e < 0, np.iinfo(np.int64).max, e.astype(np.int64)).reshape(-1)
    order = np.lexsort((-norms.reshape(-1), entry))  # best first: earliest entry, then largest norm
    keep = np.ones(e.size, bool)
    keep[order[e.size - int(round(fraction * e.size)):]] = False
    pruned.append(np.where(keep.reshape(e.shape), w, 0).astype(w.dtype))
  # An nnx model's tree holds more than its params: the result has the params' (``nnx.update(model, ...)``).
  return jax.tree.unflatten(jax.tree.structure(_as_arrays(params)), [jnp.asarray(x) for x in pruned])
