"""Structure: the unit map of a network and the operations on it (see ``docs/STRUCTURE.md``).

* :mod:`~dessilbi_jax.structure.unit_map`: the types, :class:`Slice`,
  :class:`UnitGroup`, :class:`UnitMap`;
* :mod:`~dessilbi_jax.structure.trace`: :func:`trace` derives a model's map from its jaxpr;
* :mod:`~dessilbi_jax.structure.surgery`: :func:`remove`, :func:`zero`,
  :func:`widen`, :func:`gate` whole units (and :func:`unit_masks`,
  :func:`resolve_keep`);
* :mod:`~dessilbi_jax.structure.folding`: the constants removed units still emit, folded
  into their readers' biases (:class:`InexactRemovalError` where they cannot be);
* :mod:`~dessilbi_jax.structure.resized`: :class:`Resized`, the removed network of a
  model without a rebuild rule (the same module on narrower arrays);
* :mod:`~dessilbi_jax.structure.count`: :func:`count`, params and MACs of the mapped network;
* :mod:`~dessilbi_jax.structure.masks`: keep-masks from Γ's support, a ticket's
  or GMP's weight masks, gates (:func:`keep_from_support`, ...);
* :mod:`~dessilbi_jax.structure.export`: :func:`save_compact` / :func:`load_compact` (zoo
  models by name and widths, any other as a ``jax.export`` program);
* :mod:`~dessilbi_jax.train.compact`: a run's compact network (its metrics, ``dessilbi compact``);
* :mod:`~dessilbi_jax.structure.zoo`: how the zoo's models are rebuilt with new widths.
"""

from dessilbi_jax.structure.count import count
from dessilbi_jax.structure.export import load_compact
from dessilbi_jax.structure.export import save_compact
from dessilbi_jax.structure.folding import InexactRemovalError
from dessilbi_jax.structure.masks import keep_from_gates
from dessilbi_jax.structure.masks import keep_from_gmp
from dessilbi_jax.structure.masks import keep_from_support
from dessilbi_jax.structure.masks import keep_from_weights
from dessilbi_jax.structure.resized import Resized
from dessilbi_jax.structure.surgery import gate
from dessilbi_jax.structure.surgery import remove
from dessilbi_jax.structure.surgery import resolve_keep
from dessilbi_jax.structure.surgery import unit_masks
from dessilbi_jax.structure.surgery import widen
from dessilbi_jax.structure.surgery import zero
from dessilbi_jax.structure.trace import UntraceableError
from dessilbi_jax.structure.trace import trace
from dessilbi_jax.structure.unit_map import Slice
from dessilbi_jax.structure.unit_map import UnitGroup
from dessilbi_jax.structure.unit_map import UnitMap

__all__ = ('InexactRemovalError', 'Resized', 'Slice', 'UnitGroup', 'UnitMap', 'UntraceableError', 'count', 'gate', 'keep_from_gates', 'keep_from_gmp',
           'keep_from_support', 'keep_from_weights', 'load_compact', 'remove', 'resolve_keep', 'save_compact', 'trace',
           'unit_masks', 'widen', 'zero')
