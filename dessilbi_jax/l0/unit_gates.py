r"""L0 gates on the units of any Flax model, through its unit map.

One hard-concrete gate (:mod:`dessilbi_jax.l0`) per unit of a gated group of the
unit map (:mod:`dessilbi_jax.structure`): an output channel of a conv, a hidden
neuron of a dense layer. The unit map's ``gate`` applies it without rewriting
the model: a conv followed by BatchNorm has the BN's scale and bias scaled by
``z`` (exactly ``z·BN(x)``, so a shut channel emits 0), a layer without one its
kernel and bias. The gates are ``{group name: log_α of shape (units,)}``.

* :func:`gated_groups`: which groups carry gates (by default every prunable
  group outside the residual streams: not the inputs, not the classifier's
  logits, not the shortcut-tied stream channels);
* :func:`init_unit_gates` (:func:`init_log_alphas`, :func:`rescale`): ``log_α``
  from ``droprate_init`` and the paper's weight rescaling by ``1/(1 − p₀)``;
* :func:`apply_gates`: the network with sampled (training) or median (test) gates;
* :func:`expected_size`: the expected kernel density and MACs of the gated
  network, per layer and model-wise (a unit's kernel entries go when it or an
  input unit is shut), and :func:`size_constraint`, a target on either;
* :func:`purge`: the plain, smaller network: median gates folded into the
  weights, shut units removed;
* :func:`summary`: expected and purged sizes.

Example::

  >>> import jax, jax.numpy as jnp
  >>> from dessilbi_jax import l0, models, structure
  >>> from dessilbi_jax.l0 import unit_gates
  >>> model = models.get_model('mlp', 10, (4,), widths=(3,))
  >>> x = jnp.ones((2, 4))
  >>> variables = model.init(jax.random.key(0), x)
  >>> unit_map = structure.trace(model, variables, x)
  >>> names = unit_gates.gated_groups(unit_map)
  >>> names
  ('Dense_0',)
  >>> variables, log_alphas = unit_gates.init_unit_gates(jax.random.key(1), variables, unit_map, names, 0.5)
  >>> log_alphas = {'Dense_0': jnp.array([5.0, -5.0, 5.0])}     # the middle neuron shut
  >>> small_model, small_vars = unit_gates.purge(model, variables, unit_map, log_alphas)
  >>> small_model.widths
  (2,)
  >>> gated = model.apply(unit_gates.apply_gates(variables, unit_map, log_alphas), x)
  >>> bool(jnp.allclose(small_model.apply(small_vars, x), gated, rtol=1e-5))
  True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dessilbi_jax import l0
from dessilbi_jax import structure


def gated_groups(unit_map: structure.UnitMap, *, exclude: Sequence[str] = (),
                 streams: bool = False) -> tuple[str, ...]:
  """The names of the groups that carry gates.

  Args:
    unit_map: the model's map.
    exclude: group names not to gate (e.g. a ResNet's first conv, as the seed
      paper does); each must be a gateable group.
    streams: also gate residual streams (channels tied across blocks and
      shortcuts); the seed paper does not.
  """
  candidates = [g for g in unit_map.prunable() if streams or not g.is_stream]
  names = tuple(g.name for g in candidates)
  unknown = sorted(set(exclude) - set(names))
  if unknown:
    raise ValueError(f'`exclude` names {unknown}, which are not gateable groups; those are {list(names)}.')
  chosen = tuple(n for n in names if n not in exclude)
  if not chosen:
    raise ValueError(f'This model has no unit group to gate (its groups: {list(unit_map.names)}; '
                     'inputs, logits and, unless streams=True, residual streams are never gated).')
  return chosen


def init_log_alphas(key: jax.Array, unit_map: structure.UnitMap, names: Sequence[str],
                    droprate_init: float) -> dict[str, jax.Array]:
  """``{group name: log_α}``, ``log_α ~ N(log((1 − p₀)/p₀), 0.01²)`` of the group's size, ``p₀ = droprate_init``."""
  keys = jax.random.split(key, len(names))
  return {name: l0.init_log_alpha(k, (unit_map[name].size,), droprate_init) for name, k in zip(names, keys)}


