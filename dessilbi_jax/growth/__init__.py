"""Growing networks along the DessiLBI path (Fu et al., TPAMI 2022, arXiv:1905.09449).

Start narrow; every ``grow_every`` epochs widen each layer whose filters are
nearly all in Γ's support; stop at the first check where none is; fine-tune.

* :mod:`dessilbi_jax.growth.rule`: the growth rule, a pure function of the
  support rates and widths (:func:`next_widths`), and its settings
  (:class:`GrowthSettings`);
* :mod:`dessilbi_jax.growth.extension`: the training-loop extension that
  widens the network in place at the checks (:func:`growth_extension`);
* :mod:`dessilbi_jax.growth.command`: ``dessilbi grow`` as a function
  (:func:`grow`), the datasets' growth presets, the budget
  (:func:`resolve_budget`) and the cost of growing (:func:`training_cost`).
"""

from dessilbi_jax.growth.command import GROW_PRESETS
from dessilbi_jax.growth.command import grow
from dessilbi_jax.growth.command import grow_preset
from dessilbi_jax.growth.command import forward_macs
from dessilbi_jax.growth.command import load_settings
from dessilbi_jax.growth.command import reference_config
from dessilbi_jax.growth.command import resolve_budget
from dessilbi_jax.growth.command import training_cost
from dessilbi_jax.growth.extension import growable_layers
from dessilbi_jax.growth.extension import growth_extension
from dessilbi_jax.growth.extension import support_rates
from dessilbi_jax.growth.extension import training_macs
from dessilbi_jax.growth.rule import GrowthSettings
from dessilbi_jax.growth.rule import Layer
from dessilbi_jax.growth.rule import grown_width
from dessilbi_jax.growth.rule import next_widths

__all__ = ('GROW_PRESETS', 'GrowthSettings', 'Layer', 'forward_macs', 'grow', 'grow_preset', 'growable_layers',
           'growth_extension', 'grown_width', 'load_settings', 'next_widths', 'reference_config', 'resolve_budget',
           'support_rates', 'training_cost', 'training_macs')
