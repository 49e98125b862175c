"""Tests of dessilbi_jax.data: offline builders, standard-dataset reading, the pipeline."""

import io
import json
import os
import random
import shutil
import time

import jax
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from dessilbi_jax import data
from dessilbi_jax.data import datasets
from dessilbi_jax.data import pipeline


def _encode(array: np.ndarray, image_format: str) -> bytes:
  buffer = io.BytesIO()
  PIL.Image.fromarray(array).save(buffer, image_format)
  return buffer.getvalue()


class FakeMnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """mnist's name, version and features (PNG images); image i is filled with 3 i."""
  name = 'mnist'
  VERSION = tfds.core.Version('3.0.1')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(28, 28, 1)),
        'label': tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(40), 'test': self._generate_examples(15)}

  def _generate_examples(self, n):
    for i in range(n):
      image = np.full((28, 28), 3 * i, np.uint8)
      yield i, {'image': _encode(image, 'PNG'), 'label': i % 10}


class FakeCifar10(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """cifar10's name, version and features, with random images."""
  name = 'cifar10'
  VERSION = tfds.core.Version('3.0.2')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(32, 32, 3)),
        'label': tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(64, 0), 'test': self._generate_examples(10, 1)}

  def _generate_examples(self, n, seed):
    images = np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), np.uint8)
    for i in range(n):
      yield i, {'image': _encode(images[i], 'PNG'), 'label': i % 10}


class FakeImagenet(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """imagenet2012's name, version and features (JPEGs of varying sizes)."""
  name = 'imagenet2012'
  VERSION = tfds.core.Version('5.1.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(encoding_format='jpeg'),
        'label': tfds.features.ClassLabel(num_classes=1000)}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(8), 'validation': self._generate_examples(3)}

  def _generate_examples(self, n):
    for i in range(n):
      image = np.full((256, 320 + 8 * i, 3), 20 * i, np.uint8)
      image[:, 160:] = 255 - 20 * i   # a right half that a flip moves
      yield i, {'image': _encode(image, 'JPEG'), 'label': 100 * i}


@pytest.fixture(scope='session')
def data_dir(prepare_data):
  """digits and mnist1d prepared offline, once per session (conftest.py)."""
  prepare_data('mnist1d')
  return prepare_data('digits')


@pytest.fixture(scope='session')
def standard_dir(tmp_path_factory):
  """Small stand-ins for mnist, cifar10 and imagenet2012, prepared like `tfds build` does."""
  path = str(tmp_path_factory.mktemp('standard'))
  for builder_cls in (FakeMnist, FakeCifar10, FakeImagenet):
    builder_cls(data_dir=path, file_format='array_record').download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return path


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _sorted_rows(x):
  x = np.asarray(x).reshape(len(x), -1)
  return x[np.lexsort(x.T[::-1])]


