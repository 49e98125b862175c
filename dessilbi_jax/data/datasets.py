"""The datasets: what each one is, where its prepared files live, how to read them.

Every dataset is read with ``tfds`` data sources over ArrayRecord files in a
tfds data directory (no TensorFlow needed to read). ``digits`` and ``mnist1d``
are prepared there on first use from installed packages (no network); the
standard datasets must have been prepared beforehand with ``tfds build``, which
needs TensorFlow. Their directory is checked before tfds is asked for
anything, so a missing dataset fails at once instead of starting a download.
"""

import functools
import json
import os
import re
from typing import Any, NamedTuple

import numpy as np

DATASETS = ('digits', 'mnist1d', 'python_source', 'mnist', 'fashion_mnist',
            'cifar10', 'cifar100', 'imagenet2012')
SPLITS = ('train', 'test')


class DatasetInfo(NamedTuple):
  """What a model needs to know about a dataset; ``input_shape`` has no batch axis."""
  name: str
  num_classes: int
  input_shape: tuple[int, ...]
  num_train: int
  num_test: int


class DatasetSpec(NamedTuple):
  """How a dataset is stored and normalized.

  A stored value ``v`` becomes ``(v / pixel_max - mean) / std`` per channel.
  ``augmentation`` names the training augmentation of
  :mod:`dessilbi_jax.data.pipeline`: ``'pad_crop_flip'``, ``'resized_crop'``
  or ``None``.
  """
  info: DatasetInfo
  tfds_name: str
  test_split: str
  pixel_max: float
  mean: tuple[float, ...]
  std: tuple[float, ...]
  augmentation: str | None
  label_shape: tuple[int, ...] = ()   # a label per example; (64,): one per position (next-byte targets)


_SPECS = {
    'digits': DatasetSpec(
        DatasetInfo('digits', 10, (8, 8, 1), 1442, 355), 'dessilbi_digits',
        'test', 16.0, (0.3051,), (0.3762,), None),
    'mnist1d': DatasetSpec(
        DatasetInfo('mnist1d', 10, (40, 1), 4000, 1000), 'dessilbi_mnist1d',
        'test', 1.0, (0.0,), (1.0,), None),
    'mnist': DatasetSpec(
        DatasetInfo('mnist', 10, (28, 28, 1), 60000, 10000), 'mnist', 'test',
        255.0, (0.1307,), (0.3081,), None),
    'fashion_mnist': DatasetSpec(
        DatasetInfo('fashion_mnist', 10, (28, 28, 1), 60000, 10000),
        'fashion_mnist', 'test', 255.0, (0.2860,), (0.3530,), None),
    'cifar10': DatasetSpec(
        DatasetInfo('cifar10', 10, (32, 32, 3), 50000, 10000), 'cifar10',
        'test', 255.0, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        'pad_crop_flip'),
    'cifar100': DatasetSpec(
        DatasetInfo('cifar100', 100, (32, 32, 3), 50000, 10000), 'cifar100',
        'test', 255.0, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
        'pad_crop_flip'),
    'imagenet2012': DatasetSpec(
        DatasetInfo('imagenet2012', 1000, (224, 224, 3), 1281167, 50000),
        'imagenet2012', 'validation', 255.0, (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225), 'resized_crop'),
}
_OFFLINE = ('digits', 'mnist1d', 'python_source')
STREAMED = ('imagenet2012',)   # too large to hold in memory: read per batch
_READ_ERRORS = (OSError, RuntimeError, ValueError, KeyError, TypeError)


class DatasetNotPreparedError(FileNotFoundError, ValueError):
  """A standard dataset has no prepared files in the data directory."""


def spec(name: str) -> DatasetSpec:
  if name == 'python_source':
    return _python_source_spec()
  if name not in _SPECS:
    raise ValueError(f'Unknown dataset {name!r}; choose one of {DATASETS}.')
  return _SPECS[name]


@functools.cache
def _python_source_spec() -> DatasetSpec:
  """Byte windows of the standard library's source; the split sizes from the files' sizes (nothing read).

  A file of ``n`` bytes gives ``(n - 1) // 64`` windows: bytes ``[64 i, 64 i + 64)``
  as the input and ``[64 i + 1, 64 i + 65)`` as the targets.
  """
  from dessilbi_jax.data import builders  # pylint: disable=g-import-not-at-top
  context = builders.PYTHON_SOURCE_CONTEXT
  sizes = {'train': 0, 'test': 0}
  for i, path in enumerate(builders.python_source_files()):
    sizes['test' if builders.python_source_is_test(i) else 'train'] += (os.path.getsize(path) - 1) // context
  info = DatasetInfo('python_source', 256, (context,), sizes['train'], sizes['test'])
  return DatasetSpec(info, 'dessilbi_python_source', 'test', 1.0, (0.0,), (1.0,), None, (context,))


