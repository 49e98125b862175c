"""End-to-end tests of the `dessilbi` command (in-process through cli.main, and one subprocess)."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dessilbi_jax import cli
from dessilbi_jax import models
from dessilbi_jax import train

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ['--widths', '4', '8', '16', '16', '--batch-size', '128', '--lr', '0.05']


# data_dir: tests/conftest.py.


@pytest.fixture(scope='module')
def run(lenet_run, data_dir, tmp_path_factory):
  """A copy of `dessilbi train` for 2 epochs (conftest.py's lenet_run: these flags), then `--resume` up to 3."""
  assert train.load_config(lenet_run) == train.preset('digits', widths=(4, 8, 16, 16), batch_size=128, lr=0.05,
                                                      epochs=2, data_dir=data_dir)   # what `train *TINY` builds
  out = tmp_path_factory.mktemp('cli') / 'run'
  shutil.copytree(lenet_run, out)
  assert cli.main(['train', '--resume', '--out', str(out), '--epochs', '3', '--quiet']) == 0
  return out


def test_train_then_resume(run, capsys):
  lines = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
  assert [h['epoch'] for h in lines] == [1, 2, 3]
  assert [h['step'] for h in lines] == [11, 22, 33]
  assert train.load_config(run).epochs == 3
  assert (run / 'plots' / 'support.png').is_file()


def test_ticket_retrains_the_support_of_an_epoch(run, capsys):
  # --full-size: the masked full network, whose kept weights are exactly the support's (the default,
  # the network with the dead units removed, is tested in test_compact_ticket.py).
  assert cli.main(['ticket', '--run', str(run), '--epoch', '2', '--epochs', '1', '--full-size']) == 0
  out = capsys.readouterr().out
  assert 'Ticket of epoch 2 (rewind)' in out and 'forward MACs' in out and 'dead units removed' not in out
  report = json.loads((run / 'ticket-epoch2-rewind' / 'ticket.json').read_text())
  assert (run / 'ticket-epoch2-rewind' / 'metrics.jsonl').is_file()
  assert (run / 'ticket-epoch2-rewind' / 'plots' / 'accuracy.png').is_file()

  # Independent counts from the path: kernels outside the support of epoch 2 are pruned.
  path = train.load_path(run)
  row = list(path['epoch']).index(2)
  cfg = train.load_config(run)
  model, info = train.build_model(cfg)
  params = train.init_variables(model, info.input_shape, np.asarray([0, 0], np.uint32))['params']
  pruned = 0
  for name in ('Conv_0', 'Conv_1', 'Dense_0', 'Dense_1', 'Dense_2'):
    support = path[f'support/{name}/kernel'][row]
    pruned += np.size(params[name]['kernel']) - np.count_nonzero(np.broadcast_to(support, params[name]['kernel'].shape))
  assert report['params'] == models.count_params(params)
  assert report['params_kept'] == report['params'] - pruned
  assert report['flops'] <= report['dense_flops'] == models.count_flops(model, info.input_shape)
  assert 0 <= report['test_acc'] <= 1


@pytest.mark.parametrize('argv, message', [
    (['train', '--model', 'lenet7'], 'Unknown model'),
    (['train', '--dataset', 'svhn'], 'svhn'),
    (['train', '--optimizer', 'lbfgs'], 'Unknown optimizer'),
    (['train', '--resume'], '--resume needs --out'),
])
def test_bad_train_inputs(argv, message, capsys, tmp_path):
  assert cli.main([*argv, '--out', str(tmp_path / 'x')] if '--resume' not in argv else argv) == 1
  assert message in capsys.readouterr().err
  assert not (tmp_path / 'x').exists()


def test_bad_inputs_against_a_run(run, capsys, tmp_path):
  before = (run / 'metrics.jsonl').read_text()
  assert cli.main(['train', *TINY, '--out', str(run)]) == 1
  assert 'not empty; pass --resume' in capsys.readouterr().err
  assert (run / 'metrics.jsonl').read_text() == before
  assert cli.main(['train', '--resume', '--out', str(tmp_path)]) == 1
  assert 'is not a training run: it has no config.json' in capsys.readouterr().err
  assert cli.main(['train', '--resume', '--out', str(run), '--lr', '0.3']) == 1
  assert 'lr: 0.05 -> 0.3' in capsys.readouterr().err
  assert cli.main(['ticket', '--run', str(run), '--epoch', '7']) == 1
  assert 'has no epoch 7; it recorded epochs 1..3' in capsys.readouterr().err
  assert cli.main(['ticket', '--run', str(tmp_path), '--epoch', '1']) == 1
  assert 'not a training run' in capsys.readouterr().err


def test_batch_size_must_split_over_devices(data_dir, capsys, monkeypatch, tmp_path):
  import jax
  monkeypatch.setattr(jax, 'local_device_count', lambda: 8)
  assert cli.main(['train', '--batch-size', '100', '--data-dir', data_dir, '--out', str(tmp_path / 'x')]) == 1
  assert 'does not split over the 8 devices: use a multiple of 8' in capsys.readouterr().err


def test_a_diverging_run_stops_with_a_clear_message(data_dir, capsys, tmp_path):
  argv = ['train', *TINY[:-2], '--lr', '1e9', '--epochs', '1', '--data-dir', data_dir, '--out', str(tmp_path / 'nan')]
  assert cli.main(argv) == 1
  err = capsys.readouterr().err
  assert 'The training loss is nan at step' in err or 'The training loss is inf at step' in err
  assert 'Try a lower learning rate (--lr, now 1000000000.0)' in err


def test_python_dash_m_reports_errors_with_exit_status_one():
  result = subprocess.run([sys.executable, '-m', 'dessilbi_jax', 'train', '--model', 'lenet7', '--out', '/nonexistent/x'],
                          cwd=REPO, env={**os.environ, 'PYTHONPATH': str(REPO)}, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 1
  assert 'dessilbi train: error: Unknown model' in result.stderr


def test_an_unprepared_dataset_fails_before_anything_is_written(data_dir, capsys, tmp_path):
  assert cli.main(['train', '--dataset', 'mnist', '--data-dir', data_dir, '--out', str(tmp_path / 'x')]) == 1
  assert "Dataset 'mnist' is not prepared" in capsys.readouterr().err
  assert not (tmp_path / 'x').exists()


def test_dataset_picks_its_preset_and_flags_override_it(prepare_data, tmp_path):
  data_dir = prepare_data('mnist1d')
  out = tmp_path / 'mnist1d'
  argv = ['train', '--dataset', 'mnist1d', '--widths', '4', '4', '4', '--batch-size', '500', '--epochs', '1',
          '--lambda', 'filter=2', 'lasso=0.01', '--no-normalize-groups', '--no-store-gamma', '--quiet', '--data-dir', data_dir,
          '--out', str(out)]
  assert cli.main(argv) == 0
  cfg = train.load_config(out)
  assert cfg == train.preset('mnist1d', widths=(4, 4, 4), batch_size=500, epochs=1,
                             lambdas=(('filter', 2.0), ('lasso', 0.01)), normalize_groups=False, store_gamma=False,
                             data_dir=data_dir)
  assert cfg.model == 'conv1d' and cfg.mu == train.PRESETS['mnist1d'].mu
  # The saved per-kind λ is read back for --resume.
  assert cli.main(['train', '--resume', '--out', str(out), '--epochs', '2', '--quiet']) == 0
  assert [json.loads(line)['epoch'] for line in (out / 'metrics.jsonl').read_text().splitlines()] == [1, 2]


def test_a_bad_lambda_is_a_clear_error(capsys, tmp_path):
  assert cli.main(['train', '--lambda', 'filter:1', '--out', str(tmp_path / 'x')]) == 1
  err = capsys.readouterr().err
  assert "--lambda takes one number or kind=λ pairs (e.g. --lambda filter=1 lasso=0.03), got 'filter:1'" in err
  assert not (tmp_path / 'x').exists()


def _config(*argv):
  return cli.train_config(cli.build_parser().parse_args(['train', *argv]))


@pytest.mark.parametrize('argv,optimizer,opt', [
    (['--optimizer', 'l0', '--target-density', '0.3', '--dual-lr', '0.2', '--gates-lr', '5', '--constraint', 'layer',
      '--droprate-init', '0.1'],
     'l0', train.optimizers.L0(target_density=0.3, dual_lr=0.2, gates_lr=5.0, constraint='layer', droprate_init=0.1)),
    (['--optimizer', 'l0_penalty', '--penalty', '0.05'], 'l0_penalty', train.optimizers.L0Penalty(penalty=0.05)),
    (['--target-density', '0.3', '--target-method', 'budget', '--dual-lr', '0.05', '--no-store-gamma', '--kappa', '2',
      '--mu', '10', '--lambda', 'filter=1', '--no-normalize-groups'],
     'dessilbi', train.optimizers.DessiLBI(target_density=0.3, target_method='budget', dual_lr=0.05, store_gamma=False,
                                           kappa=2.0, mu=10.0, lambdas=(('filter', 1.0), ('lasso', 0.2)),
                                           normalize_groups=False)),
    (['--optimizer', 'gmp_structured', '--sparsity', '0.5'], 'gmp_structured', train.optimizers.GMP(sparsity=0.5)),
    (['--optimizer', 'prox_group_lasso', '--penalty', '0.01'], 'prox_group_lasso',
     train.optimizers.GroupLasso(penalty=0.01)),
    (['--optimizer', 'adam'], 'adam', train.optimizers.Plain()),
])
def test_the_flags_fill_the_optimizers_sub_config(argv, optimizer, opt):
  cfg = _config(*argv)
  assert (cfg.optimizer, cfg.opt) == (optimizer, opt)
  train.check_values(cfg)


def test_every_optimizer_option_has_a_flag_naming_its_optimizers(capsys):
  with pytest.raises(SystemExit):
    cli.main(['train', '--help'])
  text = ' '.join(capsys.readouterr().out.split())
  for name, entry in train.OPTIMIZERS.items():
    assert name in text
    for field in train.optimizers.fields_of(entry.config):
      assert train.optimizers.flag_of(field) in text
  assert 'dessilbi: damping κ (default 1.0)' in text and 'l0, l0_penalty: the gates\' own learning rate' in text
  assert '(default 0.01); l0: the Lagrange multipliers\' learning rate (default 0.1)' in text   # --dual-lr


def test_a_flag_of_another_optimizer_is_one_clear_error(capsys, tmp_path):
  assert cli.main(['train', '--sparsity', '0.5', '--out', str(tmp_path / 'x')]) == 1
  err = capsys.readouterr().err
  assert err == ('dessilbi train: error: --sparsity: an option of --optimizer gmp or gmp_structured; --optimizer '
                 'dessilbi cannot take it (leave it out, or use --optimizer gmp).\n')
  assert not (tmp_path / 'x').exists()


def test_a_damaged_checkpoint_exits_with_its_one_line(run, tmp_path):
  """The error line alone on stderr: no traceback of orbax's background reads after it (they are waited for)."""
  import shutil
  out = tmp_path / 'damaged'
  shutil.copytree(run, out)
  for file in (out / 'checkpoints' / '3' / 'state').rglob('*'):
    if file.is_file() and file.parent.name == 'd':
      file.write_bytes(b'garbage')
  env = {**os.environ, 'PYTHONPATH': str(REPO)}
  for _ in range(2):   # the background reads race the exit: twice, to catch one that comes late
    done = subprocess.run([sys.executable, '-m', 'dessilbi_jax', 'train', '--resume', '--out', str(out)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 1
    assert 'Traceback' not in done.stderr and 'Event loop' not in done.stderr, done.stderr
    line, = done.stderr.splitlines()
    assert line.startswith(f'dessilbi train: error: The checkpoint of epoch 3 in {out / "checkpoints"} is unreadable')
    assert line.endswith(f'Delete {out / "checkpoints" / "3"} to resume from epoch 2, or pass --fall-back to resume '
                         'from the newest checkpoint that passes its checks (the damaged ones stay).')
