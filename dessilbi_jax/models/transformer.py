"""The pre-LayerNorm transformer block of the zoo's ViT and decoder, with per-block widths.

One block adds to the residual stream ``x`` (width ``dim``)::

  x = x + Attention(LayerNorm(x))     # `heads` heads of `head_dim`, causal for a decoder
  x = x + MLP(LayerNorm(x))           # dim -> mlp_width -> dim, GELU

``heads = 0`` or ``mlp_width = 0`` leaves that half out (the block adds nothing
there): what a network with every head or neuron of a layer removed computes.

Example::

  >>> import jax, jax.numpy as jnp
  >>> from dessilbi_jax.models.transformer import TransformerBlock
  >>> block = TransformerBlock(dim=8, heads=2, head_dim=4, mlp_width=16, causal=True)
  >>> x = jnp.ones((1, 5, 8))
  >>> variables = jax.eval_shape(block.init, jax.random.key(0), x)
  >>> sorted(variables['params']), variables['params']['attention']['query']['kernel'].shape
  (['attention', 'mlp_down', 'mlp_up', 'norm_attention', 'norm_mlp'], (8, 2, 4))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class TransformerBlock(nn.Module):
  """One pre-LayerNorm block: multi-head self-attention and an MLP, each added to the stream."""
  dim: int
  heads: int
  head_dim: int
  mlp_width: int
  causal: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.heads:
      mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32)) if self.causal else None
      y = nn.LayerNorm(name='norm_attention')(x)
      x = x + nn.MultiHeadDotProductAttention(
          num_heads=self.heads, qkv_features=self.heads * self.head_dim, out_features=self.dim,
          name='attention')(y, mask=mask)
    if self.mlp_width:
      y = nn.LayerNorm(name='norm_mlp')(x)
      y = nn.gelu(nn.Dense(self.mlp_width, name='mlp_up')(y))
      x = x + nn.Dense(self.dim, name='mlp_down')(y)
    return x


# DessiLBI's groups on the zoo's transformers (``dl.dessilbi(groups=...)``): a structure variable per
# attention head on the query, key and value kernels (D, H, K) and per hidden neuron on the MLP's
# up-projection (D, F); the residual stream's leaves (embeddings, output projections, LayerNorms,
# classifier) are trained without one, as the stream is kept whole.
GROUPS = {
    r'attention/(query|key|value)/kernel$': 'head',
    r'mlp_up/kernel$': 'neuron',
    r'.*': None,
}


def block_heads(model) -> tuple[int, ...]:
  """The heads of each block of ``model``: its ``heads``, or 4 per block."""
  if model.heads is None:
    return (4,) * len(model.widths) if isinstance(model.widths, (tuple, list)) else ()
  return tuple(model.heads) if isinstance(model.heads, (tuple, list)) else model.heads


def check_block_widths(model: str, widths: Any, heads: Any, default_widths: Sequence[int]) -> None:
  """ValueError unless ``widths`` (MLP per block) and ``heads`` (per block; ``None``: 4) are equally many ints >= 0."""
  def ok(values):
    return (isinstance(values, (tuple, list)) and len(values) > 0
            and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in values))
  if not ok(widths):
    raise ValueError(f'{model} widths must be a tuple of non-negative integers, the MLP width of each block '
                     f'(0: no MLP), e.g. the default {tuple(default_widths)}; got {widths!r}.')
  if heads is not None and not ok(heads):
    raise ValueError(f'{model} heads must be a tuple of non-negative integers, the attention heads of each block '
                     f'(0: no attention), e.g. {(4,) * len(widths)}; got {heads!r}.')
  if heads is not None and len(widths) != len(heads):
    raise ValueError(f'{model} needs as many heads as widths, one per block; got {len(heads)} heads {tuple(heads)} '
                     f'and {len(widths)} widths {tuple(widths)}.')
