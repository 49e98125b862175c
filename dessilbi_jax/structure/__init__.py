"""Structure: the unit map of a network and the operations on it (see ``STRUCTURE.md``).

* :mod:`~dessilbi_jax.structure.unit_map`: the types, :class:`Slice`,
  :class:`UnitGroup`, :class:`UnitMap`;
* :mod:`~dessilbi_jax.structure.trace`: :func:`trace` derives a model's map from its jaxpr;
* :mod:`~dessilbi_jax.structure.zoo`: how the zoo's models are rebuilt with new widths.
"""

from dessilbi_jax.structure.trace import UntraceableError
from dessilbi_jax.structure.trace import trace
from dessilbi_jax.structure.unit_map import Slice
from dessilbi_jax.structure.unit_map import UnitGroup
from dessilbi_jax.structure.unit_map import UnitMap

__all__ = ('Slice', 'UnitGroup', 'UnitMap', 'UntraceableError', 'trace')