def _text_windows(records, context: int) -> tuple[np.ndarray, np.ndarray]:
  """Per file, its non-overlapping windows of ``context`` bytes and the bytes one later (the targets)."""
  inputs, targets = [], []
  for record in records:
    text = np.asarray(record['bytes'], np.uint8)
    n = (len(text) - 1) // context
    inputs.append(text[:n * context].reshape(n, context))
    targets.append(text[1:n * context + 1].reshape(n, context))
  return (np.concatenate(inputs) if inputs else np.zeros((0, context), np.uint8),
          np.concatenate(targets).astype(np.int32) if targets else np.zeros((0, context), np.int32))


def dataset_info(name: str) -> DatasetInfo:
  """Classes, input shape and split sizes of ``name`` (reads no files).

  Example::

    >>> dataset_info('digits').input_shape
    (8, 8, 1)
  """
  return spec(name).info


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> str:
  """``data_dir``, else ``$DESSILBI_DATA_DIR``, else tfds' default directory."""
  if data_dir is None:
    data_dir = os.environ.get('DESSILBI_DATA_DIR') or os.environ.get(
        'TFDS_DATA_DIR') or os.path.join('~', 'tensorflow_datasets')
  return os.path.abspath(os.path.expanduser(os.fspath(data_dir)))


def prepared_dir(name: str, data_dir: str | None = None) -> str:
  """The directory of ``name``'s prepared files; prepares digits and mnist1d on first use."""
  dataset_spec = spec(name)
  root = resolve_data_dir(data_dir)
  path = _latest_version_dir(os.path.join(root, dataset_spec.tfds_name))
  if path is None and name in _OFFLINE:
    _prepare_offline(name, root)
    path = _latest_version_dir(os.path.join(root, dataset_spec.tfds_name))
  if path is None:
    raise DatasetNotPreparedError(
        f'Dataset {name!r} is not prepared in the data directory {root}: '
        f'looked for {os.path.join(root, dataset_spec.tfds_name)}/<version>/'
        f'dataset_info.json. {_how_to_prepare(name, root)}')
  _check_prepared(name, path, root)
  return path


