"""Tests of the model zoo: published sizes and costs, forward passes, batch norm."""

import doctest
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dessilbi_jax import models


pytestmark = pytest.mark.usefixtures('rbg_keys')   # conftest.py: fast init of the large models


def _abstract_params(model, input_shape):
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *input_shape)))['params']


def _cifar_resnet_params(blocks, widths, num_classes):
  """He et al.'s CIFAR ResNet counted by hand: bias-free 3x3 convs, 2 BN params per channel."""
  total = 3 * 9 * widths[0] + 2 * widths[0]
  c_in = widths[0]
  for width in widths:
    for _ in range(blocks):
      total += 9 * c_in * width + 9 * width * width + 2 * 2 * width
      c_in = width
  return total + c_in * num_classes + num_classes


# (name, classes, input shape, exact count, published count in millions, its source)
PUBLISHED_PARAMS = [
    # 156 (conv 6@5x5) + 2,416 (conv 16@5x5 on 6) + 48,120 (400 -> 120) + 10,164 + 850.
    ('lenet5', 10, (28, 28, 1), 61_706, '0.0617', 'LeCun et al. 1998, modern LeNet-5'),
    # 784*300+300 + 300*100+100 + 100*10+10.
    ('mlp', 10, (28, 28, 1), 266_610, '0.27', 'LeNet-300-100, Frankle & Carbin 2019 (266K)'),
    # 1*5*25+25 + 2 * (25*3*25+25) + 125*10+10.
    ('conv1d', 10, (40, 1), 5_210, '0.0052', "mnist1d's ConvBase"),
    # 14,710,464 conv weights + 2 * 4,224 BN + 512*10+10 (no conv biases: BN follows).
    ('vgg16', 10, (32, 32, 3), 14_724_042, '14.7', 'Li et al. 2017; kuangliu/pytorch-cifar'),
    ('resnet20', 10, (32, 32, 3), _cifar_resnet_params(3, (16, 32, 64), 10), '0.27', 'He et al. 2016, Table 6'),
    ('resnet32', 10, (32, 32, 3), _cifar_resnet_params(5, (16, 32, 64), 10), '0.46', 'He et al. 2016, Table 6'),
    ('resnet56', 10, (32, 32, 3), _cifar_resnet_params(9, (16, 32, 64), 10), '0.85', 'He et al. 2016, Table 6'),
    ('resnet110', 10, (32, 32, 3), _cifar_resnet_params(18, (16, 32, 64), 10), '1.7', 'He et al. 2016, Table 6'),
    ('resnet18', 1000, (224, 224, 3), 11_689_512, '11.7', 'torchvision resnet18'),
    ('resnet50', 1000, (224, 224, 3), 25_557_032, '25.6', 'torchvision resnet50'),
]


@pytest.mark.parametrize('name, classes, input_shape, exact, published, source', PUBLISHED_PARAMS,
                         ids=[case[0] for case in PUBLISHED_PARAMS])
def test_parameter_counts_match_published(name, classes, input_shape, exact, published, source):
  count = models.count_params(_abstract_params(models.get_model(name, classes, input_shape), input_shape))
  assert count == exact, source
  decimals = len(published.split('.')[1])
  assert f'{count / 1e6:.{decimals}f}' == published, source


# (name, classes, input shape, MACs: exact when counted by hand, else published with 0.5 %)
FLOPS = [
    # conv1 28*28*(5*5*1*6) = 117,600; conv2 10*10*(5*5*6*16) = 240,000; 400*120 + 120*84 + 84*10 = 58,920.
    ('lenet5', 10, (28, 28, 1), 416_520, 0.0),
    # conv1 8*8*150 = 9,600; conv2 ('SAME') 4*4*2,400 = 38,400; 64*120 + 120*84 + 84*10 = 18,600.
    ('lenet5', 10, (8, 8, 1), 66_600, 0.0),
    # lengths 19, 10, 5: 19*5*25 + 10*3*25*25 + 5*3*25*25 + 125*10.
    ('conv1d', 10, (40, 1), 31_750, 0.0),
    # 784*300 + 300*100 + 100*10.
    ('mlp', 10, (28, 28, 1), 266_200, 0.0),
    # Σ positions x 3*3*C_in*C_out over the 13 convs (32², 32², 16², ... 2²) + 512*10;
    # Li et al. 2017 (Table 1) report 3.13e8.
    ('vgg16', 10, (32, 32, 3), 313_201_664, 0.0),
    ('resnet56', 10, (32, 32, 3), 1.25e8, 0.005),  # Li et al. 2017, Table 1.
    ('resnet110', 10, (32, 32, 3), 2.53e8, 0.005),  # Li et al. 2017, Table 1.
    ('resnet18', 1000, (224, 224, 3), 1.81e9, 0.005),  # torchvision docs, "GFLOPS" (MACs).
    ('resnet50', 1000, (224, 224, 3), 4.09e9, 0.005),  # torchvision docs.
]


