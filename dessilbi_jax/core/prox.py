"""Proximal maps: group soft-thresholding, ``jax.vmap``-ed over the groups.

For one group ``z_g`` and threshold ``λ``:

  prox_λ(z)_g = z_g · max(0, 1 − λ / ‖z_g‖₂)

With ``normalize=True`` the norm is divided by ``√|g|`` (the group size) so one
``λ`` suits groups of different sizes. For ``lasso`` every entry is its own
group and this is the soft threshold ``sign(z)·max(|z| − λ, 0)``.

The per-group map is written for one group and ``jax.vmap``-ed over the group
axis; it is split into its norm and its shrinkage so that the optimizer can
reuse the norms.

Example::

  >>> import jax.numpy as jnp
  >>> from dessilbi_jax.core import prox
  >>> z = jnp.array([[3.0, 0.1], [4.0, 0.1]])        # (in=2, out=2): two neurons
  >>> shrunk, in_support = prox.group_prox(z, 'neuron', lam=1.0)
  >>> shrunk   # column 0 has norm 5 -> scaled by 0.8; column 1 is shrunk to zero
  Array([[2.4, 0. ],
         [3.2, 0. ]], dtype=float32)
  >>> in_support
  Array([[ True, False]], dtype=bool)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dessilbi_jax.core import grouping


def group_norm(z_g: jax.Array, normalize: bool = False) -> jax.Array:
  """``‖z_g‖₂`` of one group (divided by ``√|g|`` when ``normalize``)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(z_g)))
  if normalize:
    norm = norm / jnp.sqrt(jnp.asarray(z_g.size, norm.dtype))
  return norm


def shrink_factor(norm, lam):
  """``max(0, 1 − λ/‖z_g‖)``, the factor the proximal map scales a group by."""
  in_support = norm > lam
  # The inner `where` keeps λ/0 out when the norm is 0 (λ = 0 would give 0/0).
  return jnp.where(in_support, 1 - lam / jnp.where(in_support, norm, 1), 0)


def shrink_group(z_g: jax.Array, norm, lam, kappa=1.0):
  """``κ·prox_λ(z)_g = s_g·z_g`` with ``s_g = κ·max(0, 1 − λ/‖z_g‖)``; returns both.

  ``norm`` is the group's (possibly normalized) norm.
  """
  scale = (kappa * shrink_factor(norm, lam)).astype(z_g.dtype)
  return z_g * scale, scale


def group_norms(z: jax.Array, kind: str, normalize: bool = False) -> jax.Array:
  """Norm of every group of ``z``, in the keepdims shape of ``grouping.group_shape``."""
  if kind == 'lasso':
    return jnp.abs(z)
  norms = jax.vmap(group_norm, in_axes=(grouping.group_axis(kind, z.ndim), None))(z, normalize)
  return norms.reshape(grouping.group_shape(kind, z.shape))


def shrink_groups(z: jax.Array, kind: str, norms: jax.Array, lam, kappa=1.0):
  """:func:`shrink_group` ``jax.vmap``-ed over the groups of ``z``.

  Returns ``(κ·prox_λ(z), s)``, ``s`` in the keepdims per-group shape of ``norms``.
  """
  if kind == 'lasso':
    return shrink_group(z, norms, lam, kappa)   # every entry its own group: elementwise
  axis = grouping.group_axis(kind, z.ndim)
  shrunk, scale = jax.vmap(shrink_group, in_axes=(axis, 0, None, None), out_axes=(axis, 0))(
      z, norms.reshape(-1), lam, kappa)
  return shrunk, scale.reshape(norms.shape)


def group_prox(z: jax.Array, kind: str, lam, normalize: bool = False, norms=None):
  """``prox_λ`` of a whole leaf grouped by ``kind``.

  Returns ``(prox_λ(z), in_support)``, ``in_support`` (``‖z_g‖ > λ``) in the
  keepdims per-group shape. ``norms`` may pass :func:`group_norms` of ``z``.
  """
  if norms is None:
    norms = group_norms(z, kind, normalize)
  shrunk, _ = shrink_groups(z, kind, norms, lam)
  return shrunk, norms > lam
