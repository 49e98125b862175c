"""Batches for training and evaluation: shuffled, augmented, split over devices and hosts.

A plain numpy pipeline. Training batch ``k`` is a function of ``(seed, k)``
only: it is batch ``k mod S`` of epoch ``e = k // S`` (``S`` steps per epoch,
the remainder dropped), whose order is the permutation drawn from
``(seed, e)``, and its augmentation draws from ``(seed, k)``. So every epoch is
reshuffled and a run resumed at ``start_step=k`` sees exactly the batches a
straight run saw from ``k`` on.

Datasets that fit in memory (all but ImageNet) are read once per process and
indexed with numpy, a few tens of microseconds per batch; ImageNet is read per
batch from its ArrayRecord files and its JPEGs decoded and cropped by a thread
pool. (A grain ``MapDataset`` over the same arrays cost about 4 ms per
digits-sized batch, too much for jobs of thousands of tiny steps.)

Augmentations (``augment=True``, training only):

* CIFAR: random 32x32 crop of the image zero-padded by 4 pixels, random
  horizontal flip.
* ImageNet: random-resized crop to 224 (area 8-100 %, aspect 3/4-4/3),
  random horizontal flip; evaluation resizes the shorter side to 256 and takes
  the central 224x224.
* digits, mnist1d, mnist, fashion_mnist: none.

Every dataset is then normalized per channel (see :class:`DatasetSpec`).
"""

import concurrent.futures
import functools
import io
import itertools
import math
import os
from collections.abc import Callable, Iterator

import jax
import numpy as np
import PIL.Image

from dessilbi_jax.data import datasets

Batch = dict[str, np.ndarray]
# read(indices, rng) -> (float32 images, int32 labels); rng None: no augmentation.
Reader = Callable[[np.ndarray, np.random.Generator | None],
                  tuple[np.ndarray, np.ndarray]]


def steps_per_epoch(name: str, batch_size: int) -> int:
  """Training steps in one epoch: ``num_train // batch_size`` (remainder dropped)."""
  num_train = datasets.dataset_info(name).num_train
  return _steps_per_epoch(name, num_train, batch_size)


def train_batches(name: str, batch_size: int, *, seed: int,
                  start_step: int = 0, num_devices: int | None = None,
                  augment: bool = True, data_dir: str | None = None
                  ) -> Iterator[Batch]:
  """Endless shuffled training batches ``{'image': float32, 'label': int32}``.

  ``batch_size`` is the global batch over all hosts and devices. Each process
  gets its ``jax.process_index()``-th slice of every batch; with
  ``num_devices=D`` its arrays get a leading device axis, ``[D, B / (D P), ...]``
  for ``P`` processes, ready for ``jax.pmap``.

  Args:
    name: one of :data:`DATASETS`.
    batch_size: global batch size; a multiple of ``num_devices`` x processes.
    seed: the shuffling and augmentation seed.
    start_step: the first batch to yield (to resume a run).
    num_devices: local devices, for the leading device axis; None: no axis.
    augment: apply the dataset's training augmentation (module docstring).
    data_dir: the tfds data directory; None: the default.

  Example::

    >>> batches = train_batches('digits', 128, seed=0, num_devices=1)
    >>> batch = next(batches)
    >>> batch['image'].shape, batch['label'].shape
    ((1, 128, 8, 8, 1), (1, 128))
  """
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f'seed must be a non-negative integer, got {seed!r}.')
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}.')
  num_examples, read = _reader(name, 'train', data_dir)
  local_size, offset = _host_slice(batch_size, num_devices)
  steps = _steps_per_epoch(name, num_examples, batch_size)
  augment = augment and datasets.spec(name).augmentation is not None
  process = jax.process_index()

  def batches():
    epoch, order = None, None
    for step in itertools.count(start_step):
      if step // steps != epoch:
        epoch = step // steps
        order = np.random.default_rng((seed, epoch)).permutation(num_examples)
      start = (step % steps) * batch_size + offset
      rng = np.random.default_rng((seed, step, process)) if augment else None
      images, labels = read(order[start:start + local_size], rng)
      yield _with_device_axis({'image': images, 'label': labels}, num_devices)

  return batches()


def eval_batches(name: str, split: str, batch_size: int, *,
                 num_devices: int | None = None, data_dir: str | None = None
                 ) -> Iterator[Batch]:
  """One ordered pass over ``split``; the last batch padded, ``'mask'`` 1 on real examples.

  Shapes and host/device split as in :func:`train_batches`; over all hosts,
  every example appears exactly once with mask 1.

  Example::

    >>> correct = total = 0
    >>> for batch in eval_batches('digits', 'test', 100):
    ...   predictions = np.zeros_like(batch['label'])       # a model here
    ...   correct += np.sum((predictions == batch['label']) * batch['mask'])
    ...   total += np.sum(batch['mask'])
  """
  num_examples, read = _reader(name, split, data_dir)
  local_size, offset = _host_slice(batch_size, num_devices)
  input_shape = datasets.dataset_info(name).input_shape
  label_shape = datasets.spec(name).label_shape

  def batches():
    for start in range(0, num_examples, batch_size):
      positions = np.arange(start + offset, start + offset + local_size)
      count = int(np.clip(num_examples - positions[0], 0, local_size))
      batch = {'image': np.zeros((local_size, *input_shape), np.float32),
               'label': np.zeros((local_size, *label_shape), np.int32),
               'mask': (np.arange(local_size) < count).astype(np.float32)}
      if count:
        batch['image'][:count], batch['label'][:count] = read(
            positions[:count], None)
      yield _with_device_axis(batch, num_devices)

  return batches()