@pytest.mark.parametrize('name, classes, input_shape, expected, rtol', FLOPS,
                         ids=[f'{case[0]}-{case[2][0]}' for case in FLOPS])
def test_count_flops_matches_hand_counts_and_published(name, classes, input_shape, expected, rtol):
  macs = models.count_flops(models.get_model(name, classes, input_shape), input_shape)
  assert macs == pytest.approx(expected, rel=rtol, abs=0)


def test_count_flops_agrees_with_xla_cost_analysis():
  model = models.get_model('lenet5', 10, (28, 28, 1))
  x = jnp.zeros((1, 28, 28, 1))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  flops = jax.jit(model.apply).lower(variables, x).compile().cost_analysis()['flops']
  # XLA counts 2 flops per MAC, skips the taps that fall on padding and adds the
  # elementwise ops: within 1 %.
  assert flops / 2 == pytest.approx(models.count_flops(model, (28, 28, 1)), rel=0.01)


def test_count_flops_counts_only_nonzero_kernel_entries():
  model = models.get_model('lenet5', 10, (28, 28, 1))
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))['params']
  dense = models.count_flops(model, (28, 28, 1))
  assert models.count_flops(model, (28, 28, 1), params) == dense

  conv1 = params['Conv_0']['kernel']  # (5, 5, 1, 6)
  pruned = {**params, 'Conv_0': {**params['Conv_0'], 'kernel': conv1.at[..., :3].set(0.0)}}
  # 3 of 6 filters, 5*5*1 entries each, used at 28*28 positions.
  assert models.count_flops(model, (28, 28, 1), pruned) == dense - 3 * 25 * 28 * 28

  fc1 = params['Dense_0']['kernel']  # (400, 120)
  pruned['Dense_0'] = {**params['Dense_0'], 'kernel': fc1.at[:, :60].set(0.0)}
  assert models.count_flops(model, (28, 28, 1), pruned) == dense - 3 * 25 * 28 * 28 - 60 * 400


def test_count_flops_rejects_params_of_another_shape():
  model = models.get_model('lenet5', 10, (28, 28, 1))
  digits_params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))['params']
  with pytest.raises(ValueError, match='Dense_0'):
    models.count_flops(model, (28, 28, 1), digits_params)
  with pytest.raises(ValueError, match="variables\\['params'\\]"):
    models.count_flops(model, (28, 28, 1), {'Conv_0': {}})


def _forward_fns(model):
  train = jax.jit(functools.partial(model.apply, train=True, mutable=['batch_stats']))
  evaluate = jax.jit(functools.partial(model.apply, train=False))
  return train, evaluate


@pytest.mark.parametrize('name, input_shape', [
    ('mlp', (40, 1)), ('mlp', (8, 8, 1)), ('conv1d', (40, 1)), ('lenet5', (8, 8, 1)), ('lenet5', (28, 28, 1)),
])
def test_models_without_batch_norm_run_forward(name, input_shape):
  model = models.get_model(name, 10, input_shape)
  x = jax.random.normal(jax.random.key(1), (4, *input_shape))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  assert set(variables) == {'params'}
  train, evaluate = _forward_fns(model)
  logits, state = train(variables, x)
  assert logits.shape == (4, 10) and np.all(np.isfinite(logits))
  assert not state  # No batch statistics: train and eval modes are the same function.
  np.testing.assert_allclose(evaluate(variables, x), logits, rtol=1e-6)


