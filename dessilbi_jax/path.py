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

from dessilbi_jax import grouping
from dessilbi_jax.optimizer import DessiLBIState


def _is_placeholder(x) -> bool:
  return x is None or isinstance(x, optax.MaskedNode)


def find_states(opt_state) -> list[DessiLBIState]:
  """All DessiLBI states inside an optax state, outermost first."""
  nodes = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, DessiLBIState))
  return [x for x in nodes if isinstance(x, DessiLBIState)]


def _field(opt_state, name: str):
  states = find_states(opt_state)
  if not states:
    raise ValueError(
        'No DessiLBI state found in this optimizer state: pass the state of dl.dessilbi '
        f'or of an optax transformation built around it (got {type(opt_state).__name__}).')
  trees = [getattr(s, name) for s in states]
  flats = [jax.tree.flatten(t, is_leaf=_is_placeholder) for t in trees]
  treedef = flats[0][1]
  merged = []
  for position, values in enumerate(zip(*(leaves for leaves, _ in flats))):
    present = [v for v in values if not _is_placeholder(v)]
    if len(present) > 1:
      raise ValueError(
          f'Leaf #{position} is updated by {len(present)} DessiLBI transformations in this state; '
          'the path is ambiguous. Apply dl.dessilbi once per parameter.')
    merged.append(present[0] if present else None)
  return jax.tree.unflatten(treedef, merged)


def gamma(opt_state):
  """The structure variable ``Γ``: a pytree with the params' structure."""
  return _field(opt_state, 'gamma')


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
  return jax.tree.map(
      lambda w, s: w if s is None else jnp.where(s, w, jnp.zeros_like(w)),
      params, support(opt_state))


def _leaf_table(params, opt_state):
  """(path, W, Γ, entry step) per leaf, in numpy."""
  gam, entry = gamma(opt_state), entry_step(opt_state)
  treedef = jax.tree.structure(params)
  rows = []
  for (path, w), g, e in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                             treedef.flatten_up_to(gam), treedef.flatten_up_to(entry)):
    w, g = np.asarray(w), None if g is None else np.asarray(g)
    if g is not None and g.shape != w.shape:
      raise ValueError(
          f'Leaf {grouping.path_str(path)!r} has shape {w.shape} but its Γ has shape {g.shape}. Pass the params '
          'and optimizer state of one replica (under pmap: flax.jax_utils.unreplicate of both).')
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
  return jax.tree.unflatten(jax.tree.structure(params), [jnp.asarray(x) for x in pruned])
