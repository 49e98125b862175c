"""The compiled update writes every buffer in place and moves few bytes.

Regression tests of the structure that makes the update fast on CPU, not
timings: with params and state donated, XLA must not copy W, Z or Γ (see
``dessilbi_jax.core.cpu_schedule``), and the number of full passes over a conv kernel's
buffers stays at the design's 13 (SGD-momentum: 6). The layout is the CPU
backend's; elsewhere XLA fuses the writes itself and these tests are skipped.

A lean state (``store_gamma=False``) cannot be updated without a copy on the
CPU: W's update reads Z_k (Γ_k = s·Z_k) while Z's overwrites Z in place and reads
W_k, and the CPU backend forms no multi-output fusion that would do both in one
loop. XLA copies Z_k once per structured leaf (one read, one write), in place of
the stored Γ's read by W and its write: the same passes as with Γ stored.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dessilbi_jax as dl
from dessilbi_jax.core import cpu_schedule
from dessilbi_jax.core import target_density

pytestmark = pytest.mark.skipif(
    jax.default_backend() != 'cpu',
    reason="counts the passes of XLA's CPU backend, which the ordering edges are laid out for")


def _compiled_step(tx, params) -> str:
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  return jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile().as_text()


def _entry_copies(tx, params):
  hlo = _compiled_step(tx, params)
  return hlo[hlo.index('ENTRY'):].count(' copy(')


def _full_passes(hlo: str, shape: str) -> int:
  """Reads plus writes of whole buffers of ``shape`` (e.g. ``'3,3,16,32'``) in the entry computation.

  Every instruction of the entry computation is one loop over memory (XLA on
  CPU); it reads each of its full-size operands once and writes its result. A
  smaller fusion that slices a few entries out of an operand (an ordering
  token) reads no full buffer.
  """
  bodies = dict(re.findall(r'^(%\S+) .*?\{\n(.*?)^\}', hlo, re.S | re.M))
  entry = hlo[hlo.index('ENTRY'):].splitlines()[1:]
  shapes = dict(re.findall(r'^\s*(%\S+) = \w+\[([\d,]*)\]', '\n'.join(entry), re.M))
  passes = 0
  for line in entry:
    match = re.match(r'\s*(%\S+) = \w+\[([\d,]*)\]\S* (\w[\w-]*)\((.*?)\)(, kind=.*?calls=(%[\w.]+))?', line)
    if not match or match.group(3) in ('parameter', 'constant', 'tuple', 'get-tuple-element'):
      continue
    if match.group(2) != shape and ' slice(' in bodies.get(match.group(6), ''):
      continue   # a few entries sliced out of a buffer: an ordering token
    operands = re.findall(r'%[\w.\-]+', match.group(4))
    passes += sum(shapes.get(name) == shape for name in operands) + (match.group(2) == shape)
  return passes


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
@pytest.mark.parametrize('sequential_min_size', [cpu_schedule.SEQUENTIAL_MIN_SIZE, 1])
def test_update_compiles_without_copies(kwargs, sequential_min_size, monkeypatch):
  monkeypatch.setattr(cpu_schedule, 'SEQUENTIAL_MIN_SIZE', sequential_min_size)
  assert _entry_copies(dl.dessilbi(0.1, **kwargs), _params()) == 0


def test_passes_over_memory_against_sgd(monkeypatch):
  """Grouped leaves: b' (g, b -> b) 3; Z' (Z, W -> Z, Γ_k rebuilt from Z and s) 3; ‖Z'_g‖ 1;
  W' (W, b', Γ -> W) 4; Γ' (Z' -> Γ) 2: 13. Lasso leaves: the same without the norm pass, Γ_k
  rebuilt from Z, but the per-weight entry steps are read and written with a read of Z': 15.
  SGD-momentum: b' 3 and W' 3."""
  params = _params()
  monkeypatch.setattr(cpu_schedule, 'SEQUENTIAL_MIN_SIZE', 1)   # large leaves in sequence: no extra pass
  sgd = _compiled_step(optax.sgd(0.1, momentum=0.9), params)
  dessilbi = _compiled_step(dl.dessilbi(0.1), params)   # conv: filter, dense: lasso, attn: lasso
  heads = _compiled_step(dl.dessilbi(0.1, groups={'attn/kernel': 'head'}), params)
  for shape in ('3,3,16,32', '128,64', '64,4,16'):
    assert _full_passes(sgd, shape) == 6, shape
  assert _full_passes(dessilbi, '3,3,16,32') == 13
  assert _full_passes(dessilbi, '128,64') == 15
  assert _full_passes(heads, '64,4,16') == 13


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_low_precision_params_with_float32_state_take_13_passes_without_copies(dtype):
  """The W token is taken on what optax.apply_updates writes (the step cast to the params' dtype)."""
  params = jax.tree.map(lambda x: x.astype(dtype), _params())
  hlo = _compiled_step(dl.dessilbi(0.1, state_dtype=jnp.float32), params)
  assert hlo[hlo.index('ENTRY'):].count(' copy(') == 0
  assert _full_passes(hlo, '3,3,16,32') == 13


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16, jnp.float16])
def test_ordering_edge_leaves_every_value_as_it_is(dtype):
  """`after(x, written)` is bit-identical to x (−0, ±inf and NaN included), whatever is written:
  huge, infinite, NaN, or ±3e38 rows that sum to inf − inf."""
  x = jnp.concatenate([jax.random.normal(jax.random.key(0), (1000,)),
                       jnp.array([0.0, -0.0, jnp.inf, -jnp.inf, jnp.nan, 3e38])]).astype(dtype)
  written = [jnp.float32(3.0), jnp.float32(-1e30), jnp.full((2, 4), 6e4, jnp.float16), jnp.asarray([-2.5], dtype),
             jnp.array([[jnp.nan, 1.0]]), jnp.array([[jnp.inf, 1.0]]), jnp.array([[3e38, 3e38, -3e38, -3e38]])]
  for w in written:
    out = jax.jit(cpu_schedule.after)(x, w)
    assert out.dtype == x.dtype
    np.testing.assert_array_equal(out, x)
    assert np.array_equal(np.signbit(out), np.signbit(x))   # −0 stays −0