def pad_crop_flip(images: np.ndarray, rng: np.random.Generator,
                  padding: int = 4) -> np.ndarray:
  """Per example: a random crop of the image zero-padded by ``padding``, flipped with p=1/2.

  ``images`` is ``[N, H, W, C]``; the result has the same shape and dtype.
  """
  n, height, width, _ = images.shape
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding),
                           (0, 0)))
  dy, dx = rng.integers(0, 2 * padding + 1, size=(2, n))
  flip = rng.random(n) < 0.5
  crops = np.empty_like(images)
  for i in range(n):
    crop = padded[i, dy[i]:dy[i] + height, dx[i]:dx[i] + width]
    crops[i] = crop[:, ::-1] if flip[i] else crop
  return crops


def random_resized_crop(image: PIL.Image.Image, rng: np.random.Generator,
                        size: int = 224, area: tuple[float, float] = (0.08, 1.0),
                        aspect: tuple[float, float] = (3 / 4, 4 / 3)
                        ) -> np.ndarray:
  """Inception-style crop: a random box of ``area`` x the image area and ``aspect``
  width/height ratio (log-uniform), resized to ``size`` x ``size``, flipped with p=1/2.

  After 10 boxes that do not fit, the central square is used.
  """
  width, height = image.size
  box = _center_box(width, height, 1.0)
  for _ in range(10):
    target_area = width * height * rng.uniform(*area)
    ratio = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1])))
    crop_width = round(math.sqrt(target_area * ratio))
    crop_height = round(math.sqrt(target_area / ratio))
    if 0 < crop_width <= width and 0 < crop_height <= height:
      left = int(rng.integers(0, width - crop_width + 1))
      top = int(rng.integers(0, height - crop_height + 1))
      box = (left, top, left + crop_width, top + crop_height)
      break
  crop = image.resize((size, size), PIL.Image.Resampling.BILINEAR, box=box)
  if rng.random() < 0.5:
    crop = crop.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
  return np.asarray(crop)


def center_crop(image: PIL.Image.Image, size: int = 224,
                resize: int = 256) -> np.ndarray:
  """The shorter side resized to ``resize``, then the central ``size`` x ``size``."""
  box = _center_box(*image.size, size / resize)
  return np.asarray(
      image.resize((size, size), PIL.Image.Resampling.BILINEAR, box=box))


def _center_box(width: int, height: int, fraction: float
                ) -> tuple[float, float, float, float]:
  side = min(width, height) * fraction
  left, top = (width - side) / 2, (height - side) / 2
  return (left, top, left + side, top + side)


def _reader(name: str, split: str, data_dir: str | None) -> tuple[int, Reader]:
  """The number of examples of ``split`` and a function reading a batch of them."""
  data_dir = datasets.resolve_data_dir(data_dir)
  if name in datasets.STREAMED:
    source = datasets.open_source(name, split, data_dir, decode_images=False)

    def read_encoded(indices, rng):
      records = datasets.read_records(name, source, indices.tolist())
      rngs = rng.spawn(len(records)) if rng is not None else [None] * len(records)
      images = _thread_pool().map(
          _decode_and_crop, [record['image'] for record in records], rngs)
      labels = np.array([record['label'] for record in records], np.int32)
      return datasets.normalize(name, np.stack(list(images))), labels

    return len(source), read_encoded

  images, labels = datasets.raw_split(name, split, data_dir)

  def read_in_memory(indices, rng):
    batch = images[indices]
    if rng is not None:   # the one augmentation of in-memory datasets: CIFAR's
      batch = pad_crop_flip(batch, rng)
    return datasets.normalize(name, batch), labels[indices]

  return len(labels), read_in_memory


def _decode_and_crop(encoded: bytes, rng: np.random.Generator | None
                     ) -> np.ndarray:
  image = PIL.Image.open(io.BytesIO(encoded)).convert('RGB')
  return center_crop(image) if rng is None else random_resized_crop(image, rng)


@functools.cache
def _thread_pool() -> concurrent.futures.ThreadPoolExecutor:
  return concurrent.futures.ThreadPoolExecutor(os.cpu_count())


def _host_slice(batch_size: int, num_devices: int | None) -> tuple[int, int]:
  """This process's share of a global batch: (size, offset into the batch)."""
  if num_devices is not None and num_devices < 1:
    raise ValueError(f'num_devices must be >= 1 or None, got {num_devices}.')
  processes = jax.process_count()
  divisor = (num_devices or 1) * processes
  if batch_size < 1 or batch_size % divisor:
    raise ValueError(
        f'batch_size {batch_size} must be a positive multiple of num_devices x '
        f'process_count = {num_devices or 1} x {processes} = {divisor}; use '
        f'for example {max(1, round(batch_size / divisor)) * divisor}.')
  local_size = batch_size // processes
  return local_size, jax.process_index() * local_size


def _steps_per_epoch(name: str, num_examples: int, batch_size: int) -> int:
  if batch_size > num_examples:
    raise ValueError(f'batch_size {batch_size} is larger than the {num_examples} '
                     f'training examples of {name}; use at most {num_examples}.')
  return num_examples // batch_size


def _with_device_axis(batch: Batch, num_devices: int | None) -> Batch:
  if num_devices is None:
    return batch
  return {key: value.reshape(num_devices, -1, *value.shape[1:])
          for key, value in batch.items()}