def rescale(variables: Any, unit_map: structure.UnitMap, names: Sequence[str], droprate_init: float) -> Any:
  """``variables`` with the gated groups' outputs scaled by ``1/(1 − p₀)``: the paper's initial weight rescaling.

  After a BatchNorm, which would undo a kernel scaling, the BN's scale and
  bias carry it, the same place as the gates.
  """
  scale = l0.init_weight_scale(droprate_init)
  return structure.gate(variables, unit_map, {n: jnp.full((unit_map[n].size,), scale) for n in names})


def init_unit_gates(key: jax.Array, variables: Any, unit_map: structure.UnitMap, names: Sequence[str],
                    droprate_init: float) -> tuple[Any, dict[str, jax.Array]]:
  """``(rescale(variables, ...), init_log_alphas(key, ...))``: the paper's initialization in one call."""
  return (rescale(variables, unit_map, names, droprate_init),
          init_log_alphas(key, unit_map, names, droprate_init))


def apply_gates(variables: Any, unit_map: structure.UnitMap, log_alphas: Mapping[str, jax.Array],
                key: Optional[jax.Array] = None) -> Any:
  """``variables`` with every gated group's output times its gates.

  With ``key``: one hard-concrete sample per unit (training, one per step);
  without: the median gates ``ẑ`` (test time).
  """
  z = (l0.sample_gates_tree(key, dict(log_alphas)) if key is not None
       else jax.tree.map(l0.median_gates, dict(log_alphas)))
  return structure.gate(variables, unit_map, z)


def _keep(unit_map: structure.UnitMap, log_alphas: Mapping[str, jax.Array]) -> dict[str, np.ndarray]:
  """The units whose median gate is open (``ẑ > 0``)."""
  return structure.keep_from_gates(unit_map, {n: l0.median_gates(a) for n, a in log_alphas.items()})


def purge(model, variables: Any, unit_map: structure.UnitMap, log_alphas: Mapping[str, jax.Array]):
  """The trained gated network as a plain smaller one: ``(model, variables)``.

  The median gates are folded into the weights (:func:`apply_gates`, exact for
  fractional ``ẑ``), then the units with ``ẑ = 0`` are removed by the unit
  map's surgery, which also drops the next layer's input slices. Its logits
  equal the gated network's at test time.
  """
  folded = apply_gates(variables, unit_map, log_alphas)
  new_model, new_variables, _ = structure.remove(model, folded, unit_map, _keep(unit_map, log_alphas))
  return new_model, new_variables


# -- sizes: expected under the gates, and of the purged network ----------------------------------------

class Kernel(NamedTuple):
  """A conv or dense kernel as the unit map sees it.

  Attributes:
    name: its module path, ``'Conv_0'``.
    shape: the kernel's shape.
    positions: its output positions per example (MACs = positions · kept entries).
    axes: per cut axis, ``(group name, unit of every index along it)``
      (index ``p·size + c`` reads unit ``offset + c``, as the slice says).
  """
  name: str
  shape: tuple[int, ...]
  positions: int
  axes: tuple[tuple[int, str, np.ndarray], ...]