@pytest.mark.parametrize('target', [target_density.Target(0.3, method='budget'), target_density.Target(0.3),
                                    target_density.Target(0.3, scope='layer', every=10)])
@pytest.mark.parametrize('sequential_min_size', [cpu_schedule.SEQUENTIAL_MIN_SIZE, 1])
def test_target_density_update_copies_no_buffer_and_adds_no_pass_over_grouped_leaves(
    target, sequential_min_size, monkeypatch):
  """The threshold search reads the per-group norms, not the leaves: a filter leaf keeps its 13 passes
  and no buffer is copied (the scalar thresholds may be)."""
  monkeypatch.setattr(cpu_schedule, 'SEQUENTIAL_MIN_SIZE', sequential_min_size)
  hlo = _compiled_step(dl.dessilbi(0.1, target_density=target), _params())
  entry = hlo[hlo.index('ENTRY'):]
  assert re.findall(r'= \w+\[[^\]]+\]\S* copy\(', entry) == []
  assert _full_passes(hlo, '3,3,16,32') == 13


def _copied(hlo: str) -> list[tuple[str, str]]:
  """(shape, operand) of every copy of an array in the entry computation."""
  return re.findall(r'= \w+\[([^\]]+)\]\S* copy\((%\S+)\)', hlo[hlo.index('ENTRY'):])


@pytest.mark.parametrize('kwargs', [
    dict(),
    dict(nesterov=True, weight_decay=1e-4),
    dict(groups={'dense/kernel': 'neuron', 'attn/kernel': 'head'}, normalize_groups=True),
    dict(groups={'dense/kernel': 'input'}, momentum=0.0),
    dict(target_density=target_density.Target(0.3, method='dual')),
])
@pytest.mark.parametrize('sequential_min_size', [cpu_schedule.SEQUENTIAL_MIN_SIZE, 1])
def test_lean_update_copies_each_z_once_and_takes_the_stored_updates_passes(kwargs, sequential_min_size, monkeypatch):
  """store_gamma=False: one copy per structured leaf, of its Z_k, and nothing else; the passes over
  each leaf's buffers are the stored update's (13 over a filter leaf, 15 over a lasso leaf by default):
  the copy's read and write stand in for W's read of Γ_k and Γ's write."""
  monkeypatch.setattr(cpu_schedule, 'SEQUENTIAL_MIN_SIZE', sequential_min_size)
  params = _params()
  lean = _compiled_step(dl.dessilbi(0.1, store_gamma=False, **kwargs), params)
  stored = _compiled_step(dl.dessilbi(0.1, **kwargs), params)
  assert sorted(_copied(lean)) == [('128,64', '%state_z__dense____kernel__.1'),
                                   ('3,3,16,32', '%state_z__conv____kernel__.1'),
                                   ('64,4,16', '%state_z__attn____kernel__.1')]
  for shape in ('3,3,16,32', '128,64', '64,4,16'):
    assert _full_passes(lean, shape) == _full_passes(stored, shape), shape
  if not kwargs:
    assert [_full_passes(lean, shape) for shape in ('3,3,16,32', '128,64', '64,4,16')] == [13, 15, 13]


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_lean_update_with_low_precision_params_copies_each_z_once(dtype):
  params = jax.tree.map(lambda x: x.astype(dtype), _params())
  hlo = _compiled_step(dl.dessilbi(0.1, state_dtype=jnp.float32, store_gamma=False), params)
  assert sorted(shape for shape, _ in _copied(hlo)) == ['128,64', '3,3,16,32', '64,4,16']
  assert all(operand.startswith('%state_z__') for _, operand in _copied(hlo))
  assert _full_passes(hlo, '3,3,16,32') == 13


def test_lean_update_without_ordering_edges_copies_twice():
  """Without the edges XLA copies Z_k and W_k of every structured leaf (15 passes over a filter leaf,
  the stored update without edges takes 19): the edges still order the lean update's writes."""
  params = _params()
  hlo = _compiled_step(dl.dessilbi(0.1, store_gamma=False, ordering_edges=False), params)
  big = sorted(operand.split('__')[0] for shape, operand in _copied(hlo) if shape in ('3,3,16,32', '128,64', '64,4,16'))
  assert big == ['%params'] * 3 + ['%state_z'] * 3
  assert _full_passes(hlo, '3,3,16,32') == 15