def open_source(name: str, split: str, data_dir: str | None = None,
                decode_images: bool = True) -> Any:
  """A tfds random-access data source over one split (``len``, ``__getitems__``).

  ``split`` is ``'train'`` or ``'test'`` (ImageNet's ``'test'`` is its
  validation set). With ``decode_images=False`` images stay encoded bytes.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}; choose one of {SPLITS}.')
  dataset_spec = spec(name)
  path = prepared_dir(name, data_dir)
  tfds_split = dataset_spec.test_split if split == 'test' else split
  decoders = None if decode_images else {'image': tfds.decode.SkipDecoding()}
  try:
    builder = tfds.builder_from_directory(path)
    return builder.as_data_source(split=tfds_split, decoders=decoders)
  except _READ_ERRORS as err:
    raise _corrupt_error(name, path, err) from err


def read_records(name: str, source: Any, indices) -> list[dict[str, Any]]:
  """``source[indices]`` as a list of example dicts, read errors made clear."""
  try:
    records = source.__getitems__(indices)
  except _READ_ERRORS as err:
    raise _corrupt_error(name, _source_dir(source), err) from err
  # A truncated ArrayRecord file reads as records whose fields are None.
  if any(value is None for record in records for value in record.values()):
    raise _corrupt_error(name, _source_dir(source), 'a file is truncated: some records are empty')
  return records


@functools.lru_cache(maxsize=8)
def raw_split(name: str, split: str, data_dir: str | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
  """The whole split in memory, as stored: (images, int32 labels), read-only.

  Read once per process; only for datasets that fit in memory (not ImageNet).
  Text (``python_source``): the byte windows of every file and their targets,
  both ``[N, 64]``.
  """
  dataset_spec = spec(name)
  if name in STREAMED:
    raise ValueError(f'{name} is too large to hold in memory; read it in '
                     'batches with train_batches / eval_batches.')
  source = open_source(name, split, data_dir)
  records = read_records(name, source, range(len(source)))
  if dataset_spec.label_shape:   # text: windows of bytes, the next byte at every position
    images, labels = _text_windows(records, dataset_spec.info.input_shape[0])
  else:
    images = np.stack([record['image'] for record in records])
    labels = np.array([record['label'] for record in records], np.int32)
  info = dataset_spec.info
  if (images.shape[1:] != info.input_shape or labels.size == 0 or
      labels.min() < 0 or labels.max() >= info.num_classes):
    raise ValueError(
        f'The prepared {name} files in {_source_dir(source)} hold images of '
        f'shape {images.shape[1:]} and labels in [{labels.min(initial=0)}, '
        f'{labels.max(initial=0)}], expected {info.input_shape} and '
        f'[0, {info.num_classes - 1}]: they are not the standard {name}. '
        f'{_how_to_prepare(name, resolve_data_dir(data_dir))}')
  images.flags.writeable = False
  labels.flags.writeable = False
  return images, labels


def normalize(name: str, images: np.ndarray) -> np.ndarray:
  """Stored values to float32 ``(v / pixel_max - mean) / std`` per channel."""
  scale, shift = _scale_and_shift(name, images.shape[1:])
  normalized = images.astype(np.float32)
  # In place and with constants of the full example shape: numpy is several
  # times slower broadcasting a length-3 channel axis or allocating temporaries.
  normalized *= scale
  normalized += shift
  return normalized


@functools.cache
def _scale_and_shift(name: str, shape: tuple[int, ...]
                     ) -> tuple[np.ndarray, np.ndarray]:
  dataset_spec = spec(name)
  std = np.asarray(dataset_spec.std, np.float32)
  scale = 1.0 / (dataset_spec.pixel_max * std)
  shift = -np.asarray(dataset_spec.mean, np.float32) / std
  return (np.broadcast_to(scale, shape).copy(),
          np.broadcast_to(shift, shape).copy())


def load_arrays(name: str, split: str, data_dir: str | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
  """A whole split as numpy: (float32 normalized images, int32 labels).

  For datasets that fit in memory; the files are read once per process.

  Example::

    >>> x, y = load_arrays('digits', 'train')
    >>> x.shape, y.shape
    ((1442, 8, 8, 1), (1442,))
  """
  images, labels = raw_split(name, split, resolve_data_dir(data_dir))
  return normalize(name, images), labels.copy()


def _prepare_offline(name: str, root: str) -> None:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from dessilbi_jax.data import builders  # pylint: disable=g-import-not-at-top
  builder_cls = {'digits': builders.DessilbiDigits,
                 'mnist1d': builders.DessilbiMnist1d,
                 'python_source': builders.DessilbiPythonSource}[name]
  builder = builder_cls(data_dir=root, file_format='array_record')
  try:
    # tfds' progress bars for a second of work would only clutter a training log.
    with builders.global_rngs_preserved(), builders.tfds_progress_bars_hidden():
      # try_download_gcs=False: tfds would otherwise look the name up on GCS.
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          try_download_gcs=False))
  except OSError as err:
    # Another process preparing the same directory renamed its files into
    # place first; theirs are as good as ours.
    if _latest_version_dir(os.path.dirname(builder.data_dir)) is None:
      raise DatasetNotPreparedError(
          f'Cannot prepare {name} in the data directory {root}: '
          f'{err.strerror or err} ({err.filename or root}). Point --data-dir '
          '(or $DESSILBI_DATA_DIR) at a directory you can write to.') from err


def _latest_version_dir(dataset_dir: str) -> str | None:
  """``dataset_dir/<highest x.y.z>``, or None if it has no version directory."""
  try:
    entries = os.listdir(dataset_dir)
  except (FileNotFoundError, NotADirectoryError):
    return None
  versions = [entry for entry in entries
              if re.fullmatch(r'\d+\.\d+\.\d+', entry) and
              os.path.isdir(os.path.join(dataset_dir, entry))]
  if not versions:
    return None
  latest = max(versions, key=lambda v: tuple(int(p) for p in v.split('.')))
  return os.path.join(dataset_dir, latest)


def _check_prepared(name: str, path: str, root: str) -> None:
  """Clear errors for an interrupted preparation or a non-ArrayRecord one."""
  info_path = os.path.join(path, 'dataset_info.json')
  try:
    with open(info_path) as f:
      info = json.load(f)
  except FileNotFoundError as err:
    raise _corrupt_error(name, path, 'dataset_info.json is missing') from err
  except (OSError, ValueError) as err:
    raise _corrupt_error(name, path, err) from err
  formats = [info.get('fileFormat', 'tfrecord'),
             *info.get('alternativeFileFormats', [])]
  if 'array_record' not in formats:
    raise ValueError(
        f'{name} in {path} was prepared as {formats[0]}, but reading without '
        f'TensorFlow needs ArrayRecord files. {_how_to_prepare(name, root)}')


def _how_to_prepare(name: str, root: str) -> str:
  if name in _OFFLINE:
    return f'{name} is prepared automatically (offline) into an empty directory.'
  tfds_name = spec(name).tfds_name
  manual = (' --manual_dir=DIR_WITH_THE_IMAGENET_TAR_FILES'
            if name == 'imagenet2012' else '')
  return (f"Preparing it needs TensorFlow: pip install 'dessilbi-jax[tensorflow]'"
          f' then run: tfds build {tfds_name} --data_dir={root} '
          f'--file_format=array_record{manual} (or point data_dir / '
          '$DESSILBI_DATA_DIR at a directory where it is prepared).')


def _corrupt_error(name: str, path: str, cause: Any) -> ValueError:
  again = (f'{name} is then prepared again on next use.' if name in _OFFLINE
           else _how_to_prepare(name, os.path.dirname(os.path.dirname(path))))
  return ValueError(
      f'The prepared files of {name} in {path} are corrupt or incomplete '
      f'({cause}). Delete that directory; {again}')


def _source_dir(source: Any) -> str:
  return str(source.dataset_info.data_dir)
