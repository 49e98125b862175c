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
status 1 before any training starts; a non-finite loss or a failed write (a full disk) stops training with
status 1 and leaves the last good checkpoint in place; Ctrl-C and SIGTERM stop it with status 130 and 143,
saying which checkpoint is kept and the command that continues.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Optional, Sequence

_TRAIN_FLAGS = {
    # flag: (TrainConfig field, type, help); the optimizers' own flags come from their registry entries.
    '--dataset': ('dataset', str, "dataset name (listed below; default digits); picks the "
                  "preset that every other flag defaults to (train.PRESETS)"),
    '--model': ('model', str, 'model name (listed below; digits: lenet, mnist1d: conv1d)'),
    '--optimizer': ('optimizer', str, None),   # its help names the registry's entries (_optimizer_help)
    '--epochs': ('epochs', int, 'total epochs (digits 60, mnist1d 30); with --resume: the new total'),
    '--batch-size': ('batch_size', int, 'global batch size, a multiple of the device count (default 64)'),
    '--lr': ('lr', float, 'learning rate α (default 0.1; 0.001 for adam, half the preset\'s for l0, l0_penalty)'),
    '--lr-decay-epochs': ('lr_decay_epochs', int,
                          'epochs after which the lr is multiplied by --lr-decay (digits 40, mnist1d 20)'),
    '--lr-decay': ('lr_decay', float, 'factor of each lr decay (default 0.1)'),
    '--momentum': ('momentum', float, 'heavy-ball momentum β (default 0.9)'),
    '--weight-decay': ('weight_decay', float, 'L2 weight decay ω on kernels (default 0)'),
    '--seed': ('seed', int, 'seed of initialization, data order and augmentation (default 0)'),
    '--widths': ('widths', int, 'the model widths, e.g. --widths 6 16 120 84'),
    '--data-dir': ('data_dir', str, 'where datasets are prepared ($DESSILBI_DATA_DIR or tfds default)'),
    '--keep-checkpoints': ('keep_checkpoints', int, 'how many epoch checkpoints to keep (default 3)'),
}
_LIST_FIELDS = ('lr_decay_epochs', 'widths', 'lambdas')
# dessilbi grow trains DessiLBI on widths of its own: these of DessiLBI's options, no target.
_GROW_OPTIONS = ('kappa', 'mu', 'lambdas')


def _optimizer_help(train) -> str:
  return ('one of ' + ', '.join(train.OPTIMIZERS) + ' (default dessilbi); l0 trains L0 gates under '
          '--target-density, l0_penalty under --penalty')


def _option_flags(train):
  """``(flag, field, argparse keywords)`` of every optimizer option: each field once, its help naming the
  optimizers that take it (with their defaults) from the registry's sub-configs."""
  import dataclasses
  by_field = {}
  for name, entry in train.OPTIMIZERS.items():
    for f in dataclasses.fields(entry.config):
      by_field.setdefault(f.name, []).append((name, f))
  for field, owners in by_field.items():
    texts = {}
    for name, f in owners:
      default = ('' if f.default is None else f' (default {"on" if f.default else "off"})'
                 if isinstance(f.default, bool) else f' (default {f.default})')
      texts.setdefault(f.metadata['help'] + default, []).append(name)
    text = '; '.join(f'{", ".join(names)}: {help}' for help, names in texts.items())
    example = owners[0][1].default
    flag = '--' + {'lambdas': 'lambda'}.get(field, field).replace('_', '-')
    if isinstance(example, bool):
      keywords = dict(action=argparse.BooleanOptionalAction)
    elif field in _LIST_FIELDS:
      keywords = dict(type=str, nargs='*')
    else:
      keywords = dict(type=str if isinstance(example, str) else float)
    yield flag, field, dict(keywords, default=None, help=text)


def build_parser() -> argparse.ArgumentParser:
  import dessilbi_jax
  from dessilbi_jax import train
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
    run.add_argument(flag, dest=field, type=kind, default=None, help=text or _optimizer_help(train),
                     nargs='*' if field in _LIST_FIELDS else None)
  options = run.add_argument_group('options of the optimizers', 'each for the --optimizer named before its '
                                                                'text; the others refuse it')
  for flag, field, keywords in _option_flags(train):
    options.add_argument(flag, dest=field, **keywords)
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
    if flag not in ('--optimizer', '--widths'):
      grow.add_argument(flag, dest=field, type=kind, default=None, help=text,
                        nargs='*' if field in _LIST_FIELDS else None)
  for flag, field, keywords in _option_flags(train):
    if field in _GROW_OPTIONS:
      grow.add_argument(flag, dest=field, **dict(keywords, help=keywords['help'].replace('dessilbi: ', '')))
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
  from dessilbi_jax.train import run_dir
  try:
    _check_flags(args)
    with run_dir.sigterm_interrupts():
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
  except (ValueError, FloatingPointError) as e:
    print(f'dessilbi {args.command}: error: {e}', file=sys.stderr)
    return 1
  except OSError as e:   # a read-only or full disk, a missing file: the path and the reason, no traceback
    print(f'dessilbi {args.command}: error: {run_dir.os_error_line(e)}', file=sys.stderr)
    return 1
  except KeyboardInterrupt as e:   # Ctrl-C or SIGTERM; inside training the message says what was kept
    print(f'dessilbi {args.command}: {e or "Interrupted."}', file=sys.stderr)
    return getattr(e, 'exit_status', 130)
  return 0