def kernels(unit_map: structure.UnitMap, variables: Any) -> tuple[Kernel, ...]:
  """Every kernel whose MACs :func:`dessilbi_jax.structure.count` counts, with the groups along its axes."""
  leaves = {tuple(str(getattr(k, 'key', k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(variables['params'])[0]}
  cuts = unit_map.leaves()
  out = []
  for path, positions in unit_map.positions:
    path = tuple(path) if tuple(path)[-1:] == ('kernel',) else tuple(path) + ('kernel',)
    axes = tuple((s.axis, group.name, np.tile(np.arange(s.offset, s.offset + s.size), s.repeat))
                 for group, s in cuts.get(('params', path), ()))
    out.append(Kernel('/'.join(path[:-1]), tuple(np.shape(leaves[path])), int(positions), axes))
  return tuple(out)


def expected_entries(kernel: Kernel, probs: Mapping[str, jax.Array]) -> jax.Array:
  r"""``E[kept entries]`` of ``kernel`` when unit ``u`` of group ``g`` is on with probability ``probs[g][u]``.

  Units are independent, an entry is kept when every unit it joins is on, and
  groups missing from ``probs`` are on. With one gated group per axis the
  expectation factorizes: ``Π_axes Σ_i p(unit of i)`` (a hidden dense layer:
  ``E[active in]·E[active out]``); a group on two axes of one kernel (a
  stream-to-stream conv) adds ``Σ_u n_a(u)·n_b(u)·(p_u − p_u²)``, because
  ``E[1_u·1_u] = p_u``.
  """
  gated = [(axis, group, units) for axis, group, units in kernel.axes if group in probs]
  size = math.prod(n for axis, n in enumerate(kernel.shape) if axis not in {a for a, _, _ in gated})
  by_group: dict[str, list[np.ndarray]] = {}
  for _, group, units in gated:
    by_group.setdefault(group, []).append(units)
  for group, unit_lists in by_group.items():
    p = jnp.asarray(probs[group])
    if len(unit_lists) == 1:
      size = size * jnp.sum(p[unit_lists[0]])
    elif len(unit_lists) == 2:
      a, b = (np.bincount(u, minlength=p.shape[0]) for u in unit_lists)
      size = size * (jnp.sum(p[unit_lists[0]]) * jnp.sum(p[unit_lists[1]]) + jnp.sum(a * b * (p - p * p)))
    else:
      raise ValueError(f'Kernel {kernel.name} has group {group!r} on {len(unit_lists)} axes; at most two are '
                       'counted.')
  return jnp.asarray(size, jnp.float32)


def expected_size(unit_map: structure.UnitMap, variables: Any, probs: Mapping[str, Any]) -> dict[str, Any]:
  r"""The expected size of the gated network, as fractions of the ungated one's (differentiable).

  ``probs``: ``{group name: p}``, ``p_u`` the probability that unit ``u`` is on
  (``P(z_u ≠ 0)``, :func:`dessilbi_jax.l0.prob_active` of its ``log_α``; a
  keep-mask as 0/1 gives the removed network's sizes); groups left out are
  on. With ``E_k``
  the expected kept entries of kernel ``k`` (:func:`expected_entries`),
  ``N_k`` its entries and ``P_k`` its output positions:

  * ``density``: ``Σ_k E_k / Σ_k N_k``, the expected fraction of every conv and
    dense kernel entry kept (the classifier's included);
  * ``macs``: ``Σ_k P_k·E_k / Σ_k P_k·N_k``, the expected multiply-accumulates;
  * ``layers``: ``{kernel: E_k / N_k}`` of the kernels a gate acts on (a layer's
    MACs fraction is its density).

  A shut unit removes its kernel slice and the next layer's inputs, so these
  are the sizes the purged network has (:func:`summary`) once the gates are 0 or 1.

  Example: an MLP 4-3-10 with one hidden neuron on, one off, one a coin::

    >>> import jax, jax.numpy as jnp
    >>> from dessilbi_jax import models, structure
    >>> from dessilbi_jax.l0 import unit_gates
    >>> model = models.get_model('mlp', 10, (4,), widths=(3,))
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 4)))
    >>> unit_map = structure.trace(model, variables, jnp.zeros((1, 4)))
    >>> size = unit_gates.expected_size(unit_map, variables, {'Dense_0': jnp.array([1.0, 0.0, 0.5])})
    >>> round(float(size['density']), 3), round(float(size['macs']), 3)   # (4 + 10)·1.5 / (4 + 10)·3
    (0.5, 0.5)
    >>> g = unit_gates.size_constraint(unit_map, variables, target_macs=0.25, scope='layer')   # one neuron on
    >>> {k: round(float(v), 2) for k, v in g({'Dense_0': jnp.array([50.0, -50.0, -50.0])}).items()}
    {'Dense_0': 0.08, 'Dense_1': 0.08}
  """
  sizes = [(k, expected_entries(k, probs), math.prod(k.shape)) for k in kernels(unit_map, variables)]
  return dict(density=sum(e for _, e, _ in sizes) / sum(n for _, _, n in sizes),
              macs=sum(k.positions * e for k, e, _ in sizes) / sum(k.positions * n for k, _, n in sizes),
              layers={k.name: e / n for k, e, n in sizes if any(g in probs for _, g, _ in k.axes)})


SCOPES = ('model', 'layer')


def size_constraint(unit_map: structure.UnitMap, variables: Any, *, target_density: Optional[float] = None,
                    target_macs: Optional[float] = None, scope: str = 'model'):
  r"""``log_alphas -> violations``: the expected size of :func:`expected_size` minus its target, ``≤ 0`` when met.

  Args:
    unit_map, variables: the network (its shapes only).
    target_density: ``ε`` ∈ (0, 1], the fraction of kernel entries to keep;
    target_macs: or ``μ`` ∈ (0, 1], the fraction of the MACs (one of the two).
    scope: ``'model'``: one constraint (a scalar); ``'layer'``: one per gated
      kernel, ``{kernel: E_k/N_k − target}`` (a layer's MACs and entries
      shrink together, so both targets mean the same there).

  Example: :func:`expected_size`'s.
  """
  if (target_density is None) == (target_macs is None):
    raise ValueError('Give one of `target_density` and `target_macs` (the fraction of kernel entries or of '
                     f'multiply-accumulates to keep); got target_density={target_density}, '
                     f'target_macs={target_macs}.')
  name, target = ('target_density', target_density) if target_macs is None else ('target_macs', target_macs)
  if not isinstance(target, (int, float)) or isinstance(target, bool) or not 0.0 < target <= 1.0:
    raise ValueError(f'`{name}` must be a number in (0, 1], a fraction of the ungated network; got {target!r}.')
  if scope not in SCOPES:
    raise ValueError(f'`scope` must be one of {SCOPES}, got {scope!r}.')
  measure = 'density' if target_macs is None else 'macs'

  def violations(log_alphas):
    size = expected_size(unit_map, variables, {n: l0.prob_active(a) for n, a in log_alphas.items()})
    if scope == 'model':
      return size[measure] - target
    return {k: v - target for k, v in size['layers'].items()}

  return violations


def summary(variables: Any, unit_map: structure.UnitMap, log_alphas: Mapping[str, jax.Array]) -> dict[str, float]:
  """The sizes of a gated network, each a fraction of the ungated one's.

  * ``expected_density``, ``expected_macs``: :func:`expected_size` under the
    gates' distribution (what the constraints see);
  * ``purged_density``: the kernel entries of the network :func:`purge` gives;
  * ``purged_params``, ``purged_macs``: its params (biases and norms included)
    and multiply-accumulates, by the unit map's count.

  Once the gates are 0 or 1 the expected and purged sizes agree (but for the
  one unit a layer keeps when every gate of it is shut).
  """
  expected = expected_size(unit_map, variables, {n: l0.prob_active(a) for n, a in log_alphas.items()})
  keep = structure.resolve_keep(unit_map, _keep(unit_map, log_alphas))
  purged = expected_size(unit_map, variables, {n: keep[n].astype(np.float32) for n in log_alphas})
  params, macs = structure.count(unit_map, variables, keep)
  full_params, full_macs = structure.count(unit_map, variables)
  return {'expected_density': float(expected['density']), 'expected_macs': float(expected['macs']),
          'purged_density': float(purged['density']), 'purged_params': params / full_params,
          'purged_macs': macs / full_macs}