def test_digits_builder_holds_load_digits_with_a_stratified_split(data_dir):
  (train_x, train_y), (test_x, test_y) = (
      datasets.raw_split('digits', split, data_dir) for split in ('train', 'test'))
  reference = load_digits()
  info = data.dataset_info('digits')
  assert (len(train_y), len(test_y)) == (info.num_train, info.num_test) == (1442, 355)
  rows = np.concatenate([train_x.reshape(-1, 64), test_x.reshape(-1, 64)])
  labels = np.concatenate([train_y, test_y])
  np.testing.assert_array_equal(
      _sorted_rows(np.c_[rows, labels]),
      _sorted_rows(np.c_[reference.images.reshape(-1, 64), reference.target]))
  np.testing.assert_array_equal(np.bincount(test_y), np.bincount(reference.target) // 5)


def test_mnist1d_builder_holds_the_standard_split(data_dir):
  from mnist1d.data import make_dataset
  reference = make_dataset()
  for split, key in (('train', 'x'), ('test', 'x_test')):
    x, y = data.load_arrays('mnist1d', split, data_dir=data_dir)
    assert x.shape == (len(reference[key]), 40, 1) and x.dtype == np.float32
    expected_y = reference['y' if split == 'train' else 'y_test']
    np.testing.assert_allclose(
        _sorted_rows(np.c_[x[..., 0], y]),
        _sorted_rows(np.c_[reference[key], expected_y]), rtol=1e-6)
  assert (data.dataset_info('mnist1d').num_train,
          data.dataset_info('mnist1d').num_test) == (4000, 1000)


def test_load_arrays_is_normalized_with_labels_in_range(data_dir):
  for name in ('digits', 'mnist1d'):
    info = data.dataset_info(name)
    x, y = data.load_arrays(name, 'train', data_dir=data_dir)
    assert x.shape[1:] == info.input_shape and x.dtype == np.float32
    assert y.dtype == np.int32 and y.min() == 0 and y.max() == info.num_classes - 1
    assert abs(x.mean()) < 0.01 and abs(x.std() - 1) < 0.01


def test_mnist1d_preparation_leaves_global_rngs_alone(tmp_path):
  np.random.seed(123)
  random.seed(123)
  expected_numpy, expected_python = np.random.rand(), random.random()
  np.random.seed(123)
  random.seed(123)
  data.load_arrays('mnist1d', 'test', data_dir=str(tmp_path))
  assert os.path.exists(tmp_path / 'dessilbi_mnist1d' / '1.0.0' / 'dataset_info.json')
  assert (np.random.rand(), random.random()) == (expected_numpy, expected_python)


def test_batches_are_deterministic_per_seed_and_reshuffled_each_epoch(data_dir):
  first = _take(data.train_batches('digits', 100, seed=1, data_dir=data_dir), 15)
  again = _take(data.train_batches('digits', 100, seed=1, data_dir=data_dir), 15)
  other = _take(data.train_batches('digits', 100, seed=2, data_dir=data_dir), 1)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  assert not np.array_equal(first[0]['image'], other[0]['image'])
  assert data.steps_per_epoch('digits', 100) == 14
  assert not np.array_equal(first[0]['image'], first[14]['image'])  # epoch 2


def test_an_epoch_visits_each_example_once(data_dir):
  x, _ = data.load_arrays('mnist1d', 'train', data_dir=data_dir)
  for epoch in range(2):
    batches = _take(data.train_batches('mnist1d', 500, seed=0, start_step=8 * epoch,
                                       data_dir=data_dir), 8)
    seen = np.concatenate([batch['image'] for batch in batches])
    np.testing.assert_array_equal(_sorted_rows(seen), _sorted_rows(x))


@pytest.mark.parametrize('name', ['digits', 'cifar10'])
def test_resuming_gives_the_batches_of_a_straight_run(name, data_dir, standard_dir):
  directory = standard_dir if name == 'cifar10' else data_dir
  straight = _take(data.train_batches(name, 16, seed=3, data_dir=directory), 12)
  resumed = _take(data.train_batches(name, 16, seed=3, start_step=7, data_dir=directory), 5)
  for a, b in zip(straight[7:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


def test_shapes_per_device(data_dir):
  batch = next(data.train_batches('digits', 32, seed=0, num_devices=4, data_dir=data_dir))
  assert batch['image'].shape == (4, 8, 8, 8, 1) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (4, 8) and batch['label'].dtype == np.int32
  batch = next(data.eval_batches('mnist1d', 'test', 32, num_devices=2, data_dir=data_dir))
  assert batch['image'].shape == (2, 16, 40, 1) and batch['mask'].shape == (2, 16)


def test_eval_covers_every_example_once_with_the_mask(data_dir):
  x, y = data.load_arrays('digits', 'test', data_dir=data_dir)
  batches = list(data.eval_batches('digits', 'test', 64, num_devices=4, data_dir=data_dir))
  assert len(batches) == 6   # ceil(355 / 64)
  images = np.concatenate([b['image'].reshape(64, 8, 8, 1) for b in batches])
  labels = np.concatenate([b['label'].reshape(64) for b in batches])
  mask = np.concatenate([b['mask'].reshape(64) for b in batches])
  np.testing.assert_array_equal(mask, np.arange(6 * 64) < 355)
  np.testing.assert_array_equal(images[:355], x)
  np.testing.assert_array_equal(labels[:355], y)
  assert not images[355:].any()


def test_hosts_share_batches_by_process_index(data_dir, monkeypatch):
  single_train = next(data.train_batches('digits', 64, seed=5, data_dir=data_dir))
  single_eval = list(data.eval_batches('digits', 'test', 200, data_dir=data_dir))
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  train, evals = [], []
  for process in range(2):
    monkeypatch.setattr(jax, 'process_index', lambda process=process: process)
    train.append(next(data.train_batches('digits', 64, seed=5, num_devices=2,
                                         data_dir=data_dir)))
    evals.append(list(data.eval_batches('digits', 'test', 200, data_dir=data_dir)))
  assert train[0]['image'].shape == (2, 16, 8, 8, 1)
  np.testing.assert_array_equal(
      np.concatenate([t['image'].reshape(32, 8, 8, 1) for t in train]), single_train['image'])
  for step, single in enumerate(single_eval):
    for key in ('image', 'label', 'mask'):
      np.testing.assert_array_equal(
          np.concatenate([evals[0][step][key], evals[1][step][key]]), single[key])
  with pytest.raises(ValueError, match='multiple of num_devices x process_count'):
    data.train_batches('digits', 66, seed=0, num_devices=2, data_dir=data_dir)


def test_bad_arguments_are_value_errors(data_dir):
  with pytest.raises(ValueError, match='multiple of num_devices'):
    data.train_batches('digits', 30, seed=0, num_devices=4, data_dir=data_dir)
  with pytest.raises(ValueError, match='multiple of num_devices'):
    data.eval_batches('digits', 'test', 30, num_devices=4, data_dir=data_dir)
  with pytest.raises(ValueError, match="Unknown dataset 'mnits'"):
    data.train_batches('mnits', 32, seed=0, data_dir=data_dir)
  with pytest.raises(ValueError, match='Unknown dataset'):
    data.dataset_info('svhn')
  with pytest.raises(ValueError, match='Unknown split'):
    data.load_arrays('digits', 'validation', data_dir=data_dir)
  with pytest.raises(ValueError, match='larger than the 1442 training examples'):
    data.train_batches('digits', 2048, seed=0, data_dir=data_dir)


@pytest.mark.parametrize(
    'name', ['mnist', 'fashion_mnist', 'cifar10', 'cifar100', 'imagenet2012'])
def test_an_unprepared_standard_dataset_fails_fast_and_says_how_to_prepare(name, tmp_path):
  start = time.perf_counter()
  with pytest.raises(data.DatasetNotPreparedError) as error:
    data.train_batches(name, 8, seed=0, data_dir=str(tmp_path))
  assert time.perf_counter() - start < 5
  message = str(error.value)
  assert str(tmp_path / name) in message and f'tfds build {name}' in message
  assert 'dessilbi-jax[tensorflow]' in message
  assert isinstance(error.value, ValueError) and isinstance(error.value, FileNotFoundError)
  assert os.listdir(tmp_path) == []   # nothing downloaded or created


def _copy_of_digits(data_dir, tmp_path):
  shutil.copytree(os.path.join(data_dir, 'dessilbi_digits'), tmp_path / 'dessilbi_digits')
  return tmp_path / 'dessilbi_digits' / '1.0.0'


def test_a_truncated_array_record_file_is_a_clear_error(data_dir, tmp_path):
  shard = next(_copy_of_digits(data_dir, tmp_path).glob('*-train.array_record-*'))
  with open(shard, 'r+b') as f:
    f.truncate(os.path.getsize(shard) // 2)
  start = time.perf_counter()
  with pytest.raises(ValueError, match='corrupt or incomplete.*Delete that directory; digits '
                                       'is then prepared again'):
    data.load_arrays('digits', 'train', data_dir=str(tmp_path))
  assert time.perf_counter() - start < 5


def test_a_partial_data_directory_is_a_clear_error(data_dir, tmp_path):
  version_dir = _copy_of_digits(data_dir, tmp_path)
  os.remove(next(version_dir.glob('*-test.array_record-*')))
  with pytest.raises(ValueError, match='corrupt or incomplete'):
    data.load_arrays('digits', 'test', data_dir=str(tmp_path))
  os.remove(version_dir / 'dataset_info.json')
  with pytest.raises(ValueError, match='dataset_info.json is missing'):
    data.load_arrays('digits', 'train', data_dir=str(tmp_path))
  assert not os.path.exists(version_dir / 'dataset_info.json')   # not re-prepared over it


def test_a_tfrecord_preparation_asks_for_array_record(standard_dir, tmp_path):
  shutil.copytree(os.path.join(standard_dir, 'mnist'), tmp_path / 'mnist')
  info_path = tmp_path / 'mnist' / '3.0.1' / 'dataset_info.json'
  info = json.loads(info_path.read_text())
  info['fileFormat'] = 'tfrecord'
  info_path.write_text(json.dumps(info))
  with pytest.raises(ValueError, match='--file_format=array_record'):
    data.load_arrays('mnist', 'train', data_dir=str(tmp_path))


def test_a_standard_dataset_is_read_from_its_prepared_files(standard_dir):
  x, y = data.load_arrays('mnist', 'train', data_dir=standard_dir)
  assert x.shape == (40, 28, 28, 1) and x.dtype == np.float32
  raw = np.round((x * 0.3081 + 0.1307) * 255)
  assert (raw == raw[:, :1, :1]).all()
  fill = raw[:, 0, 0, 0].astype(int)
  np.testing.assert_array_equal(np.sort(fill), 3 * np.arange(40))
  np.testing.assert_array_equal(y, (fill // 3) % 10)


def test_cifar_augmentation_crops_the_padded_image_and_flips(standard_dir):
  images, _ = datasets.raw_split('cifar10', 'train', standard_dir)
  images = images[:16]
  crops = pipeline.pad_crop_flip(images, np.random.default_rng(0))
  assert crops.shape == images.shape and crops.dtype == images.dtype
  padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
  flips = 0
  for image, crop in zip(padded, crops):
    candidates = [(window, flip) for flip in (False, True)
                  for dy in range(9) for dx in range(9)
                  for window in [image[dy:dy + 32, dx:dx + 32]]
                  if np.array_equal(window[:, ::-1] if flip else window, crop)]
    assert candidates
    flips += candidates[0][1]
  assert 0 < flips < 16
  batch = next(data.train_batches('cifar10', 16, seed=0, augment=False, data_dir=standard_dir))
  np.testing.assert_allclose(batch['image'].mean(axis=(0, 1, 2)),
                             ((images.mean((0, 1, 2)) / 255 - [0.4914, 0.4822, 0.4465])
                              / [0.2470, 0.2435, 0.2616]), atol=0.2)


def test_imagenet_batches_are_cropped_to_224(standard_dir):
  batches = _take(data.train_batches('imagenet2012', 4, seed=0, data_dir=standard_dir), 2)
  again = next(data.train_batches('imagenet2012', 4, seed=0, start_step=1,
                                  data_dir=standard_dir))
  assert batches[0]['image'].shape == (4, 224, 224, 3)
  assert batches[0]['image'].dtype == np.float32
  np.testing.assert_array_equal(batches[1]['image'], again['image'])
  assert set(batches[0]['label']) <= {0, 100, 200, 300, 400, 500, 600, 700}
  evals = list(data.eval_batches('imagenet2012', 'test', 2, data_dir=standard_dir))
  assert [b['mask'].tolist() for b in evals] == [[1, 1], [1, 0]]
  # Validation image 0 is 256 x 320: the central 224 x 224 is pixels [16:240, 48:272].
  decoded = np.zeros((256, 320, 3), np.uint8)
  decoded[:, 160:] = 255
  expected = (decoded[16:240, 48:272] / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
  images = np.concatenate([b['image'] for b in evals])
  labels = np.concatenate([b['label'] + 1000 * (1 - b['mask']) for b in evals])
  assert sorted(labels[:3]) == [0, 100, 200]
  assert np.mean(np.abs(images[list(labels).index(0)] - expected)) < 0.05


def test_per_batch_overhead_is_well_under_a_millisecond(data_dir):
  batches = data.train_batches('digits', 128, seed=0, num_devices=1, data_dir=data_dir)
  next(batches)
  start = time.perf_counter()
  for _ in range(500):
    next(batches)
  assert (time.perf_counter() - start) / 500 < 1e-3
