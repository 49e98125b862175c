"""The independent reference: docs/ALGORITHM.md and the baselines' maths in plain NumPy.

Nothing here comes from ``dessilbi_jax``: float64, explicit loops over the
groups, the keepdims per-group shapes as documented. Every test that checks
numbers of the library against equations uses this one copy.
"""

import numpy as np


def groups_of(kind, shape):
  """Pairs (index of the group's entries in the leaf, index of the group in the per-group array)."""
  if kind == 'filter':
    return [((..., o), (0,) * (len(shape) - 1) + (o,)) for o in range(shape[-1])]
  if kind == 'neuron':
    return [((slice(None), o), (0, o)) for o in range(shape[1])]
  if kind == 'input':
    return [((i, slice(None)), (i, 0)) for i in range(shape[0])]
  if kind == 'head':
    return [((slice(None), h, slice(None)), (0, h, 0)) for h in range(shape[1])]
  raise AssertionError(kind)


def per_group_shape(kind, shape):
  return {
      'lasso': tuple(shape),
      'filter': (1,) * (len(shape) - 1) + (shape[-1],),
      'neuron': (1, shape[1]),
      'input': (shape[0], 1),
      'head': (1, shape[1], 1),
  }[kind]


def prox(z, kind, lam, normalize=False):
  """prox_λ(z): soft threshold for lasso, group soft-thresholding group by group otherwise."""
  z = np.asarray(z, np.float64)
  if kind == 'lasso':
    return np.sign(z) * np.maximum(np.abs(z) - lam, 0.0)
  out = np.zeros_like(z)
  for index, _ in groups_of(kind, z.shape):
    z_g = z[index]
    norm = np.sqrt(np.sum(z_g ** 2))
    if normalize:
      norm /= np.sqrt(z_g.size)
    out[index] = z_g * max(0.0, 1.0 - lam / norm) if norm > 0 else 0.0
  return out


def nonzero_groups(gamma, kind):
  """Per group (keepdims shape): whether any entry of the group is non-zero."""
  if kind == 'lasso':
    return gamma != 0
  flags = np.zeros(per_group_shape(kind, gamma.shape), bool)
  for index, position in groups_of(kind, gamma.shape):
    flags[position] = np.any(gamma[index] != 0)
  return flags


def _rounded(x, dtype):
  """``x`` rounded to ``dtype`` (a NumPy or ml_dtypes dtype), kept in float64; ``None``: unrounded."""
  return x if dtype is None else np.asarray(x).astype(dtype).astype(np.float64)


def dessilbi_init(params, kinds):
  """State as dicts keyed by leaf path: W, b, Z, Γ, entry step (Z, Γ, entry only on structured leaves)."""
  state = dict(count=0, w={}, b={}, z={}, gamma={}, entry={})
  for path, w in params.items():
    state['w'][path] = np.asarray(w, np.float64)
    state['b'][path] = np.zeros(w.shape)
    if kinds[path] is not None:
      state['z'][path] = np.zeros(w.shape)
      state['gamma'][path] = np.zeros(w.shape)
      state['entry'][path] = np.full(per_group_shape(kinds[path], w.shape), -1)
  return state


def dessilbi_step(state, grads, *, kinds, alpha, kappa, mu, momentum, nesterov, weight_decay, lambdas,
                  normalize, param_dtype=None, state_dtype=None, lambda_of_path=None):
  """One step k -> k+1 of docs/ALGORITHM.md; ``alpha`` a number or a function of k, ``lambdas`` a number
  or a mapping {kind: λ} (``lambda_of_path``: {leaf path: λ} instead, for a target density). ``param_dtype`` / ``state_dtype`` round W / (b, Z, Γ) to a low precision
  after the step, as a library that stores them so does (``None``: float64 throughout)."""
  k = state['count']
  alpha = alpha(k) if callable(alpha) else alpha
  new = dict(count=k + 1, w={}, b={}, z={}, gamma={}, entry={})
  for path, w in state['w'].items():
    g = np.asarray(grads[path], np.float64)
    if w.ndim >= 2:
      g = g + weight_decay * w
    b = momentum * state['b'][path] + g
    d = g + momentum * b if nesterov else b
    new['b'][path] = _rounded(b, state_dtype)
    kind = kinds[path]
    if kind is None:
      new['w'][path] = _rounded(w - alpha * kappa * d, param_dtype)
      continue
    gam = state['gamma'][path]
    new['w'][path] = _rounded(w - alpha * kappa * (d + (w - gam) / mu), param_dtype)
    new['z'][path] = _rounded(state['z'][path] + alpha / mu * (w - gam), state_dtype)
    lam = lambdas[kind] if isinstance(lambdas, dict) else lambdas
    if lambda_of_path is not None:
      lam = lambda_of_path[path]
    new['gamma'][path] = _rounded(kappa * prox(new['z'][path], kind, lam, normalize), state_dtype)
    entry = state['entry'][path].copy()
    entry[(entry < 0) & nonzero_groups(new['gamma'][path], kind)] = k + 1
    new['entry'][path] = entry
  return new


def budget_threshold(norms, sizes, budget):
  """The least t among {0} ∪ norms with Σ_{‖g‖ > t} |g| ≤ budget (brute force over the candidates)."""
  flat = np.concatenate([np.ravel(n) for n in norms]) if norms else np.zeros(0)
  size = np.concatenate([np.full(np.size(n), s, float) for n, s in zip(norms, sizes)]) if norms else np.zeros(0)
  for t in sorted({0.0, *flat.tolist()}):
    if size[flat > t].sum() <= budget:
      return t
  raise AssertionError('unreachable: t = the largest norm keeps nothing')


def cubic_sparsity(t, s_f, t0, t1, freq, s_i=0.0):
  """Zhu & Gupta's sparsity at step t, held between the pruning steps t0, t0 + freq, ..., t1."""
  if t < t0:
    return 0.0
  last = t1 if t >= t1 else t0 + (t - t0) // freq * freq
  return s_f + (s_i - s_f) * (1 - (last - t0) / (t1 - t0)) ** 3


def group_norms(w, kind):
  """‖w_g‖₂ per group (keepdims shape); |w| for lasso."""
  w = np.asarray(w, np.float64)
  if kind == 'lasso':
    return np.abs(w)
  norms = np.zeros(per_group_shape(kind, w.shape))
  for index, position in groups_of(kind, w.shape):
    norms[position] = np.sqrt(np.sum(w[index] ** 2))
  return norms


def magnitude_keep(w, kind, sparsity):
  """GMP's keep-mask of a leaf (its shape): the round(s·n) groups of smallest norm removed (round half
  to even; among equal norms the lower index goes first)."""
  norms = group_norms(w, kind)
  flat = norms.reshape(-1)
  removed = np.argsort(flat, kind='stable')[:int(np.round(sparsity * flat.size))]
  keep = np.ones(flat.size, bool)
  keep[removed] = False
  return np.broadcast_to(keep.reshape(norms.shape), np.shape(w))
