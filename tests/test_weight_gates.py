"""Gates on weight groups: a gated network equals a hand-gated forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dessilbi_jax import l0
from dessilbi_jax import models
from dessilbi_jax.l0 import weight_gates

MODEL = models.MLP(widths=(6,), num_classes=3)
X = jax.random.normal(jax.random.key(9), (7, 4))


@pytest.fixture(scope='module')
def params():
  return MODEL.init(jax.random.key(0), X)['params']


def test_input_gates_scale_the_inputs_each_layer_sees(params):
  kinds = weight_gates.resolve_gated(params, {'kernel': 'input'})
  assert kinds == {'Dense_0/kernel': 'input', 'Dense_1/kernel': 'input'}
  z = {'Dense_0/kernel': jnp.array([[1.0], [0.0], [0.5], [1.0]]),
       'Dense_1/kernel': jnp.array([[0.0], [1.0], [0.25], [1.0], [1.0], [0.0]])}
  logits = MODEL.apply({'params': weight_gates.gate_weights(params, z, kinds)}, X)
  # By hand in NumPy: gating input neuron i of a dense layer multiplies its input i.
  p = jax.tree.map(np.asarray, params)
  h = np.maximum((np.asarray(X) * z['Dense_0/kernel'][:, 0]) @ p['Dense_0']['kernel'] + p['Dense_0']['bias'], 0)
  expected = (h * np.asarray(z['Dense_1/kernel'][:, 0])) @ p['Dense_1']['kernel'] + p['Dense_1']['bias']
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


def test_neuron_gates_and_per_weight_gates(params):
  kinds = weight_gates.resolve_gated(params, {'Dense_0/kernel': 'neuron', 'Dense_1/kernel': 'lasso'})
  assert weight_gates.group_sizes(params, kinds) == {'Dense_0/kernel': 4, 'Dense_1/kernel': 1}
  z = {'Dense_0/kernel': jnp.array([[1.0, 0.0, 1.0, 0.0, 1.0, 1.0]]),
       'Dense_1/kernel': jax.random.bernoulli(jax.random.key(1), 0.5, (6, 3)).astype(jnp.float32)}
  gated = weight_gates.gate_weights(params, z, kinds)
  np.testing.assert_array_equal(gated['Dense_0']['kernel'], params['Dense_0']['kernel'] * z['Dense_0/kernel'])
  np.testing.assert_array_equal(gated['Dense_1']['kernel'], params['Dense_1']['kernel'] * z['Dense_1/kernel'])
  np.testing.assert_array_equal(gated['Dense_0']['bias'], params['Dense_0']['bias'])   # not gated


def test_init_gates_rescales_gated_weights_only(params):
  kinds = weight_gates.resolve_gated(params, {'Dense_0/kernel': 'input'})
  rescaled, log_alphas = weight_gates.init_gates(jax.random.key(2), params, kinds, droprate_init=0.3)
  np.testing.assert_allclose(rescaled['Dense_0']['kernel'], params['Dense_0']['kernel'] / 0.7, rtol=1e-6)
  np.testing.assert_array_equal(rescaled['Dense_1']['kernel'], params['Dense_1']['kernel'])
  assert log_alphas['Dense_0/kernel'].shape == (4, 1)
  np.testing.assert_allclose(log_alphas['Dense_0/kernel'], np.log(0.7 / 0.3), atol=0.05)
  # Expected density of the gated layer at init: P(z ≠ 0) at log_α ≈ log(7/3).
  sizes = weight_gates.group_sizes(params, kinds)
  assert float(l0.model_density(log_alphas, sizes)) == pytest.approx(0.92, abs=0.01)


def test_gated_gradient_reaches_the_gates(params):
  # The gates' gradient of the loss is nonzero and flows through z = f(log_α, u).
  kinds = weight_gates.resolve_gated(params, {'kernel': 'input'})
  _, log_alphas = weight_gates.init_gates(jax.random.key(2), params, kinds, droprate_init=0.5)

  def loss(log_alphas):
    z = l0.sample_gates_tree(jax.random.key(5), log_alphas)
    return jnp.sum(MODEL.apply({'params': weight_gates.gate_weights(params, z, kinds)}, X) ** 2)

  grads = jax.jit(jax.grad(loss))(log_alphas)
  assert all(np.all(np.isfinite(g)) and np.any(g != 0) for g in grads.values())


def test_bad_gate_requests_are_named(params):
  with pytest.raises(ValueError, match="groups=\\{'kernel': 'input'\\}"):
    weight_gates.resolve_gated(params, None)
  with pytest.raises(ValueError, match='gates no leaf'):
    weight_gates.resolve_gated(params, lambda path, leaf: None)
  with pytest.raises(ValueError, match='match no parameter'):   # the grouping rule's own check
    weight_gates.resolve_gated(params, {'Conv_0/kernel': 'filter'})
  kinds = weight_gates.resolve_gated(params, {'kernel': 'input'})
  with pytest.raises(ValueError, match=r"gated leaves are \['Dense_0/kernel', 'Dense_1/kernel'\]"):
    weight_gates.gate_weights(params, {'Dense_0/kernel': jnp.ones((4, 1))}, kinds)