@pytest.mark.parametrize('name', models.list_models())
def test_every_model_traces_at_its_reference_input_in_train_and_eval_mode(name):
  input_shape = {'mlp': (28, 28, 1), 'lenet5': (28, 28, 1), 'conv1d': (40, 1), 'resnet18': (224, 224, 3),
                 'resnet50': (224, 224, 3), 'gpt': (16,)}.get(name, (32, 32, 3))
  model = models.get_model(name, 10, input_shape)
  x = jax.ShapeDtypeStruct((2, *input_shape), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  logits = jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
  train_logits, state = jax.eval_shape(
      functools.partial(model.apply, train=True, mutable=['batch_stats']), variables, x)
  assert logits.shape == train_logits.shape == ((2, 16, 10) if name == 'gpt' else (2, 10))  # gpt: every position
  assert jax.tree.structure(state) == jax.tree.structure({k: v for k, v in variables.items() if k != 'params'})


# The batch-norm code paths at a fraction of the depth, to keep compilation short:
# VGG, option A (zero-padding) basic blocks, projection bottleneck blocks.
BATCH_NORM_CASES = {
    'vgg16': (models.VGG16(widths=(8,) * 13, num_classes=10), (32, 32, 3)),
    'cifar_resnet': (models.CifarResNet(stage_sizes=(1, 1, 1), widths=(4, 8, 16)), (16, 16, 3)),
    'bottleneck_resnet': (models.ResNet(stage_sizes=(1, 1, 1, 1), block=models.BottleneckBlock,
                                        widths=(4, 4, 8, 8), num_classes=100), (32, 32, 3)),
}


@pytest.mark.parametrize('case', BATCH_NORM_CASES)
def test_batch_norm_train_uses_batch_statistics_and_eval_the_running_ones(case):
  model, input_shape = BATCH_NORM_CASES[case]
  x = jax.random.normal(jax.random.key(1), (4, *input_shape))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  assert set(variables) == {'params', 'batch_stats'}
  train, evaluate = _forward_fns(model)

  logits, state = train(variables, x)
  assert logits.shape == (4, model.num_classes) and np.all(np.isfinite(logits))
  # Train mode ignores the stored statistics ...
  zeros = jax.tree.map(jnp.zeros_like, variables['batch_stats'])
  logits_from_zeros, state_from_zeros = train({**variables, 'batch_stats': zeros}, x)
  np.testing.assert_allclose(logits_from_zeros, logits, rtol=1e-5, atol=1e-5)
  # ... and updates every one of them: running = 0.9 * 0 + 0.1 * (batch statistic).
  assert all(np.any(leaf != 0) for leaf in jax.tree.leaves(state_from_zeros))
  batch_statistics = jax.tree.map(lambda s: s / 0.1, state_from_zeros['batch_stats'])

  # Eval mode normalizes by the running statistics: the batch's own give train mode's
  # output, the initial ones (mean 0, variance 1) another.
  np.testing.assert_allclose(evaluate({**variables, 'batch_stats': batch_statistics}, x), logits,
                             rtol=1e-3, atol=1e-3)
  assert not np.allclose(evaluate(variables, x), logits, rtol=1e-2, atol=1e-2)


def test_axis_name_averages_batch_statistics_across_devices():
  # Two "devices" (a vmapped axis) holding half the batch each must see the whole batch's statistics.
  single = models.CifarResNet(stage_sizes=(1, 1, 1), widths=(4, 8, 8))
  synced = single.clone(axis_name='devices')
  x = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
  variables = jax.jit(single.init)(jax.random.key(0), x)
  logits, state = _forward_fns(single)[0](variables, x)

  per_device = jax.vmap(functools.partial(synced.apply, variables, train=True, mutable=['batch_stats']),
                        axis_name='devices')
  sharded_logits, sharded_state = jax.jit(per_device)(x.reshape(2, 4, 16, 16, 3))
  np.testing.assert_allclose(sharded_logits.reshape(8, 10), logits, rtol=1e-4, atol=1e-5)
  for device in range(2):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[device], b, rtol=1e-4, atol=1e-6),
                 sharded_state, state)
  assert models.get_model('resnet56', 10, (32, 32, 3), axis_name='devices').axis_name == 'devices'


def test_widths_rebuild_a_narrower_network():
  lenet = models.get_model('lenet', 10, (28, 28, 1), widths=(3, 8, 60, 42))
  # 1*25*3+3 + 3*25*8+8 + 200*60+60 + 60*42+42 + 42*10+10.
  assert models.count_params(_abstract_params(lenet, (28, 28, 1))) == 15_738
  mlp = models.get_model('mlp', 10, (40, 1), widths=[100, 100])
  assert models.count_params(_abstract_params(mlp, (40, 1))) == 40 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10
  resnet = models.get_model('resnet20', 10, (32, 32, 3), widths=(8, 16, 32))
  assert models.count_params(_abstract_params(resnet, (32, 32, 3))) == _cifar_resnet_params(3, (8, 16, 32), 10)