# grow's rule flags: a resumed growth run keeps the settings saved in its growth.json.
_GROWTH_RULE_FLAGS = {'tau': '--tau', 'grow_every': '--grow-every', 'finetune_epochs': '--finetune-epochs',
                      'max_width': '--max-width', 'reset_state': '--reset-state'}


def _check_flags(args) -> None:
  """Flags that parse but would mean nothing: one line naming the flag."""
  if args.command in ('train', 'grow') and args.widths == []:
    flag = '--widths' if args.command == 'train' else '--start-widths'
    raise ValueError(f'{flag} needs at least one width (e.g. {flag} 6 16 120 84); leave it out for the preset\'s.')
  if args.command == 'train' and args.fall_back and not args.resume:
    raise ValueError('--fall-back goes with --resume: it picks the checkpoint a resumed run starts from.')
  if args.command == 'grow' and args.resume:
    given = [flag for field, flag in _GROWTH_RULE_FLAGS.items() if getattr(args, field) not in (None, False)]
    if given:
      raise ValueError(f'{given[0]} cannot change on --resume: a growth run keeps the rule saved in its '
                       'growth.json. Leave it out, or start a new growth run.')


def _given(args, train, names) -> dict:
  """The config fields of the flags given on the command line (flat: the optimizer's own among them)."""
  given = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
  for field in ('lr_decay_epochs', 'widths'):
    if field in given:
      given[field] = tuple(given[field]) or (None if field == 'widths' else ())
  return given


def train_config(args):
  """The :class:`~dessilbi_jax.train.TrainConfig` of ``dessilbi train``'s parsed ``args``: the preset of
  ``--dataset`` (with ``--resume``: the run's saved config) with the flags given replacing its fields."""
  from dessilbi_jax import train
  fields = [field for field, *_ in _TRAIN_FLAGS.values()] + [field for _, field, _ in _option_flags(train)]
  given = _given(args, train, fields + ['augment'])
  if args.resume:
    if args.out is None:
      raise ValueError('--resume needs --out DIR, the directory of the run to continue.')
    base = train.load_config(args.out)
  else:
    base = train.preset(given.get('dataset', 'digits'), **({'optimizer': given['optimizer']} if 'optimizer' in given else {}))
  if 'lambdas' in given:
    given['lambdas'] = _lambdas(given['lambdas'], getattr(base, 'lambdas', None))
  if args.resume:
    return dataclasses.replace(base, **given)
  return train.preset(given.pop('dataset', 'digits'), **given)


def _train(args, train) -> None:
  cfg = train_config(args)
  if args.distributed:
    _initialize_distributed(args)
  elif any(v is not None for v in (args.coordinator_address, args.num_processes, args.process_id)):
    raise ValueError('--coordinator-address, --num-processes and --process-id go with --distributed.')
  out = args.out or f'runs/{cfg.model}-{cfg.dataset}-{cfg.optimizer}-{time.strftime("%Y%m%d-%H%M%S")}'
  start = time.perf_counter()
  result = train.fit(cfg, out, resume=args.resume, quiet=args.quiet, fall_back=args.fall_back)
  import jax
  if jax.process_index() == 0:   # the one process that writes the run's files
    train.write_run_plots(out)
  if result.history:   # under --quiet too: the one thing a log must end with
    print(_summary(result, out, time.perf_counter() - start, train))


def _grow(args, train) -> None:
  from dessilbi_jax import growth
  given = _given(args, train, [field for field, *_ in _TRAIN_FLAGS.values()] + list(_GROW_OPTIONS) + ['augment'])
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


def _summary(result, out, seconds: float, train) -> str:
  """Final accuracies, the support kept, the extensions' words, where the files are, the next command."""
  history = result.history
  last = history[-1]
  percent = lambda v: f'{100 * v:.1f}%'
  line = f'Done in {seconds:.0f} s, {last["epoch"]} epochs: test accuracy dense {percent(last["dense_test_acc"])}'
  if last['sparse_test_acc'] is not None:
    filters = [(r['groups_in_support'], r['groups']) for r in last['per_leaf'].values() if r['kind'] == 'filter']
    kept = f', filters {sum(k for k, _ in filters)}/{sum(n for _, n in filters)}' if filters else ''
    line += (f', sparse {percent(last["sparse_test_acc"])} (W ⊙ 1[Γ≠0], keeping '
             f'{percent(last["weights_kept"])} of the weights{kept})')
  elif last['weights_kept'] is not None:
    line += f' ({percent(last["weights_kept"])} of the weights non-zero)'
  lines = [''.join([line, *(f'; {text}' for text in train.extensions.summaries(result.extensions, last))]) + '.']
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
    before = (dict(preset) if isinstance(preset, tuple) else {} if preset is None else
              {kind: preset for kind in _TRAINED_KINDS})
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
