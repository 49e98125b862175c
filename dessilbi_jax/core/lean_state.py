"""Γ without storing it: the lean state's rebuild, and Γ_k read as the stored one, to the bit.

``dl.dessilbi(store_gamma=False)`` keeps no Γ between steps. On a grouped leaf
``Γ_g = s_g·Z_g`` with the per-group scale ``s`` the prox computed; on a lasso
leaf ``Γ = κ·prox_λ(Z)`` with the κ and λ that made it. The update
(:mod:`dessilbi_jax.core.optimizer`) reads ``Γ_k`` through these functions, so
a lean state gives the stored state's numbers to the bit (tested), and so does
the ``Z`` half of a stored state's step, which rebuilds ``Γ_k`` instead of
reading it (the CPU schedule's reason: :func:`rebuilt_gamma`).

Example::

  >>> import jax, jax.numpy as jnp, dessilbi_jax as dl
  >>> params = {'w': jnp.array([[0.3, -2.0], [1.5, 0.1]])}
  >>> grads = {'w': jnp.array([[-1.0, 4.0], [-3.0, 0.5]])}
  >>> lean, stored = (dl.dessilbi(0.5, lambdas=0.5, store_gamma=s) for s in (False, True))
  >>> a = lean.update(grads, lean.init(params), params)[1]
  >>> b = stored.update(grads, stored.init(params), params)[1]
  >>> bool(jnp.array_equal(dl.gamma(a)['w'], dl.gamma(b)['w']))
  True
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dessilbi_jax.core import cpu_schedule
from dessilbi_jax.core import grouping
from dessilbi_jax.core import prox


def rebuilt_gamma(z, gam, scale, kind, lam, kappa, fixed: bool, count):
  """Γ_k for the ``Z`` update, equal to the stored ``Γ_k`` to the bit (tested).

  The ``Z`` update rebuilds it, so that only the ``W`` update reads the stored
  ``Γ_k``: else, on the CPU, ``W``'s writer would wait for ``Z``'s reader of
  ``W`` and ``Γ``'s writer for both readers of ``Γ``. Grouped leaves keep the
  per-group scale, ``Γ_k = s_k·Z_k``; lasso leaves keep no ``s`` (one per
  weight) and rebuild ``Γ_k = κ·prox_λ(Z_k)`` when κ and λ are fixed numbers, or
  read ``Γ_k`` when they may have changed since (``optax.inject_hyperparams``;
  a lean state passes ``None`` and :func:`rounded_gamma` stands in).

  The product is rounded to the state dtype, as the stored ``Γ_k`` was, before
  ``W_k − Γ_k`` reads it (:func:`rounded`): left to itself the compiler
  contracts ``W − Z·s`` into one fused multiply-add, rounded once (LLVM on the
  CPU in float32, and in float16 on CPUs with float16 arithmetic, AVX512-FP16;
  the GPU's compiler likewise), which is not ``W_k − Γ_k`` of the stored ``Γ_k``.
  """
  if scale is not None:
    return rounded(z * scale, count)
  if fixed:
    return rounded(lasso_gamma(z, kappa, lam), count)
  return gam


def rounded(x, count):
  """``x`` rounded to its dtype before any use: ``x − (+0)``, a ``+0`` the compiler cannot see through.

  A product that feeds a subtraction may be contracted with it into a fused
  multiply-add; ``Z·s − 0`` may be contracted too, but that is the rounded
  product, exactly. The ``+0`` is :func:`dessilbi_jax.core.cpu_schedule.after` on
  the step count's bits read as a float (a scalar that is never sharded and
  exists before any buffer is written; converted to a float it would be known
  not to be NaN, and LLVM would fold the ``+0`` away).
  """
  return cpu_schedule.after(x, jax.lax.bitcast_convert_type(jnp.asarray(count, jnp.int32), jnp.float32))


def rounded_gamma(z, scale, made, count):
  """Γ_k of a lean state where the stored one would be read: to the bit the stored, rounded ``Γ_k``.

  Rounded as in :func:`rebuilt_gamma`; the product is ``Z·(s − 0)`` (lasso:
  ``κ − 0``) so that it is not shared with the ``Z`` update's ``Z·s``: each
  fusion recomputes its own, none is written to memory for the other.
  """
  after = lambda x: rounded(x, count)
  if scale is not None:
    return after(z * after(scale))
  kappa, lam = made
  return after(lasso_gamma(z, after(kappa), lam))


def lasso_gamma(z, kappa, lam):
  """``κ·prox_λ(Z)`` of a lasso leaf: the expression of :func:`structure_update`, to the bit."""
  return prox.shrink_groups(z, 'lasso', prox.group_norms(z, 'lasso'), lam, kappa)[0]


def gamma_of(state):
  """``Γ`` of one :class:`DessiLBIState`: the stored tree, or rebuilt from a lean state's ``Z``.

  A lean state (``store_gamma=False``) keeps ``Γ_g = s_g·Z_g`` as its per-group
  scale and, on lasso leaves, the κ and λ of ``Γ = κ·prox_λ(Z)``; the rebuilt
  ``Γ`` equals what the update computed to the bit. Read it with
  :func:`dessilbi_jax.gamma`, which finds the state inside any optax state.
  """
  if state.gamma_kappa is None and state.gamma_lambda is None:   # Γ stored
    return state.gamma

  def leaf(z, scale, kappa, lam):
    if grouping.is_placeholder(z):   # no structure variable, or masked out
      return z
    if scale is not None:    # grouped: the product structure_update stored
      return z * scale
    return lasso_gamma(z, kappa, lam)

  return jax.tree.map(leaf, state.z, state.gamma_scale, state.gamma_kappa, state.gamma_lambda, is_leaf=grouping.is_placeholder)
