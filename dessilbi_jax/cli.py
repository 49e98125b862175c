"""The ``dessilbi`` command: ``dessilbi train``, ``dessilbi grow`` and ``dessilbi ticket``.

::

  dessilbi train [--dataset digits] [--model lenet] [--optimizer dessilbi] [--epochs 60]
                 [--batch-size 64] [--lr 0.1] [--kappa 1] [--mu 20] [--lambda 0.2]
                 [--out DIR] [--resume] [--seed 0] ...
  dessilbi train --dataset mnist1d          # the 1-D convnet with mnist1d's preset
  dessilbi ticket --run DIR --epoch E [--init rewind|reinit] [--epochs N]
  dessilbi grow [--dataset digits] [--start-widths ...] [--tau 0.8] [--grow-every 10] [--target-macs M] [--out DIR]
  dessilbi compact --run DIR [--epoch E] --out DIR2
  dessilbi train --resume --out DIR [--epochs N] [--fall-back]
  dessilbi train --distributed [--coordinator-address HOST:PORT --num-processes N --process-id I] ...

Also ``python -m dessilbi_jax``. Every training flag defaults to the value of
the dataset's preset (:func:`dessilbi_jax.train.preset`; the defaults shown
are digits'), so ``--dataset`` picks the model and the hyperparameters and any
other flag overrides one of them. ``--lambda`` takes one number or
``kind=λ`` pairs (``--lambda filter=1 lasso=0.03``). With ``--resume`` the
run's saved configuration is used and only ``--epochs`` (the new total) may
change.
Errors in the input are reported in one line, naming the flag, and exit with
status 1 before any training starts; a non-finite loss stops training with status 1 and leaves the
last good checkpoint in place.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Optional, Sequence

_TRAIN_FLAGS = {
    # flag: (TrainConfig field, type, help)
    '--dataset': ('dataset', str, "dataset name (listed below; default digits); picks the "
                  "preset that every other flag defaults to (train.PRESETS)"),
    '--model': ('model', str, 'model name (listed below; digits: lenet, mnist1d: conv1d)'),
    '--optimizer': ('optimizer', str, 'dessilbi, sgd, adam, gmp, gmp_structured, prox_group_lasso, l0 '
                                      '(L0 gates under --target-density) or l0_penalty'),
    '--epochs': ('epochs', int, 'total epochs (digits 60, mnist1d 30); with --resume: the new total'),
    '--batch-size': ('batch_size', int, 'global batch size, a multiple of the device count (default 64)'),
    '--lr': ('lr', float, 'learning rate α (default 0.1; 0.001 for adam)'),
    '--lr-decay-epochs': ('lr_decay_epochs', int,
                          'epochs after which the lr is multiplied by --lr-decay (digits 40, mnist1d 20)'),
    '--lr-decay': ('lr_decay', float, 'factor of each lr decay (default 0.1)'),
    '--momentum': ('momentum', float, 'heavy-ball momentum β (default 0.9)'),
    '--weight-decay': ('weight_decay', float, 'L2 weight decay ω on kernels (default 0)'),
    '--kappa': ('kappa', float, 'DessiLBI damping κ (default 1)'),
    '--mu': ('mu', float, 'DessiLBI coupling ν (default 20)'),
    '--lambda': ('lambdas', str, 'DessiLBI threshold λ: one number, or kind=λ pairs such as filter=1 '
                                 'lasso=0.03; kinds not named keep the preset\'s (digits 0.2, mnist1d 0.1)'),
    '--sparsity': ('sparsity', float, 'gmp, gmp_structured: fraction of groups pruned at the end (default 0.9)'),
    '--penalty': ('penalty', float, 'prox_group_lasso: λ of the penalty λ·Σ‖W_g‖; l0_penalty: λ of '
                                    'λ·density (default 0.001)'),
    '--target-density': ('target_density', float, 'dessilbi: steer λ so that Γ\'s support ends on this fraction '
                                                   'of the structured weights, e.g. 0.3; l0: the gates\' '
                                                   'density constraint'),
    '--target-method': ('target_method', str, 'with --target-density: dual (dual ascent on λ, default) or budget '
                                              '(a cap on the support; λ only rises)'),
    '--constraint': ('constraint', str, 'with --target-density: model (one density for the network, default) '
                                        'or layer (each layer\'s)'),
    '--dual-lr': ('dual_lr', float, 'with --target-density: the dual learning rate (dessilbi 0.01, l0 0.1)'),
    '--gates-lr': ('gates_lr', float, 'l0, l0_penalty: the gates\' own learning rate, never decayed (default 10)'),
    '--droprate-init': ('droprate_init', float, 'l0, l0_penalty: p₀ of the gates\' initialization (default 0.3)'),
    '--seed': ('seed', int, 'seed of initialization, data order and augmentation (default 0)'),
    '--widths': ('widths', int, 'the model widths, e.g. --widths 6 16 120 84'),
    '--data-dir': ('data_dir', str, 'where datasets are prepared ($DESSILBI_DATA_DIR or tfds default)'),
    '--keep-checkpoints': ('keep_checkpoints', int, 'how many epoch checkpoints to keep (default 3)'),
}
_LIST_FIELDS = ('lr_decay_epochs', 'widths', 'lambdas')


def build_parser() -> argparse.ArgumentParser:
  import dessilbi_jax
  from dessilbi_jax import models
  from dessilbi_jax.data import datasets
  names = (f'datasets: {", ".join(datasets.DATASETS)}; models: {", ".join(models.list_models())} '
           '(lenet = lenet5)')
  parser = argparse.ArgumentParser(
      prog='dessilbi', description='Train with DessiLBI and retrain the sparse structures it finds.',
      epilog=names)
  parser.add_argument('--version', action='version', version=f'dessilbi-jax {dessilbi_jax.__version__}')
  commands = parser.add_subparsers(dest='command', required=True)

  run = commands.add_parser('train', help='train a model, recording the path of Γ', epilog=names,
                            description='Train a model data-parallel over all local devices.')
  for flag, (field, kind, text) in _TRAIN_FLAGS.items():
    run.add_argument(flag, dest=field, type=kind, default=None, help=text,
                     nargs='*' if field in _LIST_FIELDS else None)
  run.add_argument('--normalize-groups', dest='normalize_groups', action=argparse.BooleanOptionalAction,
                   default=None, help='measure groups by ‖z_g‖/√size so that one λ suits filters and single '
                                      'weights (default: on)')
  run.add_argument('--store-gamma', dest='store_gamma', action=argparse.BooleanOptionalAction, default=None,
                   help='keep Γ in the optimizer state (default: on); --no-store-gamma: a lean state, Γ rebuilt '
                        'from Z when read, the same numbers with 4 bytes less state per weight')
  run.add_argument('--no-augment', dest='augment', action='store_false', default=None,
                   help='no random augmentation of training batches')
  run.add_argument('--out', help='output directory (default runs/<model>-<dataset>-<optimizer>-<time>)')
  run.add_argument('--resume', action='store_true', help='continue the run in --out from its last checkpoint')
  run.add_argument('--fall-back', action='store_true',
                   help='with --resume: if the last checkpoint fails its checksums, resume from the newest one '
                        'that passes (the damaged ones stay on disk)')
  run.add_argument('--distributed', action='store_true',
                   help='one process per host: call jax.distributed.initialize() first; on TPU pods, SLURM and '
                        'Open MPI it finds the others itself, elsewhere give the three flags below')
  run.add_argument('--coordinator-address', default=None, metavar='HOST:PORT',
                   help='with --distributed: process 0\'s address, the same on every process (e.g. 10.0.0.1:1234)')
  run.add_argument('--num-processes', type=int, default=None, metavar='N',
                   help='with --distributed: the number of processes')
  run.add_argument('--process-id', type=int, default=None, metavar='I',
                   help='with --distributed: this process\'s index, 0 .. N-1 (process 0 writes the files)')
  run.add_argument('--quiet', action='store_true', help='no progress bar or per-epoch lines (the final summary still prints)')

  grow = commands.add_parser('grow', help='start narrow and let DessiLBI grow the layers that saturate',
                              description='Train a narrow network with DessiLBI; every --grow-every epochs widen '
                                          'each layer whose units are nearly all (--tau) in Γ\'s support; stop at '
                                          'the first check where none is; fine-tune the last --finetune-epochs.')
  for flag, (field, kind, text) in _TRAIN_FLAGS.items():
    if flag not in ('--optimizer', '--widths', '--sparsity', '--penalty', '--target-density', '--target-method',
                    '--constraint', '--dual-lr', '--gates-lr', '--droprate-init'):
      grow.add_argument(flag, dest=field, type=kind, default=None, help=text,
                        nargs='*' if field in _LIST_FIELDS else None)
  grow.add_argument('--start-widths', dest='widths', type=int, nargs='*', default=None,
                    help='the widths to start from (default: the growth preset, digits 2 6 40 28, mnist1d 8 8 8)')
  grow.add_argument('--tau', type=float, default=None, help='grow a layer when this fraction of its units is '
                                                            'in Γ\'s support (default 0.8)')
  grow.add_argument('--grow-every', dest='grow_every', type=int, default=None,
                    help='epochs between checks (digits 10, mnist1d 3)')
  grow.add_argument('--finetune-epochs', dest='finetune_epochs', type=int, default=None,
                    help='the last epochs, after growth, that fine-tune (digits 20, mnist1d 15)')
  grow.add_argument('--max-width', dest='max_width', type=int, default=None, help='no layer grows past this width')
  grow.add_argument('--target-macs', dest='target_macs', type=float, default=None, metavar='M',
                    help='a budget: grow until the next round would pass M forward MACs per example, then '
                         'fine-tune; M in (0, 1] is a fraction of the reference widths\' MACs, M > 1 a count '
                         '(e.g. 0.5 or 2e6)')
  grow.add_argument('--reference-widths', dest='reference_widths', type=int, nargs='+', default=None,
                    metavar='W', help='the reference of a fractional --target-macs and of the reported training '
                                      'compute (default: the model\'s widths, those `dessilbi train` trains)')
  grow.add_argument('--reset-state', dest='reset_state', action='store_true',
                    help="the official code's growth: optimizer state restarted, new fan-out random")
  grow.add_argument('--no-augment', dest='augment', action='store_false', default=None,
                    help='no random augmentation of training batches')
  grow.add_argument('--out', help='output directory (default runs/grow-<model>-<dataset>-<time>)')
  grow.add_argument('--resume', action='store_true', help='continue the growth run in --out')
  grow.add_argument('--quiet', action='store_true', help='no progress bar or per-epoch lines (the final summary still prints)')

  small = commands.add_parser('compact', help='write the physically smaller network of a run',
                              description="Remove the units outside Γ's support (or the zero units of a run "
                                          "without Γ) from a run's checkpoint and write the smaller network, "
                                          "loadable with dessilbi_jax.structure.load_compact(DIR2).")
  small.add_argument('--run', required=True, help='directory of a `dessilbi train` or `dessilbi grow` run')
  small.add_argument('--epoch', type=int, default=None, help='the checkpoint of this epoch (default: the last)')
  small.add_argument('--out', required=True, help='new directory for the compact model (never overwritten)')

  ticket = commands.add_parser('ticket', help="retrain the support of Γ at an epoch of a run",
                               description='Retrain the sparse structure found at an epoch of a run '
                                           'with SGD-momentum (the weights outside it stay zero).')
  ticket.add_argument('--run', required=True, help='directory of a `dessilbi train` run')
  ticket.add_argument('--epoch', required=True, type=int, help='take the support of Γ after this epoch')
  ticket.add_argument('--init', choices=('rewind', 'reinit'), default='rewind',
                      help="start from the run's initialization (rewind) or a fresh one (reinit)")
  ticket.add_argument('--epochs', type=int, default=None, help='epochs of retraining (default: the run\'s)')
  ticket.add_argument('--lr', type=float, default=None, help="learning rate (default: the run's)")
  ticket.add_argument('--out', default=None, help='output directory (default RUN/ticket-epoch<E>-<init>)')
  ticket.add_argument('--full-size', dest='full_size', action='store_true',
                      help='retrain the masked full-size network (default: the network with the dead units removed)')
  ticket.add_argument('--resume', action='store_true', help='continue an interrupted retraining')
  ticket.add_argument('--quiet', action='store_true', help='no progress bar or per-epoch lines (the final summary still prints)')
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
  args = build_parser().parse_args(argv)
  # Imported here so that `dessilbi --help` and argument errors answer at once.
  from dessilbi_jax import train
  try:
    if args.command == 'train':
      _train(args, train)
    elif args.command == 'grow':
      _grow(args, train)
    elif args.command == 'compact':
      _compact(args)
    else:
      _ticket(args, train)
  except train.ConfigError as e:
    print(f'dessilbi {args.command}: error: {e.with_flag()}', file=sys.stderr)
    return 1
  except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as e:
    print(f'dessilbi {args.command}: error: {e}', file=sys.stderr)
    return 1
  return 0


def _train(args, train) -> None:
  given = {field: getattr(args, field) for field, *_ in _TRAIN_FLAGS.values() if getattr(args, field) is not None}
  for flag in ('augment', 'normalize_groups', 'store_gamma'):
    if getattr(args, flag, None) is not None:
      given[flag] = getattr(args, flag)
  for field in ('lr_decay_epochs', 'widths'):
    if field in given:
      given[field] = tuple(given[field]) or (None if field == 'widths' else ())
  if args.resume:
    if args.out is None:
      raise ValueError('--resume needs --out DIR, the directory of the run to continue.')
    base = train.load_config(args.out)
  else:
    base = train.preset(given.get('dataset', 'digits'), **({'optimizer': given['optimizer']} if 'optimizer' in given else {}))
  if 'lambdas' in given:
    given['lambdas'] = _lambdas(given['lambdas'], base.lambdas)
  if args.resume:
    cfg = dataclasses.replace(base, **given)
  else:
    cfg = train.preset(given.pop('dataset', 'digits'), **given)
  if args.distributed:
    _initialize_distributed(args)
  elif any(v is not None for v in (args.coordinator_address, args.num_processes, args.process_id)):
    raise ValueError('--coordinator-address, --num-processes and --process-id go with --distributed.')
  out = args.out or f'runs/{cfg.model}-{cfg.dataset}-{cfg.optimizer}-{time.strftime("%Y%m%d-%H%M%S")}'
  start = time.perf_counter()
  result = train.fit(cfg, out, resume=args.resume, quiet=args.quiet, fall_back=args.fall_back)
  if result.history:   # under --quiet too: the one thing a log must end with
    print(_summary(result.history, out, time.perf_counter() - start, train, cfg.target_density))


def _grow(args, train) -> None:
  from dessilbi_jax import growth
  given = {field: getattr(args, field) for field, *_ in _TRAIN_FLAGS.values()
           if getattr(args, field, None) is not None}
  if args.augment is not None:
    given['augment'] = args.augment
  if 'lr_decay_epochs' in given:
    given['lr_decay_epochs'] = tuple(given['lr_decay_epochs'])
  if 'widths' in given:
    given['widths'] = tuple(given['widths']) or None
  rule = {field: getattr(args, field) for field in ('tau', 'grow_every', 'finetune_epochs', 'max_width')
          if getattr(args, field) is not None}
  if args.resume:
    if args.out is None:
      raise ValueError('--resume needs --out DIR, the directory of the growth run to continue.')
    if args.target_macs is not None or args.reference_widths is not None:
      raise ValueError('--target-macs and --reference-widths are fixed when a growth run starts; --resume '
                       f'continues with the budget in {args.out}/growth.json (leave them out).')
    base = train.load_config(args.out)
  else:
    base = growth.grow_preset(given.get('dataset', 'digits'))[0]
  if 'lambdas' in given:
    given['lambdas'] = _lambdas(given['lambdas'], base.lambdas)
  if args.resume:
    cfg = dataclasses.replace(base, **given)
    settings, _ = growth.load_settings(args.out)
  else:
    cfg, settings = growth.grow_preset(given.pop('dataset', 'digits'), rule, **given)
    if args.target_macs is not None:
      settings = dataclasses.replace(settings, target_macs=growth.resolve_budget(cfg, args.target_macs,
                                                                                 args.reference_widths))
  out = args.out or f'runs/grow-{cfg.model}-{cfg.dataset}-{time.strftime("%Y%m%d-%H%M%S")}'
  start = time.perf_counter()
  result = growth.grow(cfg, settings, out, resume=args.resume, reset_state=args.reset_state, quiet=args.quiet)
  last = result.history[-1]
  widths = ' '.join(str(w) for w in last['widths'].values())
  cost = growth.training_cost(result.history, cfg, args.reference_widths)
  budget = '' if settings.target_macs is None else f' (budget {settings.target_macs:,})'
  print(f'Done in {time.perf_counter() - start:.0f} s: grown from {" ".join(map(str, cfg.widths))} to {widths}; '
        f'test accuracy dense {100 * last["dense_test_acc"]:.1f}%, sparse {100 * last["sparse_test_acc"]:.1f}%. '
        f'Forward MACs {last["macs"]:,}{budget}, {last["macs"] / cost["reference_macs"]:.2f} of the reference '
        f'widths\'; training compute {cost["train_macs"]:.3g} MACs (3 × forward per example seen), '
        f'{cost["train_macs"] / cost["reference_train_macs"]:.2f} of the reference trained as long '
        f'({cost["reference_train_macs"]:.3g}); {cost["seconds"]:.0f} s in the epochs. '
        f'Wrote {out}/ (metrics.jsonl with the widths and train_macs per epoch, plots/widths.png, checkpoints/).')


def _compact(args) -> None:
  from dessilbi_jax.train import compact
  report = compact.compact_run(args.run, args.epoch, args.out)
  print(f'Compact network of {args.run}, epoch {report["epoch"]}: params {report["compact_params"]:,} of '
        f'{report["dense_params"]:,} ({100 * report["compact_params"] / report["dense_params"]:.1f}%), MACs '
        f'{report["compact_macs"]:,} of {report["dense_macs"]:,} '
        f'({100 * report["compact_macs"] / report["dense_macs"]:.1f}%), test accuracy '
        f'{100 * report["compact_test_acc"]:.1f}%. Wrote {args.out}/; load it with '
        f'dessilbi_jax.structure.load_compact({str(args.out)!r}).')


def _summary(history, out, seconds: float, train, target=None) -> str:
  """Final accuracies, the support kept (against ``target``, a density), where the files are, the next command."""
  last = history[-1]
  percent = lambda v: f'{100 * v:.1f}%'
  lines = [f'Done in {seconds:.0f} s, {last["epoch"]} epochs: test accuracy dense {percent(last["dense_test_acc"])}']
  if last['sparse_test_acc'] is not None:
    filters = [(r['groups_in_support'], r['groups']) for r in last['per_leaf'].values() if r['kind'] == 'filter']
    kept = f', filters {sum(k for k, _ in filters)}/{sum(n for _, n in filters)}' if filters else ''
    lines[0] += (f', sparse {percent(last["sparse_test_acc"])} (W ⊙ 1[Γ≠0], keeping '
                 f'{percent(last["weights_kept"])} of the weights{kept}'
                 + (f'; target {percent(target)}' if target is not None else '') + ').')
  elif last.get('expected_density') is not None:   # L0 gates
    lines[0] += (f' with the median gates; L0 expected density {percent(last["expected_density"])}'
                 + (f' (target {percent(target)})' if target is not None else '')
                 + f'; purged network {percent(last["purged_test_acc"])} with {last["purged_params"]:,} params, '
                 f'{last["purged_macs"]:,} MACs.')
  elif last['weights_kept'] is not None:
    lines[0] += f' ({percent(last["weights_kept"])} of the weights non-zero).'
  lines.append(f'Files in {out}/: metrics.jsonl, path.npz (the regularization path), plots/*.png, checkpoints/.')
  epoch = train.suggest_epoch(history)
  if epoch is not None:
    row = next(h for h in history if h['epoch'] == epoch)
    lines.append(f'Next, retrain the sparse structure of epoch {epoch} (the earliest whose sparse accuracy, '
                 f'{percent(row["sparse_test_acc"])} with {percent(row["weights_kept"])} of the weights, is within '
                 f'1 point of the end): dessilbi ticket --run {out} --epoch {epoch}')
  return '\n'.join(lines)


# The kinds of the trainer's grouping (conv kernels by filter, dense kernels by weight).
_TRAINED_KINDS = ('filter', 'lasso')


def _lambdas(words: Sequence[str], preset):
  """``['0.3']`` -> 0.3; ``['filter=1', 'lasso=0.03']`` -> ``(('filter', 1.0), ('lasso', 0.03))``.

  Kinds not named keep the ``preset`` λ (``['filter=1']`` with a preset of 0.2:
  ``(('filter', 1.0), ('lasso', 0.2))``).
  """
  try:
    if len(words) == 1 and '=' not in words[0]:
      return float(words[0])
    pairs = [word.split('=') for word in words]
    if not pairs or any(len(pair) != 2 for pair in pairs):
      raise ValueError
    named = {kind: float(lam) for kind, lam in pairs}
    before = dict(preset) if isinstance(preset, tuple) else {kind: preset for kind in _TRAINED_KINDS}
    return tuple(sorted({**before, **named}.items()))
  except ValueError:
    raise ValueError(f'--lambda takes one number or kind=λ pairs (e.g. --lambda filter=1 lasso=0.03), '
                     f'got {" ".join(words)!r}.') from None


def _ticket(args, train) -> None:
  report = train.retrain_ticket(args.run, args.epoch, init=args.init, epochs=args.epochs, lr=args.lr,
                                out_dir=args.out, resume=args.resume, quiet=args.quiet,
                                compact=not args.full_size)
  # Printed under --quiet too.
  kept = report['params_kept'] / report['params']
  flops = report['flops'] / report['dense_flops']
  print(f'Ticket of epoch {report["epoch"]} ({report["init"]}), retrained {report["epochs"]} epochs: '
        f'test accuracy {100 * report["test_acc"]:.1f}%; params kept {report["params_kept"]:,} of '
        f'{report["params"]:,} ({100 * kept:.1f}%); forward MACs {report["flops"]:,} of '
        f'{report["dense_flops"]:,} ({100 * flops:.1f}%).' + (
            f' Trained on the network with the dead units removed, widths {" ".join(map(str, report["widths"]))} '
            f'({report["trained_params"]:,} params).' if report['compact'] else '') + f' Wrote {report["out"]}/.')


def _initialize_distributed(args) -> None:
  """``jax.distributed.initialize`` with the flags given (the others found from the environment)."""
  import jax
  if args.num_processes is not None and args.num_processes < 1:
    raise ValueError(f'--num-processes must be >= 1, got {args.num_processes}.')
  if args.process_id is not None and not 0 <= args.process_id < (args.num_processes or args.process_id + 1):
    raise ValueError(f'--process-id must be in 0 .. --num-processes - 1, got {args.process_id}.')
  try:
    jax.distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                               process_id=args.process_id)
  except (ValueError, RuntimeError) as e:
    raise ValueError(f'--distributed could not start: {e} Outside TPU pods, SLURM and Open MPI give '
                     '--coordinator-address HOST:PORT --num-processes N --process-id I.') from e
