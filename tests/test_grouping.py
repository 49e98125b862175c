"""Tests of the grouping rule: its four forms, the per-group shapes, and bad groupings."""

import jax.numpy as jnp
import numpy as np
import pytest

import dessilbi_jax as dl
from dessilbi_jax.core import grouping

PARAMS = {
    'Conv_0': {'kernel': jnp.zeros((5, 5, 1, 6)), 'bias': jnp.zeros(6)},
    'Conv_1': {'kernel': jnp.zeros((5, 5, 6, 16)), 'bias': jnp.zeros(16)},
    'Dense_0': {'kernel': jnp.zeros((400, 120)), 'bias': jnp.zeros(120)},
    'Dense_1': {'kernel': jnp.zeros((120, 10)), 'bias': jnp.zeros(10)},
    'Attention': {'query': jnp.zeros((16, 4, 8))},
    'scale': jnp.zeros(()),
}

DEFAULT_KINDS = {
    'Conv_0': {'kernel': 'filter', 'bias': None},
    'Conv_1': {'kernel': 'filter', 'bias': None},
    'Dense_0': {'kernel': 'lasso', 'bias': None},
    'Dense_1': {'kernel': 'lasso', 'bias': None},
    'Attention': {'query': 'filter'},
    'scale': None,
}


def test_default_rule():
  """Conv kernels (rank >= 3) -> filter, 2-D -> lasso, 1-D and scalars -> no structure."""
  assert grouping.resolve_kinds(PARAMS) == DEFAULT_KINDS
  assert grouping.resolve_kinds(PARAMS, None) == DEFAULT_KINDS


def test_callable_gets_the_path_and_the_leaf():
  seen = []

  def rule(path, leaf):
    seen.append((path, np.shape(leaf)))
    return 'neuron' if path.startswith('Dense') and np.ndim(leaf) == 2 else None

  kinds = grouping.resolve_kinds(PARAMS, rule)
  assert sorted(seen) == sorted([
      ('Conv_0/kernel', (5, 5, 1, 6)), ('Conv_0/bias', (6,)), ('Conv_1/kernel', (5, 5, 6, 16)),
      ('Conv_1/bias', (16,)), ('Dense_0/kernel', (400, 120)), ('Dense_0/bias', (120,)),
      ('Dense_1/kernel', (120, 10)), ('Dense_1/bias', (10,)), ('Attention/query', (16, 4, 8)),
      ('scale', ())])
  assert kinds == {
      'Conv_0': {'kernel': None, 'bias': None}, 'Conv_1': {'kernel': None, 'bias': None},
      'Dense_0': {'kernel': 'neuron', 'bias': None}, 'Dense_1': {'kernel': 'neuron', 'bias': None},
      'Attention': {'query': None}, 'scale': None}


def test_pytree_of_kinds():
  kinds = {
      'Conv_0': {'kernel': 'lasso', 'bias': None}, 'Conv_1': {'kernel': 'filter', 'bias': 'lasso'},
      'Dense_0': {'kernel': 'neuron', 'bias': None}, 'Dense_1': {'kernel': 'input', 'bias': None},
      'Attention': {'query': 'head'}, 'scale': None}
  assert grouping.resolve_kinds(PARAMS, kinds) == kinds


def test_patterns_first_match_wins_and_unmatched_leaves_follow_the_default():
  patterns = {
      'Dense_0/kernel': 'input',        # also matched by the next pattern: the first one wins
      r'Dense_\d+/kernel': 'neuron',
      'Conv_1/kernel': None,            # switched off
      'query': 'head',
  }
  assert grouping.resolve_kinds(PARAMS, patterns) == {
      'Conv_0': {'kernel': 'filter', 'bias': None},      # no pattern: the default rule
      'Conv_1': {'kernel': None, 'bias': None},
      'Dense_0': {'kernel': 'input', 'bias': None},
      'Dense_1': {'kernel': 'neuron', 'bias': None},
      'Attention': {'query': 'head'},
      'scale': None,
  }


def test_catch_all_pattern_switches_the_rest_off():
  kinds = grouping.resolve_kinds(PARAMS, {'Conv_1/kernel': 'filter', '.*': None})
  assert kinds['Conv_1']['kernel'] == 'filter'
  assert kinds['Conv_0']['kernel'] is None and kinds['Dense_0']['kernel'] is None


