"""The order of the update's writes on XLA's CPU backend: zero-valued data edges.

XLA on CPU forms no multi-output fusions, so ``W``, ``Z`` and ``Γ`` are each
written by their own fusion, in place into the donated buffers. Unless a data
edge orders every reader of a buffer before its writer, XLA copies the buffer on
every step (two extra passes over memory). This module holds those edges; the
maths is :func:`dessilbi_jax.core.optimizer.leaf_update`, which calls ``after`` at
the two points where an order matters and is the plain update without it.

* ``after(x, written)`` is ``x`` to the bit, for every ``x`` and every
  ``written``, finite or not, but computed from a token of ``written``, so that
  whatever reads ``x`` runs once ``written`` exists.
* Structured leaves of at least :data:`SEQUENTIAL_MIN_SIZE` weights are updated
  one after the other: their buffers (about 1 MiB and more in float32) do not all
  fit in the CPU's caches at once, and in sequence the momentum and ``Z`` a
  leaf's first fusions write are still cached when its next fusions read them.
  Smaller leaves fit together and gain more from being updated side by side.

On GPU and TPU XLA fuses the writes itself, and under ``jax.jit`` with sharded
params every edge is a scalar all-reduce: :func:`wanted` keeps them to the CPU.

Example::

  >>> import jax.numpy as jnp
  >>> from dessilbi_jax.core import cpu_schedule
  >>> x = jnp.array([1.0, -0.0, jnp.inf])
  >>> cpu_schedule.after(x, jnp.array([[jnp.nan, 3e38], [1.0, 2.0]]))   # x, after a NaN token
  Array([ 1., -0., inf], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp

SEQUENTIAL_MIN_SIZE = 2 ** 18


def token(x: jax.Array) -> jax.Array:
  """A scalar that exists only once the buffer holding ``x`` has been written.

  Of an array that is its own first row (the per-group norms of filters or
  neurons, a reduction's own output), its first entry. Of a whole buffer, the
  sum of its first row (``x[0, ..., 0, :]``): XLA gives a
  reduction its own fusion that reads the written buffer (it does not recompute
  a shared producer inside it), so the edge costs a row of loads, not a pass;
  and under ``jax.jit`` with sharded params it is one scalar all-reduce whatever
  axis is sharded (a slice of the flattened array would all-gather it).

  Of an empty array (a layer whose units were all removed), ``0``: there is no
  buffer to wait for.
  """
  if jnp.size(x) == 0:
    return jnp.zeros([], jnp.float32)
  if jnp.ndim(x) >= 2 and jnp.size(x) == jnp.shape(x)[-1]:
    return x[(0,) * x.ndim].astype(jnp.float32)
  return jnp.sum(x[(0,) * (x.ndim - 1)], dtype=jnp.float32)


def edge(t: jax.Array) -> jax.Array:
  """``+0.0`` for every scalar ``t``, finite, infinite or NaN, not folded away by XLA.

  ``min(|t|, 0)`` is ``0`` for a finite or infinite ``t`` but NaN for a NaN
  ``t`` (XLA's minimum propagates NaN; a row of ±3e38 sums to inf − inf), so
  the NaN is replaced by ``0`` (``jnp.fmin`` or ``lax.optimization_barrier``
  instead lose the copy-free layout).
  """
  e = jnp.minimum(jnp.abs(t), 0)
  return jnp.where(e == e, e, 0)


def after(x, written: jax.Array) -> jax.Array:
  """``x``, made to depend on the buffer ``written`` without changing a bit of it.

  ``x − (+0)`` is ``x`` for every float, ``−0`` and NaN included (``x + 0``
  would turn ``−0`` into ``+0``). For ``W`` pass ``w + step``: that is what
  ``optax.apply_updates`` computes, so XLA's CSE makes it the very value written.
  """
  x = jnp.asarray(x)
  return x - edge(token(written)).astype(x.dtype)


def _explicitly_sharded(x) -> bool:
  """Whether ``x``'s type names a mesh axis it is sharded over (``AxisType.Explicit``).

  The token indexes the leaf's first row, which such a type does not allow.
  """
  sharding = getattr(jax.typeof(x), 'sharding', None)
  mesh, spec = getattr(sharding, 'mesh', None), getattr(sharding, 'spec', ())
  explicit = getattr(getattr(jax.sharding, 'AxisType', None), 'Explicit', None)
  axis_types = dict(zip(getattr(mesh, 'axis_names', ()), getattr(mesh, 'axis_types', ())))
  names = [n for entry in spec if entry is not None for n in (entry if isinstance(entry, tuple) else (entry,))]
  return any(axis_types.get(n) == explicit for n in names)


def wanted(ordering_edges: Optional[bool], leaves: Sequence[Any]) -> bool:
  """Whether to order the writes: ``ordering_edges``, or by default when JAX's default backend is the CPU.

  Decided when the update is traced. The default is off where params are
  sharded in their types (``AxisType.Explicit``): the tokens index a sharded axis.
  """
  explicit = any(_explicitly_sharded(x) for x in leaves)
  if ordering_edges is None:
    return jax.default_backend() == 'cpu' and not explicit
  if ordering_edges and explicit:
    raise ValueError(
        'ordering_edges=True needs params that are not sharded in their types (jax.sharding.AxisType.Explicit): '
        'the edges read the first row of each buffer. Pass ordering_edges=None or False.')
  return bool(ordering_edges)


def update_in_order(leaf_update: Callable, leaves: Sequence[tuple], kinds: Sequence[Optional[str]], *,
                    chain_on: int = 3) -> list:
  """``[leaf_update(*args, after=after) for ...]``, large structured leaves in sequence.

  ``args`` is ``(g, b, w, z, ...)``; a large leaf starts (reads its gradient
  and ``Z``) once the previous large leaf has written its result ``chain_on``
  (by default ``Γ``, the fourth of :func:`~dessilbi_jax.core.optimizer.leaf_update`'s
  results; ``Z`` where that is ``None``).
  """
  results, previous = [], None
  for (g, b, w, z, *rest), kind in zip(leaves, kinds):
    sequential = kind is not None and jnp.size(w) >= SEQUENTIAL_MIN_SIZE
    if sequential and previous is not None:
      g, z = after(g, previous), after(z, previous)
    result = leaf_update(g, b, w, z, *rest, after=after)
    if sequential:
      previous = result[chain_on] if result[chain_on] is not None else result[2]
    results.append(result)
  return results
