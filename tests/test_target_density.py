"""The budget threshold against a brute-force NumPy search; the dual-ascent step against its formula."""

import numpy as np
import pytest

from dessilbi_jax import target_density


def _brute_force(norms, sizes, budget):
  """The least t among {0} ∪ norms with Σ_{‖g‖>t} |g| ≤ budget."""
  flat = np.concatenate([np.ravel(n) for n in norms]).astype(np.float32)
  size = np.concatenate([np.full(np.size(n), s) for n, s in zip(norms, sizes)])
  for t in sorted({0.0, *flat.tolist()}):
    if size[flat > t].sum() <= budget:
      return t
  raise AssertionError('unreachable: t = max norm keeps nothing')


@pytest.mark.parametrize('seed', range(10))
def test_budget_threshold_is_the_least_that_fits(seed):
  rng = np.random.default_rng(seed)
  leaves = int(rng.integers(1, 4))
  norms = [np.round(rng.exponential(size=rng.integers(1, 30)), 1) for _ in range(leaves)]   # ties on purpose
  sizes = [int(rng.integers(1, 50)) for _ in range(leaves)]
  total = sum(n.size * s for n, s in zip(norms, sizes))
  budget = float(rng.uniform(0, 1.2) * total)
  t = float(target_density.budget_threshold(norms, sizes, budget))
  assert t == pytest.approx(_brute_force(norms, sizes, budget))
  flat = np.concatenate(norms).astype(np.float32); size = np.concatenate([np.full(n.size, s) for n, s in zip(norms, sizes)])
  assert size[flat > np.float32(t)].sum() <= budget


def test_budget_threshold_edges():
  assert float(target_density.budget_threshold([], [], 10)) == 0.0
  assert float(target_density.budget_threshold([np.array([1.0, 2.0])], [3], 100)) == 0.0   # all fit
  assert float(target_density.budget_threshold([np.array([1.0, 2.0])], [3], 0)) == 2.0     # none fit
  with pytest.raises(ValueError, match='2 leaves of norms but 1 group sizes'):
    target_density.budget_threshold([np.ones(2), np.ones(2)], [1], 1)


def test_dual_ascent_step():
  lam = np.array([0.5, 0.01, 1.0])
  density = np.array([0.4, 0.1, 0.3])
  out = np.asarray(target_density.dual_ascent(lam, density, 0.3, rate=0.2, lam_min=0.05))
  np.testing.assert_allclose(out, np.maximum(0.05, lam + 0.2 * (density - 0.3)), rtol=1e-6)
