"""The training loop's extension points, each exercised by a tiny fake feature."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dessilbi_jax.train import checkpoint
from dessilbi_jax import data
from dessilbi_jax import train

TINY = dict(model='lenet', dataset='digits', widths=(4, 8, 16, 16), batch_size=128, epochs=1, lr=0.05)
STEPS = 11   # 1,442 // 128 steps per epoch


@pytest.fixture(scope='module')
def tiny(data_dir):
  return train.TrainConfig(**TINY, data_dir=data_dir)


@pytest.fixture(scope='module')
def plain(tiny):
  return train.fit(tiny, quiet=True)


def _assert_trees_equal(a, b):
  equal = jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)
  assert all(jax.tree.leaves(equal)), equal


def test_extra_state_has_its_own_optimizer_and_enters_the_loss(tiny, plain):
  # A term (s − 3)²/2 that does not touch the params: s follows gradient descent in closed form and the
  # params are those of the run without it, to the bit.
  pull = train.ExtraTrainable(init=lambda params, key: jnp.zeros([]), tx=optax.sgd(0.1),
                              forward=lambda params, s, key: (params, 0.5 * (s - 3.0) ** 2))
  pulled = train.fit(tiny, quiet=True, extensions=[train.Extension('pull', trainable=pull)])
  assert float(pulled.state.extra['pull']) == pytest.approx(3 * (1 - 0.9 ** STEPS), rel=1e-6)
  _assert_trees_equal(pulled.params, plain.params)
  assert pulled.history[-1]['train_loss'] > plain.history[-1]['train_loss']   # the term is in the loss

  def scaled(params, scale, key):
    return {**params, 'Dense_2': {**params['Dense_2'], 'kernel': params['Dense_2']['kernel'] * scale}}, 0.0

  # A scale of the last layer's kernel, trained by Adam through the forward pass: it moves, and so do the
  # params (their gradients see the scaled kernel).
  gate = train.ExtraTrainable(init=lambda params, key: jnp.ones([]), tx=optax.adam(0.05), forward=scaled,
                              evaluate=lambda params, scale: scaled(params, scale, None)[0])
  result = train.fit(tiny, quiet=True, extensions=[train.Extension('scale', trainable=gate)])
  scale = float(result.state.extra['scale'])
  assert scale != 1.0 and int(result.state.extra_opt_state['scale'][0].count) == STEPS
  assert not np.array_equal(result.params['Dense_2']['kernel'], plain.params['Dense_2']['kernel'])
  # The test accuracy is that of the network the extension says is evaluated (the scaled kernel).
  model, _ = train.build_model(tiny)
  expected = train.evaluate(model, {'params': scaled(result.params, scale, None)[0]}, 'digits',
                            data_dir=tiny.data_dir)
  assert result.history[-1]['dense_test_acc'] == pytest.approx(expected)


def test_metrics_hook_lands_in_metrics_jsonl_and_the_epoch_line(tiny, tmp_path, capsys):
  def half_filters(epoch):   # the accuracy of the network without the first conv's odd filters
    params = jax.tree.map(np.array, epoch.state.params)
    params['Conv_0']['kernel'][..., 1::2] = 0
    params['Conv_0']['bias'][1::2] = 0
    return {'half_filters_acc': epoch.evaluate(epoch.model, {'params': params}), 'epoch_seen': epoch.epoch}

  words = train.Extension('words', metrics=lambda e: {'words_n': 7}, summary=lambda row: f'seven is {row["words_n"]}')
  result = train.fit(tiny, tmp_path / 'run', extensions=[train.Extension('half', metrics=half_filters), words])
  row = json.loads((tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()[-1])
  params = jax.tree.map(np.array, result.params)
  params['Conv_0']['kernel'][..., 1::2] = 0
  params['Conv_0']['bias'][1::2] = 0
  model, _ = train.build_model(tiny)
  x, y = data.load_arrays('digits', 'test', data_dir=tiny.data_dir)
  reference = np.mean(np.argmax(model.apply({'params': params}, x), -1) == y)   # a plain count
  assert row['half_filters_acc'] == pytest.approx(reference) and row['epoch_seen'] == 1
  out = capsys.readouterr().out
  assert f'half_filters_acc {reference:.4g}' in out   # no words of its own: its scalars
  # An extension with words says them instead of its metrics; the registry's compact extension says its own.
  assert 'seven is 7' in out and 'words_n' not in out and row['words_n'] == 7
  assert (f'compact {100 * row["compact_test_acc"]:.1f}% ({row["compact_params"]:,} params, '
          f'{row["compact_macs"]:,} MACs)') in out
  assert [e.name for e in result.extensions] == ['compact', 'half', 'words']
  with pytest.raises(ValueError, match=r"Extension 'clash' returned metrics \['dense_test_acc'\]"):
    train.fit(tiny, quiet=True, extensions=[train.Extension('clash', metrics=lambda e: {'dense_test_acc': 1})])


def _widen_last_hidden_layer(traces):
  """A fake growth: after epoch 1, the last hidden dense layer gets 4 more units (16 -> 20)."""

  def grow(epoch):
    if epoch.epoch != 1:
      return None
    widths = (*epoch.widths[:-1], epoch.widths[-1] + 4)
    model, info = train.build_model(epoch.cfg, widths)
    fresh = train.init_variables(model, info.input_shape, jax.random.PRNGKey(7))['params']
    params = jax.tree.map(_pad, fresh, epoch.state.params)
    opt_state = jax.tree.map(_pad, epoch.tx.init(params), epoch.state.opt_state)
    return train.Reshaped(widths, epoch.state._replace(params=params, opt_state=jax.device_get(opt_state)))

  def count_traces(params, extra, key):   # runs once per compilation of the step
    traces.append(jax.tree.map(jnp.shape, params['Dense_1']['kernel']))
    return params, 0.0

  counter = train.ExtraTrainable(init=lambda p, k: jnp.zeros([]), tx=optax.sgd(0.0), forward=count_traces)
  return train.Extension('grow', trainable=counter, epoch_end=grow)


def _pad(new, old):
  new, old = np.asarray(new), np.asarray(old)
  if new.shape == old.shape:
    return old
  out = new.copy()
  out[tuple(slice(0, s) for s in old.shape)] = old
  return out


def test_a_hook_that_changes_shapes_rebuilds_the_step_and_resumes_exactly(tiny, tmp_path):
  cfg = dataclasses.replace(tiny, epochs=2)
  traces = []
  grow = _widen_last_hidden_layer(traces)
  straight = train.fit(cfg, tmp_path / 'straight', quiet=True, extensions=[grow])
  # Traced (pmap traces a step twice) for the first shape, then once more for the new one, not per epoch.
  per_compilation = traces.count((16, 16))
  assert per_compilation in (1, 2) and traces == [(16, 16)] * per_compilation + [(16, 20)] * per_compilation
  assert straight.widths == (4, 8, 16, 20) and straight.params['Dense_1']['kernel'].shape == (16, 20)
  rows = [json.loads(line) for line in (tmp_path / 'straight' / 'metrics.jsonl').read_text().splitlines()]
  assert [r['per_leaf']['Dense_2/kernel']['weights'] for r in rows] == [16 * 10, 20 * 10]
  # The checkpoints know the widths; the path pads the groups that did not exist yet with False.
  assert checkpoint.read_record(tmp_path / 'straight' / 'checkpoints', 1)['widths'] == [4, 8, 16, 20]
  path = train.load_path(tmp_path / 'straight')
  assert path['support/Dense_2/kernel'].shape == (2, 20, 10)
  assert not path['support/Dense_2/kernel'][0, 16:].any()

  # One epoch (the checkpoint after the growth), then resume to two: the grown network is rebuilt from the
  # checkpoint, the same bits.
  out = tmp_path / 'resumed'
  train.fit(dataclasses.replace(cfg, epochs=1), out, quiet=True, extensions=[grow])
  resumed = train.fit(cfg, out, resume=True, quiet=True, extensions=[grow])
  _assert_trees_equal(resumed.params, straight.params)
  _assert_trees_equal(resumed.opt_state, straight.opt_state)
  assert resumed.widths == straight.widths and resumed.resumed_from == 1


def test_a_reshaped_state_that_does_not_fit_its_widths_is_an_error(tiny):
  def bad(epoch):
    return train.Reshaped((4, 8, 16, 32), epoch.state)   # widths changed, state not

  with pytest.raises(ValueError, match=r'for widths \(4, 8, 16, 32\): params does not match the model'):
    train.fit(tiny, quiet=True, extensions=[train.Extension('bad', epoch_end=bad)])


def test_the_registry_entry_gives_the_extensions_and_the_caller_replaces_them(tiny):
  names = lambda cfg, given=(): [e.name for e in train.optimizers.default_extensions(cfg, given)]
  assert names(tiny) == ['compact']
  assert names(dataclasses.replace(tiny, target_density=0.3)) == ['compact', 'target']
  assert names(dataclasses.replace(tiny, model='mlp', widths=(8,), optimizer='l0', target_density=0.3)) == ['l0']
  mine = train.Extension('compact', metrics=lambda epoch: {})
  assert train.optimizers.default_extensions(tiny, [mine]) == (mine,)
  target, = [e for e in train.optimizers.default_extensions(dataclasses.replace(tiny, target_density=0.25))
             if e.name == 'target']
  assert train.extensions.summaries([target], {}) == ('target 25.0%',)
