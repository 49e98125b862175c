"""A small Vision Transformer (Dosovitskiy et al., 2021) with its widths per block.

Patches of ``patch_size`` x ``patch_size`` pixels are embedded by a strided
convolution, a learned class token is prepended and learned position
embeddings added; pre-LayerNorm blocks
(:class:`~dessilbi_jax.models.transformer.TransformerBlock`), a final
LayerNorm, and a dense classifier on the class token. ``widths`` are the MLP
widths of the blocks and ``heads`` their numbers of heads (of ``head_dim``
each; default 4 per block), so a network with heads or neurons removed is
the same class.

The default on the 8 x 8 digits: 4 patches of 4 x 4 plus the class token,
stream width 64, 4 blocks of 4 heads of 16 and an MLP of 256 (202,186
parameters).

Example::

  >>> import jax, jax.numpy as jnp
  >>> from dessilbi_jax.models import ViT, count_params
  >>> model = ViT(num_classes=10)
  >>> x = jnp.zeros((2, 8, 8, 1))
  >>> variables = jax.eval_shape(model.init, jax.random.key(0), x)
  >>> count_params(variables), jax.eval_shape(model.apply, variables, x).shape
  (202186, (2, 10))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from dessilbi_jax.models.transformer import TransformerBlock, block_heads, check_block_widths


class ViT(nn.Module):
  """Vision Transformer: patch embedding, class token, pre-LN blocks, classifier on the class token."""
  widths: Sequence[int] = (256, 256, 256, 256)
  heads: Optional[Sequence[int]] = None   # per block; None: 4 in every block
  num_classes: int = 10
  dim: int = 64
  head_dim: int = 16
  patch_size: int = 4

  def __post_init__(self):
    check_block_widths('vit', self.widths, self.heads, ViT.widths)
    super().__post_init__()

  block_heads = property(block_heads)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # no dropout or batch norm; the zoo's signature
    p = self.patch_size
    if x.shape[1] % p or x.shape[2] % p:
      raise ValueError(f'vit: the image sides {x.shape[1:3]} must be multiples of patch_size {p}.')
    x = nn.Conv(self.dim, (p, p), strides=p, padding='VALID', name='patch_embed')(x)
    x = x.reshape(x.shape[0], -1, self.dim)
    cls = self.param('cls_token', nn.initializers.zeros, (1, 1, self.dim))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.dim)), x], axis=1)
    x = x + self.param('pos_embedding', nn.initializers.normal(0.02), (1, x.shape[1], self.dim))
    for i, (width, heads) in enumerate(zip(self.widths, self.block_heads)):
      x = TransformerBlock(self.dim, heads, self.head_dim, width, name=f'Block_{i}')(x)
    x = nn.LayerNorm(name='norm')(x)
    return nn.Dense(self.num_classes, name='classifier')(x[:, 0])
