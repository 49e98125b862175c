"""Transformers: attention heads and MLP neurons in the unit map, the zoo's ViT and decoder, text data, DessiLBI."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dessilbi_jax as dl
from dessilbi_jax import data, models, structure

D, H, K = 16, 4, 4


def _small(name):
  if name == 'vit':
    model = models.ViT(widths=(8, 8), heads=(H, H), dim=D, head_dim=K)
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
  else:
    model = models.GPT(widths=(8, 8), heads=(H, H), dim=D, head_dim=K, context=12, num_classes=32)
    x = jax.random.randint(jax.random.key(1), (3, 12), 0, 32)
  return model, _perturbed(jax.jit(model.init)(jax.random.key(0), x)), x


@jax.jit
def _perturbed(variables):
  # LayerNorm scales and biases away from 1 and 0, biases non-zero: nothing cancels by symmetry.
  return jax.tree.map(lambda a: a + 0.2 * jax.random.normal(jax.random.key(2), a.shape), variables)


def _half(unit_map, seed=0):
  rng = np.random.default_rng(seed)
  keep = {}
  for g in unit_map.prunable():
    mask = np.zeros(g.size, bool)
    mask[rng.permutation(g.size)[:g.size // 2]] = True
    keep[g.name] = mask
  return keep


@pytest.fixture(scope='module', params=['vit', 'gpt'])
def traced(request):
  model, variables, x = _small(request.param)
  return request.param, model, variables, x, structure.trace(model, variables, x)


def test_the_map_has_heads_neurons_and_one_stream_kept_whole(traced):
  name, _, _, _, unit_map = traced
  heads = [g for g in unit_map.groups if g.kind == 'head']
  assert [g.name for g in heads] == ['Block_0/attention/query', 'Block_1/attention/query']
  head = heads[0]
  assert head.size == H and head.prunable and not head.is_stream
  got = sorted((s.path[2:], s.axis, s.role) for s in head.slices)
  assert got == [(('key', 'bias'), 0, 'bias'), (('key', 'kernel'), 1, 'producer'),
                 (('out', 'kernel'), 0, 'consumer'), (('query', 'bias'), 0, 'bias'),
                 (('query', 'kernel'), 1, 'producer'), (('value', 'bias'), 0, 'bias'),
                 (('value', 'kernel'), 1, 'producer')]
  mlp = unit_map['Block_0/mlp_up']
  assert mlp.size == 8 and mlp.kind is None and sorted((s.path, s.axis, s.role) for s in mlp.slices) == [
      (('Block_0', 'mlp_down', 'kernel'), 0, 'consumer'), (('Block_0', 'mlp_up', 'bias'), 0, 'bias'),
      (('Block_0', 'mlp_up', 'kernel'), 1, 'producer')]
  (stream,) = [g for g in unit_map.groups if g.is_stream]
  assert stream.size == D and not stream.prunable and 'LayerNorm' in stream.reason
  producers = {s.path[:-1] for s in stream.producers}
  assert producers == {('patch_embed',) if name == 'vit' else ('token_embed',)} | {
      (f'Block_{i}', *p) for i in range(2) for p in (('attention', 'out'), ('mlp_down',))}
  norms = {s.path for s in stream.slices if s.role == 'norm'}
  assert norms == {(*m, leaf) for m in [('Block_0', 'norm_attention'), ('Block_0', 'norm_mlp'),
                                         ('Block_1', 'norm_attention'), ('Block_1', 'norm_mlp'), ('norm',)]
                   for leaf in ('scale', 'bias')}
  extra = {s.path for s in stream.slices if s.role == 'bias' and len(s.path) == 1}
  assert extra == ({('cls_token',), ('pos_embedding',)} if name == 'vit' else {('pos_embedding',)})
  # Every array of the network is accounted for along its unit axes.
  for path, leaf in structure.surgery._paths(traced[2]['params']).items():  # pylint: disable=protected-access
    assert any(s.path == path for g in unit_map.groups for s in g.slices), path


def test_half_the_heads_and_neurons_removed_give_the_masked_logits(traced):
  """The bar of the issue: max |compact - masked| <= 1e-5 in float32."""
  _, model, variables, x, unit_map = traced
  keep = _half(unit_map)
  tx = optax.chain(optax.scale_by_adam(), dl.dessilbi(0.1, momentum=0.0, groups=models.default_groups('vit')))
  state = tx.init(variables['params'])
  small, small_vars, small_state = structure.remove(model, variables, unit_map, keep, state)
  assert small.heads == (H // 2, H // 2) and small.widths == (4, 4)
  masked = structure.zero(variables, unit_map, keep)
  apply = jax.jit(model.apply)
  compact_logits = jax.jit(small.apply)(small_vars, x)
  assert float(jnp.max(jnp.abs(compact_logits - apply(masked, x)))) <= 1e-5
  assert float(jnp.max(jnp.abs(compact_logits - apply(variables, x)))) > 1e-2  # the heads mattered
  # Head h of every projection is the kept head's slice (by hand, not through the map).
  kept = np.flatnonzero(keep['Block_0/attention/query'])
  attention = variables['params']['Block_0']['attention']
  small_attention = small_vars['params']['Block_0']['attention']
  np.testing.assert_array_equal(small_attention['value']['kernel'], attention['value']['kernel'][:, kept])
  np.testing.assert_array_equal(small_attention['out']['kernel'], attention['out']['kernel'][kept])
  # The optimizer state is cut like the params: Adam's moments and DessiLBI's per-head state.
  assert jax.tree.map(np.shape, small_state[0].mu) == jax.tree.map(np.shape, small_vars['params'])
  assert small_state[1].entry_step['Block_0']['attention']['key']['kernel'].shape == (1, H // 2, 1)
  # Counts: the map's params and MACs are the compact network's.
  params, macs = structure.count(unit_map, variables, keep)
  assert params == models.count_params(small_vars['params'])
  assert macs == models.count_flops(small, x.shape[1:])


def test_a_gated_head_scales_its_output(traced):
  """gate(z) on a head multiplies its contribution to the output projection: the output is affine in z."""
  _, model, variables, x, unit_map = traced
  name = 'Block_0/attention/query'

  @jax.jit
  def captured(z):
    gated = structure.gate(variables, unit_map, {name: z})
    _, state = model.apply(gated, x, capture_intermediates=True, mutable=['intermediates'])
    return state['intermediates']['Block_0']['attention']['__call__'][0]

  attention_out = lambda z: np.asarray(captured(jnp.asarray(z, jnp.float32)), np.float64)

  base = attention_out(np.zeros(H))
  z = np.array([0.3, 1.0, 0.0, 0.7])
  expected = base + sum(z[h] * (attention_out(np.eye(H)[h]) - base) for h in range(H))
  np.testing.assert_allclose(attention_out(z), expected, atol=2e-5)
  _, plain = model.apply(variables, x, capture_intermediates=True, mutable=['intermediates'])
  np.testing.assert_allclose(attention_out(np.ones(H)), plain['intermediates']['Block_0']['attention']['__call__'][0],
                             atol=1e-5)


class _IssueBlock(nn.Module):
  """The block of the issue: LayerNorm, nn.MultiHeadDotProductAttention(num_heads=4), an MLP, residuals."""
  heads: int = 4

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dense(D)(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.heads * K, out_features=D)(
        nn.LayerNorm()(x))
    x = x + nn.Dense(D)(nn.gelu(nn.Dense(12)(nn.LayerNorm()(x))))
    return nn.Dense(3)(x.mean(axis=1))


def test_the_issue_block_traces_and_zeroing_a_head_is_the_flax_module_without_it():
  model, x = _IssueBlock(), jax.random.normal(jax.random.key(3), (2, 5, 6))
  variables = _perturbed(jax.jit(model.init)(jax.random.key(0), x))
  unit_map = structure.trace(model, variables, x)
  head = unit_map['MultiHeadDotProductAttention_0/query']
  assert head.kind == 'head' and head.size == 4 and unit_map['Dense_2'].size == 12
  keep = {head.name: np.array([True, False, True, True])}
  # The reference: Flax's own module with 3 heads and the head's slices deleted by hand.
  params = jax.tree.map(np.asarray, variables['params'])
  attention = params['MultiHeadDotProductAttention_0']
  for proj in ('query', 'key', 'value'):
    attention[proj] = {'kernel': np.delete(attention[proj]['kernel'], 1, axis=1),
                       'bias': np.delete(attention[proj]['bias'], 1, axis=0)}
  attention['out']['kernel'] = np.delete(attention['out']['kernel'], 1, axis=0)
  reference = jax.jit(_IssueBlock(heads=3).apply)({'params': params}, x)
  np.testing.assert_allclose(jax.jit(model.apply)(structure.zero(variables, unit_map, keep), x), reference,
                             atol=1e-5)


class _EinsumAttention(nn.Module):
  """Attention written with einsums on (D, H, K) parameters: causal self-attention, or cross-attention."""
  heads: int = H
  cross: bool = False

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dense(D)(x)
    queries, context = (x[:, :3], nn.Dense(D)(x[:, 3:])) if self.cross else (x, x)
    init = nn.initializers.normal(0.5)
    wq, wk, wv = (self.param(n, init, (D, self.heads, K)) for n in ('wq', 'wk', 'wv'))
    wo = self.param('wo', init, (self.heads, K, D))
    q = jnp.einsum('btd,dhk->bthk', queries, wq)
    k = jnp.einsum('btd,dhk->bthk', context, wk)
    v = jnp.einsum('btd,dhk->bthk', context, wv)
    scores = jnp.einsum('bqhk,bshk->bhqs', q, k) / np.sqrt(K)
    if not self.cross:
      scores = jnp.where(jnp.tril(jnp.ones((x.shape[1],) * 2, bool)), scores, -1e9)
    y = jnp.einsum('bhqs,bshk->bqhk', jax.nn.softmax(scores, axis=-1), v)
    return nn.Dense(3)(jnp.einsum('bqhk,hkd->bqd', y, wo) + queries)


@pytest.mark.parametrize('cross', [False, True], ids=['causal_self', 'cross'])
def test_einsum_attention_heads_are_units_and_zeroing_is_removal(cross):
  model, x = _EinsumAttention(cross=cross), jax.random.normal(jax.random.key(5), (2, 6, 5))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  unit_map = structure.trace(model, variables, x)
  (head,) = [g for g in unit_map.groups if g.kind == 'head']
  assert head.size == H and sorted((s.path, s.axis, s.role) for s in head.slices) == [
      (('wk',), 1, 'producer'), (('wo',), 0, 'consumer'), (('wq',), 1, 'producer'), (('wv',), 1, 'producer')]
  keep = np.array([False, True, True, False])
  params = jax.tree.map(np.asarray, variables['params'])
  for n in ('wq', 'wk', 'wv'):
    params[n] = params[n][:, keep]
  params['wo'] = params['wo'][keep]
  reference = jax.jit(_EinsumAttention(heads=2, cross=cross).apply)({'params': params}, x)
  masked = structure.zero(variables, unit_map, {head.name: keep})
  np.testing.assert_allclose(jax.jit(model.apply)(masked, x), reference, atol=1e-5)


class _SharedKeyValue(nn.Module):
  """Grouped-query (``repeat``: K/V heads repeated) or multi-query (one 2-D key/value head) attention."""
  kind: str

  @nn.compact
  def __call__(self, x, train=False):
    q = nn.DenseGeneral((H, K))(x)
    if self.kind == 'grouped':
      k, v = nn.DenseGeneral((2, K))(x), nn.DenseGeneral((2, K))(x)
      k, v = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)  # the user's line
      scores = jnp.einsum('bqhk,bshk->bhqs', q, k)
      y = jnp.einsum('bhqs,bshk->bqhk', jax.nn.softmax(scores), v)
    else:
      k, v = nn.Dense(K)(x), nn.Dense(K)(x)
      scores = jnp.einsum('bqhk,bsk->bhqs', q, k)  # the user's line
      y = jnp.einsum('bhqs,bsk->bqhk', jax.nn.softmax(scores), v)
    return nn.Dense(3)(nn.DenseGeneral(D, axis=(-2, -1))(y).mean(axis=1))


@pytest.mark.parametrize('kind', ['grouped', 'multi_query'])
def test_shared_key_value_heads_raise_naming_the_op_and_the_user_line(kind):
  model, x = _SharedKeyValue(kind), jnp.zeros((1, 4, D))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  with pytest.raises(structure.UntraceableError, match='grouped or multi-query attention') as error:
    structure.trace(model, variables, x)
  message = str(error.value)
  assert 'test_transformers.py' in message and ('`reshape`' in message or '`dot_general`' in message)


def test_one_head_of_2d_kernels_ties_query_and_key_dimensions_but_keeps_them():
  class OneHead(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      q, k, v = nn.Dense(K)(x), nn.Dense(K)(x), nn.Dense(K)(x)
      weights = jax.nn.softmax(jnp.einsum('bqk,bsk->bqs', q, k) / np.sqrt(K))
      return nn.Dense(3)(jnp.einsum('bqs,bsk->bqk', weights, v).mean(axis=1))

  x = jnp.zeros((1, 4, D))
  model = OneHead()
  unit_map = structure.trace(model, jax.eval_shape(model.init, jax.random.key(0), x), x)
  tied = unit_map['Dense_0']
  assert {s.path for s in tied.producers} == {('Dense_0', 'kernel'), ('Dense_1', 'kernel')}
  assert not tied.prunable and '1/sqrt(d)' in tied.reason
  assert unit_map['Dense_2'].prunable  # the values' dimensions are the output projection's inputs


def test_dessilbi_default_groups_give_head_and_neuron_keep_masks():
  model, variables, x = _small('vit')
  unit_map = structure.trace(model, variables, x)
  groups = models.default_groups('vit')
  from dessilbi_jax.core import grouping  # pylint: disable=g-import-not-at-top
  kinds = grouping.resolve_kinds(variables['params'], groups)
  assert kinds['Block_0']['attention']['value']['kernel'] == 'head'
  assert kinds['Block_1']['mlp_up']['kernel'] == 'neuron'
  assert kinds['Block_0']['attention']['out']['kernel'] is None and kinds['patch_embed']['kernel'] is None
  # Γ with heads 1 and 3 of block 0 in the support of its query, key and value kernels (the head groups
  # DessiLBI keeps on each): only those heads are kept.
  support = jax.tree.map(lambda _: None, variables['params'])
  for name in ('query', 'key', 'value'):
    support['Block_0']['attention'][name]['kernel'] = np.array([False, True, False, True])[None, :, None]
  keep = structure.keep_from_weights(unit_map, support)
  np.testing.assert_array_equal(keep['Block_0/attention/query'], [False, True, False, True])
  # A head some producer still marks stays (a unit is dead only when nothing marks it): the compact
  # network keeps a head whose value slice alone is zero, exactly what the masked one computes.
  support['Block_0']['attention']['query']['kernel'] = None
  keep = structure.keep_from_weights(unit_map, support)
  assert keep['Block_0/attention/query'].all()
  assert keep['Block_1/attention/query'].all()


def _adam_dessilbi_reference(grads, w0, kinds, steps, lr, kappa, mu, lam, b1=0.9, b2=0.999, eps=1e-8):
  """The intended update in float64: Adam's preconditioned loss gradient p in DessiLBI's W step.

  p_k = m̂_k / (√v̂_k + ε);  W_{k+1} = W_k − α·κ·(p_k + (W_k − Γ_k)/ν);  Z_{k+1} = Z_k + (α/ν)(W_k − Γ_k);
  Γ_{k+1} = κ·prox_λ(Z_{k+1}) by group (axes spanned: None: none, (0, 2) head, (0,) neuron).
  """
  w = {n: np.asarray(a, np.float64) for n, a in w0.items()}
  m = {n: np.zeros_like(a) for n, a in w.items()}
  v = {n: np.zeros_like(a) for n, a in w.items()}
  z = {n: np.zeros_like(a) for n, a in w.items()}
  gam = {n: np.zeros_like(a) for n, a in w.items()}
  for k in range(1, steps + 1):
    g = grads(w)
    for n in w:
      m[n] = b1 * m[n] + (1 - b1) * g[n]
      v[n] = b2 * v[n] + (1 - b2) * g[n] ** 2
      p = (m[n] / (1 - b1 ** k)) / (np.sqrt(v[n] / (1 - b2 ** k)) + eps)
      if kinds[n] is None:
        w[n] = w[n] - lr * kappa * p
        continue
      coupling = (w[n] - gam[n]) / mu
      z[n] = z[n] + lr * coupling
      w[n] = w[n] - lr * kappa * (p + coupling)
      norm = np.sqrt(np.sum(z[n] ** 2, axis=kinds[n], keepdims=True))
      gam[n] = kappa * np.where(norm > lam, 1 - lam / np.where(norm > lam, norm, 1), 0) * z[n]
  return w, gam


def test_adam_then_dessilbi_is_the_adam_preconditioned_update():
  """optax.chain(optax.scale_by_adam(), dl.dessilbi(momentum=0)) against the float64 reference."""
  rng = np.random.default_rng(0)
  w0 = {'q': rng.normal(size=(5, 3, 2)), 'up': rng.normal(size=(5, 4)), 'b': rng.normal(size=(4,))}
  target = {n: rng.normal(size=a.shape) * (rng.random(a.shape) < 0.5) for n, a in w0.items()}
  scale = {n: rng.uniform(0.1, 3.0, size=a.shape) for n, a in w0.items()}
  grads64 = lambda w: {n: 2 * scale[n] * (w[n] - target[n]) for n in w}
  lr, kappa, mu, lam, steps = 0.05, 2.0, 5.0, 0.05, 40
  ref_w, ref_gam = _adam_dessilbi_reference(grads64, w0, {'q': (0, 2), 'up': (0,), 'b': None}, steps, lr, kappa,
                                            mu, lam)
  tx = optax.chain(optax.scale_by_adam(), dl.dessilbi(lr, kappa=kappa, mu=mu, momentum=0.0, lambdas=lam,
                                                        groups={'q': 'head', 'up': 'neuron', 'b': None}))
  params = {n: jnp.asarray(a, jnp.float32) for n, a in w0.items()}
  state = tx.init(params)
  loss = lambda p: sum(jnp.sum(jnp.asarray(scale[n], jnp.float32) * (p[n] - jnp.asarray(target[n], jnp.float32))
                               ** 2) for n in p)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  gamma = dl.gamma(state)
  for n in w0:
    np.testing.assert_allclose(params[n], ref_w[n], rtol=2e-4, atol=2e-5)
  for n in ('q', 'up'):
    np.testing.assert_allclose(gamma[n], ref_gam[n], rtol=2e-4, atol=2e-5)
    assert (np.asarray(gamma[n]) == 0).any() or (ref_gam[n] != 0).all()


def test_python_source_is_split_by_file_deterministic_and_offline(tmp_path):
  from dessilbi_jax.data import builders  # pylint: disable=g-import-not-at-top
  info = data.dataset_info('python_source')
  assert (info.num_classes, info.input_shape) == (256, (64,))
  x, y = data.load_arrays('python_source', 'test', str(tmp_path))
  assert x.shape == y.shape == (info.num_test, 64) and x.dtype == np.float32 and y.dtype == np.int32
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # the label is the next byte at every position
  # The test windows are exactly those of every 10th file, read here independently.
  files = builders.python_source_files()
  expected = set()
  for i, path in enumerate(files):
    if builders.python_source_is_test(i):
      text = open(path, 'rb').read()
      expected.update(text[64 * j:64 * j + 65] for j in range((len(text) - 1) // 64))
  got = {bytes(a.astype(np.uint8)) + bytes([b[-1]]) for a, b in zip(x, y)}
  assert got == expected
  again, _ = data.load_arrays('python_source', 'test', str(tmp_path))
  np.testing.assert_array_equal(again, x)
  batch = next(data.eval_batches('python_source', 'test', 8, data_dir=str(tmp_path)))
  assert batch['label'].shape == (8, 64) and batch['mask'].shape == (8,)


def test_get_model_builds_the_transformers_with_their_widths():
  vit = models.get_model('vit', 10, (8, 8, 1), widths=(16, 8), heads=(2, 3))
  assert (vit.widths, vit.block_heads) == ((16, 8), (2, 3))
  assert models.get_model('vit', 10, (8, 8, 1), **models.model_kwargs(vit)) == vit
  gpt = models.get_model('gpt', 256, (32,), widths=(8,))
  assert gpt.context == 32 and gpt.block_heads == (4,)
  with pytest.raises(ValueError, match='vit needs as many heads as widths'):
    models.get_model('vit', 10, (8, 8, 1), widths=(16, 8), heads=(2,))
  with pytest.raises(ValueError, match='gpt: a sequence of 40 tokens is longer than the context of 32'):
    jax.eval_shape(gpt.init, jax.random.key(0), jnp.zeros((1, 40), jnp.int32))
