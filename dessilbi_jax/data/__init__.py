"""Datasets through tensorflow-datasets, read without TensorFlow, and their batches.

==============  =======  ===========  ==============  ===============================
name            classes  input shape  train / test    source
==============  =======  ===========  ==============  ===============================
digits          10       (8, 8, 1)    1,442 / 355     offline (scikit-learn)
mnist1d         10       (40, 1)      4,000 / 1,000   offline (``mnist1d`` package)
python_source   256      (64,)        ~67k / ~6k      offline (Python's own stdlib source)
mnist           10       (28, 28, 1)  60,000 / 10,000 ``tfds build``
fashion_mnist   10       (28, 28, 1)  60,000 / 10,000 ``tfds build``
cifar10         10       (32, 32, 3)  50,000 / 10,000 ``tfds build``
cifar100        100      (32, 32, 3)  50,000 / 10,000 ``tfds build``
imagenet2012    1000     (224,224,3)  1,281,167 / 50k ``tfds build`` (manual download)
==============  =======  ===========  ==============  ===============================

``python_source`` is byte-level text: each example is 64 bytes of a standard
library module (as float32 ids) and its label the 64 bytes one later (the next
byte at every position), split by file (every 10th file is a test file); its
sizes depend on the installed Python.

The data directory is ``data_dir``, else ``$DESSILBI_DATA_DIR``, else tfds'
default (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). The offline datasets
are prepared there on first use in about a second; the others are prepared
with TensorFlow::

  pip install 'dessilbi-jax[tensorflow]'
  tfds build cifar10 --data_dir=DIR --file_format=array_record

Example::

  from dessilbi_jax import data
  info = data.dataset_info('digits')
  for step, batch in zip(range(100), data.train_batches('digits', 128, seed=0)):
    ...   # batch['image']: float32 [128, 8, 8, 1], batch['label']: int32 [128]
"""

from dessilbi_jax.data.datasets import DATASETS
from dessilbi_jax.data.datasets import DatasetInfo
from dessilbi_jax.data.datasets import DatasetNotPreparedError
from dessilbi_jax.data.datasets import dataset_info
from dessilbi_jax.data.datasets import load_arrays
from dessilbi_jax.data.pipeline import eval_batches
from dessilbi_jax.data.pipeline import steps_per_epoch
from dessilbi_jax.data.pipeline import train_batches

__all__ = [
    'DATASETS',
    'DatasetInfo',
    'DatasetNotPreparedError',
    'dataset_info',
    'eval_batches',
    'load_arrays',
    'steps_per_epoch',
    'train_batches',
]
