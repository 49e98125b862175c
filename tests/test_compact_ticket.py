"""Tickets retrained on the removed network equal, on the kept units, the masked full-size retrain."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dessilbi_jax import structure
from dessilbi_jax import train
from dessilbi_jax.structure import masks as structure_masks


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp('ticket')
  # λ small enough that some filters and weights enter Γ's support in two epochs, large enough that not all do.
  cfg = train.TrainConfig(model='lenet', dataset='digits', widths=(4, 8, 16, 16), batch_size=128, epochs=2,
                          lr=0.05, mu=5.0, lambdas=0.05, data_dir=str(root / 'data'))
  train.fit(cfg, root / 'run', quiet=True)
  return root


@pytest.mark.filterwarnings('ignore:Unit group')
def test_removed_ticket_trains_the_masked_tickets_weights(run):
  compact = train.retrain_ticket(run / 'run', 2, epochs=1, out_dir=run / 'compact', quiet=True)
  full = train.retrain_ticket(run / 'run', 2, epochs=1, out_dir=run / 'full', quiet=True, compact=False)
  assert compact['compact'] and not full['compact']
  # The full-size ticket also trains weights whose unit no layer reads (or that read a dead unit): they
  # change nothing, and the removed network drops them.
  assert compact['params_kept'] <= full['params_kept']
  assert compact['trained_params'] < full['trained_params']      # a smaller network
  assert compact['flops'] <= full['flops']
  assert compact['test_acc'] == pytest.approx(full['test_acc'], abs=1.5 / 355)
  # The kept units' weights after the retraining: the full-size ones sliced to the removed network's.
  cfg = train.load_config(run / 'full')
  model, info = train.build_model(cfg)
  full_params = _final_params(run / 'full', model, info)
  small_params = _final_params(run / 'compact', *train.build_model(train.load_config(run / 'compact')))
  variables = {'params': full_params}
  unit_map = structure.trace(model, variables, jnp.zeros((1, *info.input_shape)))
  masks = train.ticket_masks(run / 'run', 2, full_params)
  keep = structure_masks.keep_from_weights(unit_map, masks)
  _, sliced, _ = structure.remove(model, variables, unit_map, keep)
  for a, b in zip(jax.tree.leaves(sliced['params']), jax.tree.leaves(small_params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def _final_params(run_dir, model, info):
  cfg = train.load_config(run_dir)
  result = train.fit(cfg, run_dir, resume=True, quiet=True)   # nothing left to train: the restored state
  return result.params
