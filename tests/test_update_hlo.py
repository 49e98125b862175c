"""The compiled update writes every buffer in place: no copies (see optimizer._after).

A regression test of the structure that makes the update fast on CPU, not a
timing: with params and state donated, XLA must not copy W, Z or Γ.
"""

import jax
import jax.numpy as jnp
import optax
import pytest

import dessilbi_jax as dl
from dessilbi_jax.optimizer import _after


def _entry_copies(tx, params):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  hlo = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile().as_text()
  return hlo[hlo.index('ENTRY'):].count(' copy(')


def _params():
  keys = jax.random.split(jax.random.key(0), 4)
  return {
      'conv': {'kernel': jax.random.normal(keys[0], (3, 3, 16, 32)), 'bias': jnp.zeros(32)},
      'dense': {'kernel': jax.random.normal(keys[1], (128, 64)), 'bias': jnp.zeros(64)},
      'attn': {'kernel': jax.random.normal(keys[2], (64, 4, 16))},
  }


@pytest.mark.parametrize('kwargs', [
    dict(),
    dict(nesterov=True, weight_decay=1e-4),
    dict(groups={'dense/kernel': 'neuron', 'attn/kernel': 'head'}, normalize_groups=True),
    dict(groups={'dense/kernel': 'input'}, momentum=0.0),
])
def test_update_compiles_without_copies(kwargs):
  assert _entry_copies(dl.dessilbi(0.1, **kwargs), _params()) == 0


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16, jnp.float16])
def test_ordering_edge_adds_an_exact_zero(dtype):
  """`_after(x, token)` is bit-identical to x, also for huge or infinite tokens."""
  x = jax.random.normal(jax.random.key(0), (1000,)).astype(dtype)
  overflowed = jnp.sum(jnp.full((4,), 6e4, jnp.float16))   # inf in float16
  for token in (jnp.float32(3.0), jnp.float32(-1e30), overflowed, jnp.asarray(-2.5, dtype)):
    out = jax.jit(_after)(x, token)
    assert out.dtype == x.dtype
    assert jnp.array_equal(out, x)
