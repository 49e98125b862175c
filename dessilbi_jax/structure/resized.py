"""Any traced Flax module with narrower arrays: the removed network of a model without a rebuild rule.

A Flax layer reads its widths from its fields (``nn.Dense(features=16)``)
only to create its parameters; its computation takes them from the arrays
(``x @ kernel``, a norm over ``x.shape[-1]``). So the removed network of a
model the tracer follows is the same module applied to the sliced variables,
with Flax's check "an existing parameter has the shape the fields imply"
lifted while it runs (:func:`narrower_arrays`), and a grouped convolution's
``feature_group_count`` read off its kernel. :class:`Resized` is that module:
``apply`` as the original's, ``init`` the original's initializers sliced like
the variables. Saving it (:func:`dessilbi_jax.structure.save_compact`) exports
the computation with ``jax.export``, so it loads without the user's class.

Example::

  >>> import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
  >>> from dessilbi_jax import structure
  >>> class Net(nn.Module):
  ...   @nn.compact
  ...   def __call__(self, x):
  ...     h = nn.relu(nn.Dense(5)(x))
  ...     return nn.Dense(2)(h)
  >>> x = jnp.ones((3, 4))
  >>> variables = Net().init(jax.random.key(0), x)
  >>> unit_map = structure.trace(Net(), variables, x)
  >>> small, small_vars, _ = structure.remove(Net(), variables, unit_map, {'Dense_0': np.arange(5) < 3})
  >>> type(small).__name__, small_vars['params']['Dense_1']['kernel'].shape, small.apply(small_vars, x).shape
  ('Resized', (3, 2), (3, 2))
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import flax.linen as nn
from flax.core import meta
from flax.core import scope as flax_scope

_LOCK = threading.RLock()
_DEPTH = [0]


def _param_as_stored(original):
  def param(self, name, init_fn, *init_args, unbox=True, **init_kwargs):
    if self.has_variable('params', name):  # the stored array decides the shape
      self.reserve(name, 'params')
      value = self.get_variable('params', name)
      return meta.unbox(value) if unbox else value
    return original(self, name, init_fn, *init_args, unbox=unbox, **init_kwargs)
  param.original = original
  return param


def _conv_groups_from_kernel(next_fun, args, kwargs, context):
  """A grouped conv whose channels were removed: its group count is its input width over the kernel's."""
  module = context.module
  if (context.method_name == '__call__' and isinstance(module, nn.Conv) and module.feature_group_count != 1
      and module.has_variable('params', 'kernel') and args):
    kernel = module.get_variable('params', 'kernel')
    groups = args[0].shape[-1] // kernel.shape[-2]
    if groups != module.feature_group_count:
      object.__setattr__(module, 'feature_group_count', groups)
      object.__setattr__(module, 'features', kernel.shape[-1])
  return next_fun(*args, **kwargs)


@contextlib.contextmanager
def narrower_arrays():
  """While active, Flax modules take their parameters' shapes from the variables passed to ``apply``."""
  with _LOCK:
    if _DEPTH[0] == 0:
      flax_scope.Scope.param = _param_as_stored(flax_scope.Scope.param)
    _DEPTH[0] += 1
  try:
    with nn.intercept_methods(_conv_groups_from_kernel):
      yield
  finally:
    with _LOCK:
      _DEPTH[0] -= 1
      if _DEPTH[0] == 0:
        flax_scope.Scope.param = flax_scope.Scope.param.original


class Resized:
  """``module`` applied to narrower variables than its fields imply (see the module docstring).

  Attributes:
    module: the original Flax module.
    shrink: ``shrink(variables) -> variables`` of the original's shapes sliced to this network's.
    apply_kwargs: the keyword arguments it was traced with (eval mode), used by ``save_compact``.
  """

  def __init__(self, module, shrink: Callable[[Any], Any], apply_kwargs: dict | None = None):
    self.module = module
    self.shrink = shrink
    self.apply_kwargs = dict(apply_kwargs or {})

  def apply(self, variables, *args, **kwargs):
    with narrower_arrays():
      return self.module.apply(variables, *args, **kwargs)

  def init(self, rngs, *args, **kwargs):
    """The original's initial variables, sliced to this network's units."""
    return self.shrink(self.module.init(rngs, *args, **kwargs))

  def __getattr__(self, name):  # the original's fields (num_classes, ...)
    if name in ('module', 'shrink', 'apply_kwargs'):
      raise AttributeError(name)
    return getattr(self.module, name)

  def __repr__(self):
    return f'Resized({type(self.module).__name__})'
