"""The settings of the DessiLBI paper's experiments, on prepared data.

::

  python examples/paper_settings.py lenet-mnist --out runs/lenet-mnist
  python examples/paper_settings.py vgg16-cifar10 --out runs/vgg16-cifar10 [--resume]
  python examples/paper_settings.py resnet56-cifar10 --out runs/resnet56-cifar10
  python examples/paper_settings.py resnet18-imagenet --out gs://.../resnet18 [--distributed]
  python examples/paper_settings.py resnet50-imagenet --out ... [--distributed]
  python examples/paper_settings.py vgg16-cifar10 --optimizer sgd --out ...   # the SGD baseline

Each setting is a :class:`dessilbi_jax.train.TrainConfig` given to
:func:`dessilbi_jax.train.fit`, which trains data-parallel over all local
devices (a GPU host or a TPU VM) with ``jax.pmap``. On several hosts, start
the same command on every host with ``--distributed``
(``jax.distributed.initialize()`` then finds the others from the TPU or
SLURM/Open MPI environment); each host reads its own slice of every batch and
only process 0 writes metrics and plots. ``--batch-size`` is global.

The datasets must be prepared first (TensorFlow is needed for that step only)::

  pip install 'dessilbi-jax[tensorflow]'
  tfds build mnist cifar10 --data_dir=$DESSILBI_DATA_DIR --file_format=array_record
  # ImageNet: put the ILSVRC2012 tars in $DESSILBI_DATA_DIR/downloads/manual first.

Hyperparameters: κ, ν, λ, the learning rate and its decay, batch size and epochs
follow Fu et al. (ICML 2020) and its reference code (LeNet: α = 0.1, κ = 1,
ν = 20, 60 epochs, α ÷ 10 every 20 epochs; CIFAR and ImageNet: α = 0.1, κ = 1,
ν = 100, λ = 1), with the usual schedules and weight decays of these benchmarks.
The paper finds sparse structures that retrain well by epochs 20-40 of the
CIFAR runs: ``dessilbi ticket --run DIR --epoch 30``.
"""

import argparse
import dataclasses

from dessilbi_jax import train

SETTINGS = {
    'lenet-mnist': train.TrainConfig(
        model='lenet', dataset='mnist', epochs=60, batch_size=128, lr=0.1, lr_decay_epochs=(20, 40),
        kappa=1.0, mu=20.0, lambdas=1.0, normalize_groups=False),
    'vgg16-cifar10': train.TrainConfig(
        model='vgg16', dataset='cifar10', epochs=160, batch_size=128, lr=0.1, lr_decay_epochs=(80, 120),
        weight_decay=5e-4, kappa=1.0, mu=100.0, lambdas=1.0, normalize_groups=False),
    'resnet56-cifar10': train.TrainConfig(
        model='resnet56', dataset='cifar10', epochs=160, batch_size=128, lr=0.1, lr_decay_epochs=(80, 120),
        weight_decay=5e-4, kappa=1.0, mu=100.0, lambdas=1.0, normalize_groups=False),
    'resnet18-imagenet': train.TrainConfig(
        model='resnet18', dataset='imagenet2012', epochs=90, batch_size=256, lr=0.1, lr_decay_epochs=(30, 60),
        weight_decay=1e-4, kappa=1.0, mu=100.0, lambdas=1.0, normalize_groups=False),
    'resnet50-imagenet': train.TrainConfig(
        model='resnet50', dataset='imagenet2012', epochs=90, batch_size=256, lr=0.1, lr_decay_epochs=(30, 60),
        weight_decay=1e-4, kappa=1.0, mu=100.0, lambdas=1.0, normalize_groups=False),
}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('setting', choices=sorted(SETTINGS))
  parser.add_argument('--out', required=True, help='run directory')
  parser.add_argument('--resume', action='store_true', help='continue the run in --out')
  parser.add_argument('--optimizer', default='dessilbi', choices=train.OPTIMIZERS)
  parser.add_argument('--batch-size', type=int, help='global batch size (default: the setting\'s)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--data-dir', help='where the datasets are prepared')
  parser.add_argument('--distributed', action='store_true', help='several hosts: jax.distributed.initialize()')
  args = parser.parse_args()
  if args.distributed:
    import jax
    jax.distributed.initialize()
  cfg = dataclasses.replace(SETTINGS[args.setting], optimizer=args.optimizer, seed=args.seed,
                            data_dir=args.data_dir)
  if args.batch_size:
    cfg = dataclasses.replace(cfg, batch_size=args.batch_size)
  train.fit(cfg, args.out, resume=args.resume)


if __name__ == '__main__':
  main()
