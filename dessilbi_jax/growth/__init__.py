"""Growing networks along the DessiLBI path (Fu et al., TPAMI 2022, arXiv:1905.09449).

Start narrow; every ``grow_every`` epochs widen each layer whose filters are
nearly all in Γ's support; stop at the first check where none is; fine-tune.

* :mod:`dessilbi_jax.growth.rule`: the growth rule, a pure function of the
  support rates and widths (:func:`next_widths`), and its settings
  (:class:`GrowthSettings`).
"""

from dessilbi_jax.growth.rule import GrowthSettings
from dessilbi_jax.growth.rule import Layer
from dessilbi_jax.growth.rule import grown_width
from dessilbi_jax.growth.rule import next_widths

__all__ = ('GrowthSettings', 'Layer', 'grown_width', 'next_widths')