@pytest.mark.parametrize('kwargs, message', [
    (dict(name='resnet57'), r"Unknown model 'resnet57'; choose one of: mlp, lenet5, .*resnet50, vit, gpt, lenet"),
    (dict(name='lenet5', widths=(6, 16, 120)), r'lenet5 widths must be a tuple of 4 positive integers'),
    (dict(name='vgg16', widths=(64,) * 12 + (0,)), r'vgg16 widths must be a tuple of 13 positive'),
    (dict(name='mlp', widths=(300.5,)), r'mlp widths must be .* positive integers'),
    (dict(name='mlp', widths=300), r'mlp widths must be a tuple'),
    (dict(name='resnet56', widths=(64, 32, 16)), r'must not decrease'),
    (dict(name='resnet18', widths=(64, 128, 256)), r'4 positive integers \(one per stage\)'),
    (dict(name='conv1d', input_shape=(28, 28, 1)), r'conv1d takes inputs of shape \(length, channels\)'),
    (dict(name='vgg16', input_shape=(8, 8, 1)), r'vgg16 needs inputs of at least 32'),
    (dict(name='lenet5', num_classes=0), r'num_classes must be a positive integer'),
])
def test_get_model_rejects_bad_arguments(kwargs, message):
  arguments = dict(num_classes=10, input_shape=(32, 32, 3)) | kwargs
  with pytest.raises(ValueError, match=message):
    models.get_model(**arguments)


def test_list_models_names_every_model_of_the_contract():
  assert models.list_models() == ('mlp', 'lenet5', 'conv1d', 'vgg16', 'resnet20', 'resnet32', 'resnet56',
                                  'resnet110', 'resnet18', 'resnet50', 'vit', 'gpt')
  assert isinstance(models.get_model('lenet', 10, (8, 8, 1)), models.LeNet5)


def test_docstring_examples_run():
  result = doctest.testmod(models.networks)
  assert result.attempted > 0 and result.failed == 0


def test_per_layer_widths_of_the_resnets():
  # ResNet-20 at widths (4, 8, 8): block 1 empty (its shortcut alone), stage 2 offset 0 instead of centred 2.
  model = models.get_model('resnet20', 10, (8, 8, 3), widths=(4, 8, 8), block_widths=(2, 0, 3, 5, 1, 1, 2, 2, 2),
                           shortcut_offsets=(0, 0))
  params = _abstract_params(model, (8, 8, 3))
  assert 'BasicBlock_1' not in params
  # stem 3·9·4 + 2·4; a block c_in -> w -> c_out: 9·c_in·w + 9·w·c_out + 2·(w + c_out); head 8·10 + 10.
  blocks = [(4, 2, 4), (4, 3, 4), (4, 5, 8), (8, 1, 8), (8, 1, 8), (8, 2, 8), (8, 2, 8), (8, 2, 8)]
  expected = 3 * 9 * 4 + 2 * 4 + sum(9 * i * w + 9 * w * o + 2 * (w + o) for i, w, o in blocks) + 8 * 10 + 10
  assert models.count_params(params) == expected
  x = jnp.zeros((1, 8, 8, 3))
  assert jax.eval_shape(model.apply, jax.eval_shape(model.init, jax.random.key(0), x), x).shape == (1, 10)
  bottleneck = models.get_model('resnet50', 10, (32, 32, 3), stem_width=8, stream_widths=(16, 16, 32, 32),
                                block_widths=((4, 4), (0, 0)) + ((2, 3),) * 14)
  params = _abstract_params(bottleneck, (32, 32, 3))
  assert params['Conv_0']['kernel'].shape == (7, 7, 3, 8)
  assert params['BottleneckBlock_0']['shortcut_conv']['kernel'].shape == (1, 1, 8, 16)
  assert params['BottleneckBlock_0']['Conv_1']['kernel'].shape == (3, 3, 4, 4)
  assert 'BottleneckBlock_1' not in params
  assert params['BottleneckBlock_3']['shortcut_conv']['kernel'].shape == (1, 1, 16, 16)  # stage 2 of 4
  assert params['BottleneckBlock_7']['shortcut_conv']['kernel'].shape == (1, 1, 16, 32)
  with pytest.raises(ValueError, match='resnet20 takes no stem_width; its per-layer widths are: block_widths, '
                                       'shortcut_offsets'):
    models.get_model('resnet20', 10, (32, 32, 3), stem_width=3)
  with pytest.raises(ValueError, match='block_widths must have one entry per residual block \\(9'):
    models.get_model('resnet20', 10, (32, 32, 3), block_widths=(1, 2))
