"""A small causal decoder (GPT, Radford et al., 2019) over tokens, with its widths per block.

Token and learned position embeddings, causal pre-LayerNorm blocks
(:class:`~dessilbi_jax.models.transformer.TransformerBlock`), a final
LayerNorm and a dense layer to the next token's logits at every position.
``num_classes`` is the vocabulary (256 for bytes), ``context`` the longest
sequence (token ids, integers or floats holding integers), ``widths`` the MLP widths of the blocks and ``heads`` their numbers
of heads (of ``head_dim`` each; default 4 per block).

The default: byte-level, context 64, stream width 64, 4 blocks of 4 heads of
16 and an MLP of 256 (237,184 parameters).

Example::

  >>> import jax, jax.numpy as jnp
  >>> from dessilbi_jax.models import GPT, count_params
  >>> model = GPT(num_classes=256)
  >>> tokens = jnp.zeros((2, 64), jnp.int32)
  >>> variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
  >>> count_params(variables), jax.eval_shape(model.apply, variables, tokens).shape
  (237184, (2, 64, 256))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from dessilbi_jax.models.transformer import TransformerBlock, block_heads, check_block_widths


class GPT(nn.Module):
  """Causal decoder: token + position embeddings, causal pre-LN blocks, next-token logits."""
  widths: Sequence[int] = (256, 256, 256, 256)
  heads: Optional[Sequence[int]] = None   # per block; None: 4 in every block
  num_classes: int = 256
  context: int = 64
  dim: int = 64
  head_dim: int = 16

  def __post_init__(self):
    check_block_widths('gpt', self.widths, self.heads, GPT.widths)
    super().__post_init__()

  block_heads = property(block_heads)

  @nn.compact
  def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    del train
    if tokens.ndim != 2:
      raise ValueError(f'gpt takes token ids of shape (batch, length); got shape {tokens.shape}.')
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      tokens = tokens.astype(jnp.int32)  # ids as floats, the way the data pipeline hands every input over
    length = tokens.shape[1]
    if length > self.context:
      raise ValueError(f'gpt: a sequence of {length} tokens is longer than the context of {self.context}.')
    x = nn.Embed(self.num_classes, self.dim, name='token_embed')(tokens)
    positions = self.param('pos_embedding', nn.initializers.normal(0.02), (self.context, self.dim))
    x = x + (positions if length == self.context else positions[:length])
    for i, (width, heads) in enumerate(zip(self.widths, self.block_heads)):
      x = TransformerBlock(self.dim, heads, self.head_dim, width, causal=True, name=f'Block_{i}')(x)
    x = nn.LayerNorm(name='norm')(x)
    return nn.Dense(self.num_classes, name='classifier')(x)