@pytest.mark.parametrize('kind, shape, per_group_shape, group_size', [
    ('filter', (5, 5, 6, 16), (1, 1, 1, 16), 150),
    ('filter', (3, 6, 8), (1, 1, 8), 18),              # a 1-D convolution
    ('neuron', (400, 120), (1, 120), 400),
    ('input', (400, 120), (400, 1), 120),
    ('head', (16, 4, 8), (1, 4, 1), 128),
    ('lasso', (120, 10), (120, 10), 1),
    ('lasso', (5, 5, 1, 6), (5, 5, 1, 6), 1),
])
def test_per_group_shapes(kind, shape, per_group_shape, group_size):
  assert grouping.group_shape(kind, shape) == per_group_shape
  assert grouping.group_size(kind, shape) == group_size
  assert grouping.kind_of(shape, per_group_shape) == kind


def test_state_follows_the_grouping():
  """Z and Γ like the leaf, entry steps int32 -1 in the keepdims per-group shape, None without structure."""
  groups = {'Conv_0/kernel': 'lasso', 'Dense_0/kernel': 'neuron', 'Dense_1/kernel': 'input',
            'query': 'head'}
  state = dl.dessilbi(0.1, groups=groups).init(PARAMS)
  expected_entry_shapes = {
      ('Conv_0', 'kernel'): (5, 5, 1, 6), ('Conv_1', 'kernel'): (1, 1, 1, 16),
      ('Dense_0', 'kernel'): (1, 120), ('Dense_1', 'kernel'): (120, 1), ('Attention', 'query'): (1, 4, 1)}
  for (outer, inner), shape in expected_entry_shapes.items():
    entry = state.entry_step[outer][inner]
    assert entry.shape == shape and entry.dtype == jnp.int32 and bool(jnp.all(entry == -1))
    assert state.z[outer][inner].shape == PARAMS[outer][inner].shape
    assert state.gamma[outer][inner].shape == PARAMS[outer][inner].shape
  for outer in ('Conv_0', 'Conv_1', 'Dense_0', 'Dense_1'):
    assert state.z[outer]['bias'] is None and state.gamma[outer]['bias'] is None
    assert state.entry_step[outer]['bias'] is None
    assert state.trace[outer]['bias'].shape == PARAMS[outer]['bias'].shape
  assert state.z['scale'] is None and state.trace['scale'].shape == ()


@pytest.mark.parametrize('groups, match', [
    ({'Dense_0/kernel': 'channel'}, r"Unknown group kind 'channel' for leaf 'Dense_0/kernel'"),
    (lambda path, leaf: 'rows' if np.ndim(leaf) == 2 else None, r"Unknown group kind 'rows'"),
    ({'Conv_0/kernel': 'neuron'}, r"Group kind 'neuron' does not fit leaf 'Conv_0/kernel' of shape \(5, 5, 1, 6\)"),
    ({'Dense_0/kernel': 'filter'}, r"Group kind 'filter' does not fit leaf 'Dense_0/kernel'"),
    ({'Dense_0/kernel': 'head'}, r"Group kind 'head' does not fit leaf 'Dense_0/kernel'"),
    ({'Attention/query': 'input'}, r"Group kind 'input' does not fit leaf 'Attention/query'"),
    ({'Dense_0/bias': 'filter'}, r"Group kind 'filter' does not fit leaf 'Dense_0/bias' of shape \(120,\)"),
    ({'^scale$': 'lasso'}, r"Group kind 'lasso' does not fit leaf 'scale' of shape \(\)"),
    ({'Dense_9/kernel': 'neuron'}, r"Pattern\(s\) \['Dense_9/kernel'\] in `groups` match no parameter"),
    ({'Dense_0/kernel': 'neuron', 'Dense/Kernel': 'neuron'}, r"\['Dense/Kernel'\] in `groups` match no parameter"),
    ({'Dense_(0/kernel': 'neuron'}, r"Pattern 'Dense_\(0/kernel' in `groups` is not a valid regular expression"),
    (['filter', 'lasso'], '`groups` must be None, a callable'),
])
def test_bad_groupings_raise_at_init(groups, match):
  with pytest.raises(ValueError, match=match):
    grouping.resolve_kinds(PARAMS, groups)
  with pytest.raises(ValueError, match=match):
    dl.dessilbi(0.1, groups=groups).init(PARAMS)


def test_pytree_of_kinds_with_an_unknown_kind():
  kinds = dict(DEFAULT_KINDS, Dense_1={'kernel': 'neurons', 'bias': None})
  with pytest.raises(ValueError, match=r"Unknown group kind 'neurons' for leaf 'Dense_1/kernel'"):
    dl.dessilbi(0.1, groups=kinds).init(PARAMS)
