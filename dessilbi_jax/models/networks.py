"""The model zoo: Flax (linen) networks of the DessiLBI papers, rebuilt from widths.

Every model takes its widths as a tuple of numbers, so the same class builds a
narrower or wider network; the defaults give the reference architectures.

=============  ==============================  ==========================  ===============
name           architecture                    ``widths`` (the default)    one example
=============  ==============================  ==========================  ===============
``mlp``        ReLU multilayer perceptron      hidden layers (300, 100)    any, flattened
``lenet5``     LeNet-5 (alias ``lenet``)       conv, conv, fc, fc          (H, W, C), >= 4
                                               (6, 16, 120, 84)
``conv1d``     1-D convnet of MNIST-1D         3 convs (25, 25, 25)        (L, C): (40, 1)
``vgg16``      VGG-16 with batch norm, CIFAR   13 convs (64, ..., 512)     (H, W, C), >= 32
``resnet20``   CIFAR ResNet, 3 x 3 blocks      per stage (16, 32, 64)      (H, W, C)
``resnet32``   CIFAR ResNet, 3 x 5 blocks      per stage (16, 32, 64)      (H, W, C)
``resnet56``   CIFAR ResNet, 3 x 9 blocks      per stage (16, 32, 64)      (H, W, C)
``resnet110``  CIFAR ResNet, 3 x 18 blocks     per stage (16, 32, 64)      (H, W, C)
``resnet18``   ImageNet ResNet, basic blocks   per stage                   (H, W, C)
                                               (64, 128, 256, 512)
``resnet50``   ImageNet ResNet, bottlenecks    per stage                   (H, W, C)
                                               (64, 128, 256, 512)
``vit``        Vision Transformer, pre-LN      MLP per block               (H, W, C)
                                               (256, 256, 256, 256);
                                               ``heads`` (4, 4, 4, 4)
``gpt``        causal decoder, pre-LN          MLP per block               (length,) ids
                                               (256, 256, 256, 256);
                                               ``heads`` (4, 4, 4, 4)
=============  ==============================  ==========================  ===============

All models are called as ``model.apply(variables, x, train=...)`` on a batch
``x`` of shape ``(batch, *input_shape)``. The batch-norm models (``vgg16`` and
the ResNets) keep running statistics in the ``batch_stats`` collection: with
``train=True`` they normalize by the batch's statistics and update the running
ones (pass ``mutable=['batch_stats']``); with ``train=False`` they use the
running ones. Their ``axis_name`` attribute (default ``None``) names a mapped
axis (``pmap``/``vmap``/``shard_map``) over which batch statistics are averaged,
so a batch split over devices is normalized as one.

Example::

  >>> import jax, jax.numpy as jnp
  >>> from dessilbi_jax import models
  >>> model = models.get_model('lenet5', num_classes=10, input_shape=(8, 8, 1))
  >>> x = jnp.ones((2, 8, 8, 1))
  >>> variables = model.init(jax.random.key(0), x, train=False)
  >>> models.count_params(variables['params'])
  21386
  >>> model.apply(variables, x, train=False).shape
  (2, 10)

A batch-norm model in train mode returns its updated statistics too::

  >>> model = models.get_model('resnet20', num_classes=10, input_shape=(32, 32, 3))
  >>> x = jnp.ones((2, 32, 32, 3))
  >>> variables = jax.eval_shape(model.init, jax.random.key(0), x)
  >>> logits, state = jax.eval_shape(
  ...     lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']), variables, x)
  >>> logits.shape, sorted(state)
  ((2, 10), ['batch_stats'])
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dessilbi_jax.models.gpt import GPT
from dessilbi_jax.models.transformer import GROUPS as TRANSFORMER_GROUPS
from dessilbi_jax.models.vit import ViT


def _check_widths(model: str, widths: Any, length: Optional[int], meaning: str, default: Sequence[int]) -> None:
  """Raises ValueError unless ``widths`` is ``length`` positive integers."""
  ok = (isinstance(widths, (tuple, list)) and (length is None or len(widths) == length)
        and all(isinstance(w, (int, np.integer)) and not isinstance(w, bool) and w > 0 for w in widths))
  if not ok:
    count = 'any number of' if length is None else f'{length}'
    raise ValueError(
        f'{model} widths must be a tuple of {count} positive integers ({meaning}), e.g. the '
        f'default {tuple(default)}; got {widths!r}.')


def _batch_norm(train: bool, axis_name: Optional[str]) -> nn.BatchNorm:
  # PyTorch's defaults (momentum 0.1 there is 0.9 here), as in the reference models.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, axis_name=axis_name)


# Convolutions followed by batch norm need no bias; He et al. (2015) initialization
# suits their ReLUs. Padding k // 2 on each side is PyTorch's, so shapes match the
# reference implementations exactly.
def _conv(features: int, kernel: int, stride: int = 1, name: Optional[str] = None) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=stride, padding=kernel // 2, use_bias=False,
                 kernel_init=nn.initializers.he_normal(), name=name)


class MLP(nn.Module):
  """A ReLU multilayer perceptron on the flattened input.

  The default ``widths=(300, 100)`` is LeNet-300-100 (LeCun et al., 1998): on
  28 x 28 MNIST it has 784·300 + 300 + 300·100 + 100 + 100·10 + 10 = 266,610
  parameters.

  Example::

    >>> import jax, jax.numpy as jnp
    >>> from dessilbi_jax.models import MLP, count_params
    >>> model = MLP(widths=(100, 100), num_classes=10)
    >>> x = jnp.zeros((5, 40, 1))
    >>> variables = jax.eval_shape(model.init, jax.random.key(0), x)
    >>> count_params(variables), jax.eval_shape(model.apply, variables, x).shape
    (15210, (5, 10))
  """
  widths: Sequence[int] = (300, 100)
  num_classes: int = 10

  def __post_init__(self):
    _check_widths('mlp', self.widths, None, 'one per hidden layer', MLP.widths)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # Same signature as the batch-norm models.
    x = x.reshape(x.shape[0], -1)
    for width in self.widths:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


class LeNet5(nn.Module):
  """LeNet-5 (LeCun et al., 1998) with ReLU and max pooling.

  conv 6@5x5 (padding 2) -> pool 2 -> conv 16@5x5 (valid) -> pool 2 -> fc 120
  -> fc 84 -> fc ``num_classes``; ``widths`` are the four hidden widths. On
  28 x 28 MNIST it has 156 + 2,416 + 48,120 + 10,164 + 850 = 61,706 parameters.

  Small inputs: the second convolution is 'VALID' (classic) on inputs of at least
  28 x 28 and 'SAME' on smaller ones, where 'VALID' would leave nothing to pool.
  On the 8 x 8 digits the maps are 8x8x6 -> 4x4x6 -> 4x4x16 -> 2x2x16, so the
  first dense layer sees 64 features (21,386 parameters in all).

  Example::

    >>> import jax, jax.numpy as jnp
    >>> from dessilbi_jax.models import LeNet5, count_params
    >>> model = LeNet5(num_classes=10)
    >>> x = jnp.zeros((3, 8, 8, 1))
    >>> variables = jax.eval_shape(model.init, jax.random.key(0), x)
    >>> count_params(variables), jax.eval_shape(model.apply, variables, x).shape
    (21386, (3, 10))
  """
  widths: Sequence[int] = (6, 16, 120, 84)
  num_classes: int = 10

  def __post_init__(self):
    _check_widths('lenet5', self.widths, 4, 'conv1, conv2, fc1, fc2', LeNet5.widths)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # Same signature as the batch-norm models.
    conv1, conv2, fc1, fc2 = self.widths
    second_padding = 'VALID' if min(x.shape[1:3]) >= 28 else 'SAME'
    x = nn.relu(nn.Conv(conv1, (5, 5), padding=2)(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(nn.Conv(conv2, (5, 5), padding=second_padding)(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(fc1)(x))
    x = nn.relu(nn.Dense(fc2)(x))
    return nn.Dense(self.num_classes)(x)


class Conv1DNet(nn.Module):
  """The 1-D convnet of MNIST-1D (Greydanus, 2020: ``mnist1d``'s ``ConvBase``).

  Three ReLU convolutions of kernel 5, 3, 3, stride 2, padding 1, then a dense
  layer; ``widths`` are the three channel counts. On the (40, 1) MNIST-1D input
  the lengths are 40 -> 19 -> 10 -> 5, so the head sees 5·25 = 125 features:
  150 + 1,900 + 1,900 + 1,260 = 5,210 parameters.

  Example::

    >>> import jax, jax.numpy as jnp
    >>> from dessilbi_jax.models import Conv1DNet, count_params
    >>> model = Conv1DNet(num_classes=10)
    >>> x = jnp.zeros((4, 40, 1))
    >>> variables = jax.eval_shape(model.init, jax.random.key(0), x)
    >>> count_params(variables), jax.eval_shape(model.apply, variables, x).shape
    (5210, (4, 10))
  """
  widths: Sequence[int] = (25, 25, 25)
  num_classes: int = 10

  def __post_init__(self):
    _check_widths('conv1d', self.widths, 3, 'one per conv layer', Conv1DNet.widths)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # Same signature as the batch-norm models.
    for width, kernel in zip(self.widths, (5, 3, 3)):
      x = nn.relu(nn.Conv(width, (kernel,), strides=2, padding=1)(x))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(self.num_classes)(x)


class VGG16(nn.Module):
  """VGG-16 (Simonyan & Zisserman, 2015) with batch norm, CIFAR variant.

  13 conv3x3-BN-ReLU layers, 2x2 max pooling after layers 2, 4, 7, 10 and 13,
  and one dense layer on the flattened 1 x 1 x 512 map (``kuangliu/pytorch-cifar``).
  ``widths`` are the 13 conv widths. For CIFAR-10: 14,710,464 conv weights +
  8,448 batch-norm scales and offsets + 5,130 in the head = 14,724,042
  parameters (the PyTorch version adds 4,224 conv biases that batch norm makes
  redundant, 14,728,266).

  Example::

    >>> import jax, jax.numpy as jnp
    >>> from dessilbi_jax.models import VGG16, count_params
    >>> model = VGG16(num_classes=10)
    >>> x = jnp.zeros((2, 32, 32, 3))
    >>> variables = jax.eval_shape(model.init, jax.random.key(0), x)
    >>> count_params(variables['params']), jax.eval_shape(model.apply, variables, x).shape
    (14724042, (2, 10))
  """
  widths: Sequence[int] = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
  num_classes: int = 10
  axis_name: Optional[str] = None

  def __post_init__(self):
    _check_widths('vgg16', self.widths, 13, 'one per conv layer', VGG16.widths)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for layer, width in enumerate(self.widths, start=1):
      x = nn.relu(_batch_norm(train, self.axis_name)(_conv(width, 3)(x)))
      if layer in (2, 4, 7, 10, 13):
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(self.num_classes)(x)


class BasicBlock(nn.Module):
  """Two conv3x3-BN layers and a shortcut: ResNet-18/34 and the CIFAR ResNets.

  ``width`` is the first conv's (the block's internal) width, ``out_width`` the
  residual stream's after the block (default ``width``). ``width=0`` leaves the
  shortcut alone, ``relu(shortcut(x))``: a pruned block is the identity.

  ``shortcut='projection'`` (option B of He et al.) uses a 1x1 conv + BN where the
  shape changes; ``'pad'`` (option A) subsamples and zero-pads the channels, with
  no parameters: input channel ``c`` becomes channel ``c + pad_offset`` (default:
  centred). ``downsample`` forces (``True``) or forbids (``False``) the
  projection / pad; ``None`` decides by the shapes.
  """
  width: int
  stride: int = 1
  shortcut: str = 'projection'
  axis_name: Optional[str] = None
  out_width: Optional[int] = None
  pad_offset: Optional[int] = None
  downsample: Optional[bool] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    out_width = self.width if self.out_width is None else self.out_width
    shortcut = _shortcut(x, out_width, self.stride, self.shortcut, train, self.axis_name,
                         self.downsample, self.pad_offset)
    if self.width == 0:
      return nn.relu(shortcut)
    y = nn.relu(_batch_norm(train, self.axis_name)(_conv(self.width, 3, self.stride)(x)))
    y = _batch_norm(train, self.axis_name)(_conv(out_width, 3)(y))
    return nn.relu(y + shortcut)


class BottleneckBlock(nn.Module):
  """1x1, 3x3 (strided, as in torchvision's ResNet v1.5), 1x1 conv-BN layers.

  The block outputs ``out_width`` channels (default ``4 * width``);
  ``inner_widths`` are the first two convs' widths (default ``(width, width)``),
  either 0 for a block that is its shortcut alone. The shortcut is a projection
  where the shape changes (option B), or where ``downsample`` says so.
  """
  width: int
  stride: int = 1
  axis_name: Optional[str] = None
  inner_widths: Optional[tuple[int, int]] = None
  out_width: Optional[int] = None
  downsample: Optional[bool] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    first, second = (self.width, self.width) if self.inner_widths is None else self.inner_widths
    out_width = 4 * self.width if self.out_width is None else self.out_width
    shortcut = _shortcut(x, out_width, self.stride, 'projection', train, self.axis_name, self.downsample)
    if first == 0 or second == 0:
      return nn.relu(shortcut)
    y = nn.relu(_batch_norm(train, self.axis_name)(_conv(first, 1)(x)))
    y = nn.relu(_batch_norm(train, self.axis_name)(_conv(second, 3, self.stride)(y)))
    y = _batch_norm(train, self.axis_name)(_conv(out_width, 1)(y))
    return nn.relu(y + shortcut)


def _shortcut(x: jax.Array, width: int, stride: int, kind: str, train: bool,
              axis_name: Optional[str], downsample: Optional[bool] = None,
              pad_offset: Optional[int] = None) -> jax.Array:
  """Identity when the shape is kept (or ``downsample=False``); else option A ('pad') or B ('projection')."""
  if downsample is None:
    downsample = not (stride == 1 and x.shape[-1] == width)
  if not downsample:
    return x
  if kind == 'projection':
    # Named, so that a block whose branch is gone (width 0) keeps the same names.
    bn = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, axis_name=axis_name,
                      name='shortcut_bn')
    return bn(_conv(width, 1, stride, name='shortcut_conv')(x))
  x = x[:, ::stride, ::stride, :]
  extra = width - x.shape[-1]
  before = extra // 2 if pad_offset is None else pad_offset
  if not 0 <= before <= extra:
    raise ValueError(f'pad_offset {pad_offset} does not fit {x.shape[-1]} channels into {width}.')
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (before, extra - before)))


def _per_block(name: str, values, stage_sizes, what: str):
  """Checks a per-block tuple (one entry per residual block) and splits it by stage."""
  total = sum(stage_sizes)
  if values is None:
    return [[None] * n for n in stage_sizes]
  if not isinstance(values, (tuple, list)) or len(values) != total:
    raise ValueError(f'{name} must have one entry per residual block ({total}: {what}); got {values!r}.')
  out, start = [], 0
  for n in stage_sizes:
    out.append(list(values[start:start + n]))
    start += n
  return out


def _check_nonnegative_ints(name: str, values):
  if values is None:
    return
  flat = [v for item in values for v in (item if isinstance(item, (tuple, list)) else (item,))]
  if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in flat):
    raise ValueError(f'{name} must hold non-negative integers (0: the block is its shortcut alone); got {values!r}.')


class CifarResNet(nn.Module):
  """The CIFAR ResNets of He et al. (2016, section 4.2): ResNet-20/32/56/110.

  A 3x3 conv, three stages of ``stage_sizes`` basic blocks (the 2nd and 3rd
  halve the resolution), global average pooling and a dense layer; depth
  6n + 2 for ``stage_sizes=(n, n, n)``. ``widths`` are the residual stream's per
  stage (the stem has the first); ``block_widths`` the internal width of every
  block (default: its stage's; 0 makes a block the identity). Shortcuts are
  option A, as in the paper: identity, or subsample + zero-pad at the first
  block of a stage, stream channel ``c`` of stage ``s - 1`` becoming channel
  ``c + shortcut_offsets[s - 1]`` of stage ``s`` (default: centred). So the
  parameter counts are the published ones (ResNet-20/32/56/110: 269,722 /
  464,154 / 853,018 / 1,727,962, i.e. 0.27 M / 0.46 M / 0.85 M / 1.7 M) and
  widths must not decrease from stage to stage.

  Example::

    >>> import jax, jax.numpy as jnp
    >>> from dessilbi_jax.models import CifarResNet, count_params
    >>> model = CifarResNet(stage_sizes=(9, 9, 9), widths=(16, 32, 64), num_classes=10)  # ResNet-56
    >>> x = jnp.zeros((2, 32, 32, 3))
    >>> variables = jax.eval_shape(model.init, jax.random.key(0), x)
    >>> count_params(variables['params']), jax.eval_shape(model.apply, variables, x).shape
    (853018, (2, 10))
  """
  stage_sizes: Sequence[int] = (3, 3, 3)
  widths: Sequence[int] = (16, 32, 64)
  num_classes: int = 10
  axis_name: Optional[str] = None
  block_widths: Optional[Sequence[int]] = None
  shortcut_offsets: Optional[Sequence[int]] = None

  def __post_init__(self):
    _check_widths('cifar resnet', self.widths, len(self.stage_sizes), 'one per stage', CifarResNet.widths)
    if any(a > b for a, b in zip(self.widths, self.widths[1:])):
      raise ValueError(f'cifar resnet widths must not decrease (option A shortcuts zero-pad '
                       f'channels, they cannot drop any); got {tuple(self.widths)}.')
    _per_block('block_widths', self.block_widths, self.stage_sizes, 'the internal width of each block')
    _check_nonnegative_ints('block_widths', self.block_widths)
    if self.shortcut_offsets is not None and len(self.shortcut_offsets) != len(self.stage_sizes) - 1:
      raise ValueError(f'shortcut_offsets needs one offset per stage after the first '
                       f'({len(self.stage_sizes) - 1}); got {self.shortcut_offsets!r}.')
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = nn.relu(_batch_norm(train, self.axis_name)(_conv(self.widths[0], 3)(x)))
    inner = _per_block('block_widths', self.block_widths, self.stage_sizes, '')
    for stage, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for block in range(blocks):
        first = stage > 0 and block == 0
        block_width = inner[stage][block]
        x = BasicBlock(width if block_width is None else block_width, 2 if first else 1, 'pad',
                       self.axis_name, out_width=width, downsample=first,
                       pad_offset=self.shortcut_offsets[stage - 1] if first and self.shortcut_offsets else None)(
                           x, train)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class ResNet(nn.Module):
  """The ImageNet ResNets of He et al. (2016): ResNet-18 and ResNet-50.

  A 7x7/2 conv and a 3x3/2 max pool, four stages of ``stage_sizes`` blocks (the
  last three halve the resolution), global average pooling and a dense layer.
  ``widths`` are per stage (the stem has the first); a bottleneck block outputs
  four times its width. Projection shortcuts (option B) at the first block of
  a stage where the reference shape changes. Parameter counts are
  torchvision's: ResNet-18 11,689,512, ResNet-50 25,557,032 (1,000 classes).

  Per-layer widths, for pruned or grown networks: ``stem_width`` (default
  ``widths[0]``), ``stream_widths`` (the residual stream per stage; default
  ``widths`` times the block's expansion, 1 or 4) and ``block_widths`` (per
  block: the internal width of a basic block, the pair of inner widths of a
  bottleneck; 0 makes the block the identity).

  Example::

    >>> import jax, jax.numpy as jnp
    >>> from dessilbi_jax.models import BottleneckBlock, ResNet, count_params
    >>> model = ResNet(stage_sizes=(3, 4, 6, 3), block=BottleneckBlock)  # ResNet-50
    >>> x = jnp.zeros((2, 224, 224, 3))
    >>> variables = jax.eval_shape(model.init, jax.random.key(0), x)
    >>> count_params(variables['params']), jax.eval_shape(model.apply, variables, x).shape
    (25557032, (2, 1000))
  """
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: Callable[..., nn.Module] = BasicBlock
  widths: Sequence[int] = (64, 128, 256, 512)
  num_classes: int = 1000
  axis_name: Optional[str] = None
  stem_width: Optional[int] = None
  stream_widths: Optional[Sequence[int]] = None
  block_widths: Optional[Sequence[Any]] = None

  def __post_init__(self):
    _check_widths('resnet', self.widths, len(self.stage_sizes), 'one per stage', ResNet.widths)
    if self.stream_widths is not None:
      _check_widths('resnet stream', self.stream_widths, len(self.stage_sizes), 'one per stage',
                    tuple(self._expansion * w for w in ResNet.widths))
    if self.stem_width is not None:
      _check_widths('resnet stem', (self.stem_width,), 1, 'one number', (64,))
    _per_block('block_widths', self.block_widths, self.stage_sizes, 'the inner width(s) of each block')
    _check_nonnegative_ints('block_widths', self.block_widths)
    super().__post_init__()

  @property
  def _expansion(self) -> int:
    return 4 if self.block is BottleneckBlock else 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    stem = self.widths[0] if self.stem_width is None else self.stem_width
    streams = [self._expansion * w for w in self.widths] if self.stream_widths is None else self.stream_widths
    inner = _per_block('block_widths', self.block_widths, self.stage_sizes, '')
    x = nn.relu(_batch_norm(train, self.axis_name)(_conv(stem, 7, 2)(x)))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for block in range(blocks):
        stride = 2 if stage > 0 and block == 0 else 1
        # Where the reference network projects (a fixed structure, whatever the widths now are).
        downsample = block == 0 and (stage > 0 or self._expansion * width != self.widths[0])
        kwargs = dict(width=width, stride=stride, axis_name=self.axis_name, out_width=streams[stage],
                      downsample=downsample)
        if inner[stage][block] is not None:
          if self.block is BottleneckBlock:
            kwargs['inner_widths'] = tuple(inner[stage][block])
          else:
            kwargs['width'] = inner[stage][block]
        x = self.block(**kwargs)(x, train)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class _Entry(NamedTuple):
  build: Callable[..., nn.Module]  # (widths=..., num_classes=...) -> Module
  input_rank: Optional[int]        # rank of one example (None: any)
  min_size: int                    # smallest spatial size it accepts
  batch_norm: bool                 # has batch statistics (and an axis_name)


_REGISTRY = {
    'mlp': _Entry(MLP, None, 1, False),
    'lenet5': _Entry(LeNet5, 3, 4, False),
    'conv1d': _Entry(Conv1DNet, 2, 3, False),
    'vgg16': _Entry(VGG16, 3, 32, True),
    'resnet20': _Entry(functools.partial(CifarResNet, stage_sizes=(3, 3, 3)), 3, 1, True),
    'resnet32': _Entry(functools.partial(CifarResNet, stage_sizes=(5, 5, 5)), 3, 1, True),
    'resnet56': _Entry(functools.partial(CifarResNet, stage_sizes=(9, 9, 9)), 3, 1, True),
    'resnet110': _Entry(functools.partial(CifarResNet, stage_sizes=(18, 18, 18)), 3, 1, True),
    'resnet18': _Entry(functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock), 3, 1, True),
    'resnet50': _Entry(functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=BottleneckBlock), 3, 1, True),
    'vit': _Entry(ViT, 3, 1, False),
    'gpt': _Entry(GPT, 1, 1, False),
}
_ALIASES = {'lenet': 'lenet5'}


def list_models() -> tuple[str, ...]:
  """The model names :func:`get_model` accepts (``'lenet'`` is also accepted for ``'lenet5'``)."""
  return tuple(_REGISTRY)


def get_model(name: str, num_classes: int, input_shape: Sequence[int],
              widths: Optional[Sequence[int]] = None, *, axis_name: Optional[str] = None,
              **layer_widths: Any) -> nn.Module:
  """Builds model ``name`` for inputs of ``input_shape`` (one example, no batch axis).

  Args:
    name: one of :func:`list_models`, or the alias ``'lenet'``.
    num_classes: the number of outputs (logits).
    input_shape: the shape of one example, e.g. ``(8, 8, 1)`` (digits), ``(40, 1)``
      (MNIST-1D), ``(28, 28, 1)``, ``(32, 32, 3)``, ``(224, 224, 3)``.
    widths: the model's widths (see the table in the module docstring); ``None``
      gives the reference architecture.
    axis_name: for the batch-norm models, the mapped axis (e.g. of ``pmap``)
      over which batch statistics are averaged; ignored by the others.
    **layer_widths: per-layer widths of the ResNets (a pruned or grown
      network): ``block_widths``, ``shortcut_offsets`` (CIFAR), ``stem_width``,
      ``stream_widths`` (ImageNet); see :class:`CifarResNet` and :class:`ResNet`;
      the transformers' ``heads`` per block (:class:`ViT`, :class:`GPT`).

  Returns:
    A ``flax.linen.Module``; call ``init``/``apply`` with ``train=...``.

  Raises:
    ValueError: for an unknown name, bad widths, or an input shape the model
      cannot take.

  Example::

    >>> from dessilbi_jax import models
    >>> models.get_model('lenet', 10, (28, 28, 1), widths=(3, 8, 60, 42)).widths
    (3, 8, 60, 42)
  """
  key = _ALIASES.get(name, name)
  if key not in _REGISTRY:
    choices = ', '.join(list(_REGISTRY) + list(_ALIASES))
    raise ValueError(f'Unknown model {name!r}; choose one of: {choices}.')
  entry = _REGISTRY[key]
  if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
    raise ValueError(f'num_classes must be a positive integer; got {num_classes!r}.')
  input_shape = tuple(input_shape)
  if entry.input_rank is not None and len(input_shape) != entry.input_rank:
    layout = {1: '(length,) of token ids, e.g. (64,)', 2: '(length, channels), e.g. (40, 1)',
              3: '(height, width, channels), e.g. (32, 32, 3)'}
    raise ValueError(f'{key} takes inputs of shape {layout[entry.input_rank]}; got input_shape {input_shape}.')
  if entry.input_rank is not None and input_shape[:-1] and min(input_shape[:-1]) < entry.min_size:
    raise ValueError(f'{key} needs inputs of at least {entry.min_size} along each spatial axis; '
                     f'got input_shape {input_shape}.')
  kwargs = {'num_classes': int(num_classes)}
  if key == 'gpt':
    kwargs['context'] = int(input_shape[0])  # the sequences it is trained on
  if entry.batch_norm:
    kwargs['axis_name'] = axis_name
  if widths is not None:
    # The model checks them (a list is fine; Flax attributes should be hashable).
    kwargs['widths'] = tuple(widths) if isinstance(widths, list) else widths
  accepted = _layer_widths_of(key)
  unknown = sorted(set(layer_widths) - accepted)
  if unknown:
    raise ValueError(f'{key} takes no {", ".join(unknown)}; its per-layer widths are: '
                     f'{", ".join(sorted(accepted)) or "none (only widths)"}.')
  kwargs.update({k: _hashable(v) for k, v in layer_widths.items()})
  return entry.build(**kwargs)


# The per-layer widths (beside ``widths``) of a pruned or grown network, per model family.
LAYER_WIDTHS = ('block_widths', 'shortcut_offsets', 'stem_width', 'stream_widths', 'heads')


def _layer_widths_of(key: str) -> set[str]:
  if key in ('vit', 'gpt'):
    return {'heads'}
  if key in ('resnet18', 'resnet50'):
    return {'block_widths', 'stem_width', 'stream_widths'}
  return {'block_widths', 'shortcut_offsets'} if key.startswith('resnet') else set()


def default_groups(name: str) -> Optional[dict[str, Optional[str]]]:
  """DessiLBI's grouping rule for zoo model ``name`` (``None``: the reference rule).

  The transformers get a ``head`` group per attention head and a ``neuron``
  group per MLP neuron (:data:`dessilbi_jax.models.transformer.GROUPS`).

  Example::

    >>> from dessilbi_jax import models
    >>> models.default_groups('vit')['mlp_up/kernel$'], models.default_groups('lenet5')
    ('neuron', None)
  """
  return dict(TRANSFORMER_GROUPS) if _ALIASES.get(name, name) in ('vit', 'gpt') else None


def model_name(model: nn.Module) -> str:
  """The zoo name (:func:`get_model`) of a zoo module, e.g. ``'resnet56'``; ValueError for another module."""
  for name, entry in _REGISTRY.items():
    reference = entry.build()
    if type(reference) is type(model) and all(
        getattr(reference, f) == getattr(model, f) for f in ('stage_sizes', 'block') if hasattr(model, f)):
      return name
  raise ValueError(f'{type(model).__name__} is not a model of the zoo ({", ".join(_REGISTRY)}).')


def model_kwargs(model: nn.Module) -> dict[str, Any]:
  """The keyword arguments of :func:`get_model` that rebuild a zoo module's layers, as JSON values.

  A model is its name (:func:`model_name`) and these: ``widths`` and the
  per-layer widths it sets (:data:`LAYER_WIDTHS`, e.g. the
  ``block_widths`` of a removed ResNet), lists for tuples. This is what a
  run's config and checkpoints and a saved compact model record of it.

  Example::

    >>> from dessilbi_jax import models
    >>> small = models.get_model('resnet20', 10, (8, 8, 1), widths=(4, 8, 8),
    ...                          block_widths=(4, 0, 4, 8, 8, 8, 8, 8, 8))
    >>> models.model_name(small), models.model_kwargs(small)
    ('resnet20', {'widths': [4, 8, 8], 'block_widths': [4, 0, 4, 8, 8, 8, 8, 8, 8]})
    >>> models.get_model('resnet20', 10, (8, 8, 1), **models.model_kwargs(small)) == small
    True
  """
  fields = ('widths',) + tuple(f for f in LAYER_WIDTHS if f in _layer_widths_of(model_name(model)))
  kwargs = {f: getattr(model, f) for f in fields if getattr(model, f, None) is not None}
  return json.loads(json.dumps(kwargs, default=int))  # tuples -> lists, numpy ints -> ints


def _hashable(value):
  # Flax attributes should be hashable: lists (e.g. read back from JSON) become tuples.
  return tuple(_hashable(v) for v in value) if isinstance(value, (list, tuple)) else value


def count_params(params: Any) -> int:
  """The number of scalars in a pytree of arrays (or of ``jax.ShapeDtypeStruct``).

  Example::

    >>> import jax.numpy as jnp
    >>> count_params({'Dense_0': {'kernel': jnp.zeros((3, 4)), 'bias': jnp.zeros(4)}})
    16
  """
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def count_flops(model: nn.Module, input_shape: Sequence[int], params: Any = None) -> int:
  """Multiply-accumulates (MACs) of one forward pass of one example.

  Counts the ``nn.Conv``, ``nn.Dense`` and ``nn.DenseGeneral`` layers (attention's
  query, key, value and output projections), the cost that papers report
  (biases, normalization, activations, pooling and attention's products of
  two activations are left out):

      MACs = Σ_layers (output positions) × (kernel entries)

  where a dense layer on a vector has one output position and a conv layer has
  one per spatial position of its output. With ``params`` given only the
  non-zero kernel entries count: the cost of a pruned network (zero filters of
  one layer do not make the next layer's kernel sparse; zero those entries too
  if the next layer should not pay for them). Shapes are traced with
  ``jax.eval_shape``, so nothing is compiled or allocated.

  Args:
    model: a Flax module, e.g. from :func:`get_model`.
    input_shape: the shape of one example, without the batch axis.
    params: optionally, the model's ``params`` (e.g. ``variables['params']``).

  Returns:
    The number of multiply-accumulates, an ``int``.

  Example::

    >>> from dessilbi_jax import models
    >>> models.count_flops(models.get_model('lenet5', 10, (28, 28, 1)), (28, 28, 1))
    416520
  """
  layers = []  # (module path, output positions, kernel shape)

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and isinstance(context.module, (nn.Conv, nn.Dense, nn.DenseGeneral)):
      kernel = context.module.variables['params']['kernel']
      features = getattr(context.module, 'features', out.shape[-1])
      outputs = math.prod(features) if isinstance(features, (tuple, list)) else out.shape[-1]
      layers.append((context.module.path, out.size // outputs, kernel.shape))
    return out

  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  with nn.intercept_methods(record):
    jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)

  total = 0
  for path, positions, shape in layers:
    if params is None:
      entries = math.prod(shape)
    else:
      kernel = params
      try:
        for name in (*path, 'kernel'):
          kernel = kernel[name]
      except (KeyError, TypeError):
        raise ValueError(f"params has no kernel at {'/'.join(path)}; pass the model's own "
                         "params (variables['params']).") from None
      if tuple(kernel.shape) != tuple(shape):
        raise ValueError(f"params kernel at {'/'.join(path)} has shape {tuple(kernel.shape)}, the model's "
                         f'has {tuple(shape)}; pass params of this model and input shape.')
      entries = int(np.count_nonzero(np.asarray(kernel)))
    total += positions * entries
  return total
