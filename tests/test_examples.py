"""The examples run: the quickstart's loop end to end (briefly), the others' configurations."""

import importlib.util
import pathlib

import pytest

from dessilbi_jax import models
from dessilbi_jax import train

EXAMPLES = pathlib.Path(__file__).parent.parent / 'examples'


def _load(name):
  spec = importlib.util.spec_from_file_location(name, EXAMPLES / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_quickstart_trains_and_reports(capsys, tmp_path, monkeypatch):
  monkeypatch.setenv('DESSILBI_DATA_DIR', str(tmp_path))
  _load('quickstart').main(epochs=2)
  out = capsys.readouterr().out
  for line in ('dense test accuracy', 'sparse test accuracy', "filters in Γ's support", 'weights kept'):
    assert line in out
  dense = float(out.split('dense test accuracy  (W)')[1].split()[0])
  assert dense > 0.5   # two epochs of a convnet on digits are far above chance (0.1)


def test_paper_settings_are_valid_configs():
  settings = _load('paper_settings').SETTINGS
  assert {'lenet-mnist', 'vgg16-cifar10', 'resnet56-cifar10', 'resnet18-imagenet', 'resnet50-imagenet'} <= set(settings)
  for cfg in settings.values():
    assert isinstance(cfg, train.TrainConfig)
    assert cfg.model in (*models.list_models(), 'lenet')
    assert train.TrainConfig.from_json(cfg.to_json()) == cfg
    assert not cfg.normalize_groups   # the paper measures groups by their plain norm, λ = 1


@pytest.mark.parametrize('name', ['ticket_digits'])
def test_example_imports(name):
  assert callable(_load(name).main)


@pytest.mark.parametrize('scope', ['model', 'layer'])
def test_l0_weight_gates_land_within_a_point_of_the_target(scope, tmp_path, capsys):
  """The standalone L0 loop: its expected density ends within a point of 30 %, and the net still classifies."""
  result = _load('l0_weight_gates').main(steps=400, scope=scope, data_dir=str(tmp_path))
  densities = [result['model_density']] if scope == 'model' else list(result['layer_densities'].values())
  for density in densities:   # measured (seed 0): see the test's output
    assert abs(density - 0.3) <= 0.01
  assert result['test_acc'] > 0.85
  assert 'expected density' in capsys.readouterr().out
