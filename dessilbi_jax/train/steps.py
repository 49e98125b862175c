"""The model, the training state, and the pmapped training and evaluation steps.

The batch is split over the local devices (``jax.pmap`` over the axis
:data:`AXIS`); gradients and batch statistics are averaged with ``pmean``, so
params and optimizer state stay replicated and equal on every device.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import jax_utils

from dessilbi_jax import data
from dessilbi_jax import models

if TYPE_CHECKING:
  from dessilbi_jax.train.config import TrainConfig
  from dessilbi_jax.train.extensions import ExtraTrainable

AXIS = 'batch'      # the pmap axis name
EVAL_BATCH = 256


class TrainState(NamedTuple):
  """What a checkpoint holds: enough to continue bit for bit."""
  step: jax.Array         # updates done so far = position in the data
  params: Any
  batch_stats: Any        # {} for models without batch norm
  opt_state: Any
  rng: jax.Array          # raw PRNG key; step k uses fold_in(rng, k)
  extra: Any = {}         # {extension name: trainable state beside the params} (extensions.ExtraTrainable)
  extra_opt_state: Any = {}


def replicate(tree):
  """``tree`` with a leading axis of the local devices, laid out as the pmapped step lays out its outputs.

  ``flax.jax_utils.replicate`` gives arrays on a mesh axis named
  ``'_device_put_sharded'``, which the pmapped step does not take for its own
  outputs' ``'batch'``: the step compiled twice (5 s more per run of LeNet).
  """
  devices = jax.local_devices()
  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS,)), jax.sharding.PartitionSpec(AXIS))
  stack = lambda x: jax.device_put(np.broadcast_to(np.asarray(x)[None], (len(devices), *np.shape(x))), sharding)
  return jax.tree.map(stack, tree)


def build_model(cfg: TrainConfig, widths: Optional[Sequence[int]] = None):
  """``(model, dataset_info)`` for ``cfg``; ValueError for unknown names.

  The model is ``cfg.model`` with ``cfg.widths`` (or ``widths``) and the
  per-layer widths ``cfg.layer_widths`` (a removed or grown ResNet's).
  """
  info = data.dataset_info(cfg.dataset)
  model = models.get_model(cfg.model, info.num_classes, info.input_shape,
                           widths=cfg.widths if widths is None else tuple(widths),
                           **dict(cfg.layer_widths or ()))
  return model, info


def model_fields(model) -> dict[str, Any]:
  """The :class:`TrainConfig` fields ``widths`` and ``layer_widths`` of a zoo module (e.g. a removed one).

  ``dataclasses.replace(cfg, **model_fields(model))`` is the config whose
  :func:`build_model` is ``model`` (:func:`dessilbi_jax.models.model_kwargs`).
  """
  kwargs = models.model_kwargs(model)
  widths = kwargs.pop('widths', None)
  return dict(widths=None if widths is None else tuple(widths), layer_widths=layer_widths_field(kwargs))


def layer_widths_field(values) -> Optional[tuple[tuple[str, Any], ...]]:
  """``TrainConfig.layer_widths`` from a mapping or pairs (JSON lists become tuples); ``None`` for none."""
  if values is None:
    return None
  pairs = values.items() if isinstance(values, Mapping) else values
  return tuple(sorted((str(name), models.networks._hashable(value)) for name, value in pairs)) or None  # pylint: disable=protected-access


def model_record(cfg: TrainConfig) -> dict[str, Any]:
  """What a checkpoint records of the model (JSON): ``cfg``'s ``widths`` and ``layer_widths``."""
  return {'widths': None if cfg.widths is None else list(cfg.widths),
          'layer_widths': None if cfg.layer_widths is None else json.loads(json.dumps(dict(cfg.layer_widths)))}


def recorded_config(cfg: TrainConfig, record: Mapping[str, Any]) -> TrainConfig:
  """``cfg`` with the model a checkpoint record names (:func:`model_record`).

  A record of before the per-layer widths holds ``widths`` alone (``None``:
  the config's); its model keeps the config's ``layer_widths``.
  """
  widths = tuple(record['widths']) if record.get('widths') is not None else cfg.widths
  layer_widths = layer_widths_field(record['layer_widths']) if 'layer_widths' in record else cfg.layer_widths
  return dataclasses.replace(cfg, widths=widths, layer_widths=layer_widths)


def training_model(model):
  """``model`` with its batch norm (if any) averaging statistics over the whole global batch."""
  if 'axis_name' in getattr(type(model), '__dataclass_fields__', {}):
    return model.clone(axis_name=AXIS)
  return model


def init_variables(model, input_shape, key) -> dict[str, Any]:
  """``model.init`` under jit (one compilation instead of one per initializer op)."""
  return jax.device_get(_jitted_init(model, tuple(input_shape))(key))


@functools.lru_cache(maxsize=8)
def _jitted_init(model, input_shape):
  return jax.jit(lambda key: model.init(key, jnp.zeros((1, *input_shape)), train=False))


def variables(params, batch_stats) -> dict[str, Any]:
  return {'params': params, **({'batch_stats': batch_stats} if batch_stats else {})}


def eval_params(state: TrainState, trainables: Sequence[tuple[str, ExtraTrainable]]):
  """The params the test metrics see: each extension's ``evaluate(params, extra)`` in turn."""
  params = state.params
  for name, trainable in trainables:
    if trainable.evaluate is not None:
      params = trainable.evaluate(params, state.extra[name])
  return params


@functools.lru_cache(maxsize=8)
def make_train_step(model, tx, trainables: tuple[tuple[str, ExtraTrainable], ...] = ()):
  """The pmapped step: (replicated state, sharded batch, replicated masks) -> (state, metrics).

  The loss is the cross-entropy of the model run with the params that the
  extensions' ``forward`` give, plus their loss terms; the params step with
  ``tx``, each extension's state with its own optimizer.
  """

  def loss_fn(params, extra, state, batch, dropout_rng, extension_rng):
    forward = params
    added = jnp.zeros([], jnp.float32)
    for i, (name, trainable) in enumerate(trainables):
      forward, term = trainable.forward(forward, extra[name], jax.random.fold_in(extension_rng, i))
      added = added + term
    if state.batch_stats:
      logits, new_vars = model.apply(variables(forward, state.batch_stats), batch['image'], train=True,
                                     mutable=['batch_stats'], rngs={'dropout': dropout_rng})
      batch_stats = new_vars['batch_stats']
    else:
      logits = model.apply(variables(forward, {}), batch['image'], train=True, rngs={'dropout': dropout_rng})
      batch_stats = state.batch_stats
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean() + added
    return loss, (logits, batch_stats)

  def step(state: TrainState, batch, masks):
    step_rng = jax.random.fold_in(state.rng, state.step)
    dropout_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(AXIS))
    # One draw per step for the extensions, the same on every device (a gate sample shared by the batch).
    extension_rng = jax.random.split(step_rng)[1]
    (loss, (logits, batch_stats)), (grads, extra_grads) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        state.params, state.extra, state, batch, dropout_rng, extension_rng)
    grads, extra_grads = jax.lax.pmean((grads, extra_grads), AXIS)
    # Models whose batch norm is not synced keep per-device statistics: average them so replicas agree.
    batch_stats = jax.lax.pmean(batch_stats, AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if masks is not None:
      params = apply_masks(params, masks)
    extra, extra_opt_state = dict(state.extra), dict(state.extra_opt_state)
    for name, trainable in trainables:
      extra_updates, extra_opt_state[name] = trainable.tx.update(extra_grads[name], state.extra_opt_state[name],
                                                                  state.extra[name])
      extra[name] = optax.apply_updates(state.extra[name], extra_updates)
    metrics = {'loss': loss, 'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label'])}
    new_state = TrainState(state.step + 1, params, batch_stats, opt_state, state.rng, extra, extra_opt_state)
    return new_state, jax.lax.pmean(metrics, AXIS)

  return jax.pmap(step, axis_name=AXIS, donate_argnums=(0,))


@functools.lru_cache(maxsize=8)
def _eval_step(model):
  """pmapped (replicated variables, sharded batch) -> (correct, count) over all devices."""

  def counts(variables, batch):
    logits = model.apply(variables, batch['image'], train=False)
    # A label per position (text): every position of a real example counts.
    mask = jnp.broadcast_to(batch['mask'].reshape(batch['mask'].shape + (1,) * (batch['label'].ndim - 1)),
                            batch['label'].shape)
    correct = jnp.sum((jnp.argmax(logits, -1) == batch['label']) * mask)
    return jax.lax.psum(jnp.stack([correct, jnp.sum(mask)]), AXIS)

  return jax.pmap(counts, axis_name=AXIS)


def evaluate(model, variables, dataset: str, split: str = 'test', *, batch_size: int = EVAL_BATCH,
             data_dir=None) -> float:
  """Accuracy of ``model`` with ``variables`` on a whole split, over all local devices."""
  num_devices = jax.local_device_count()
  per_step = num_devices * jax.process_count()
  batch_size = -(-batch_size // per_step) * per_step
  replicated = replicate(variables)
  counts = [_eval_step(model)(replicated, batch) for batch in
            data.eval_batches(dataset, split, batch_size, num_devices=num_devices, data_dir=data_dir)]
  correct, total = np.sum(jax.device_get(jax_utils.unreplicate(counts)), axis=0)
  return float(correct / total)


def full_masks(masks, params):
  """Bool masks of each leaf's shape; ``None`` leaves become all-True."""
  flat_masks = jax.tree.structure(params).flatten_up_to(masks)
  full = [np.ones(np.shape(w), bool) if m is None else np.broadcast_to(np.asarray(m, bool), np.shape(w))
          for m, w in zip(flat_masks, jax.tree.leaves(params))]
  return jax.tree.unflatten(jax.tree.structure(params), full)


def apply_masks(params, masks):
  return jax.tree.map(lambda w, m: jnp.where(m, w, jnp.zeros_like(w)), params, masks)


def check_same_shapes(tree, reference, name: str) -> None:
  shapes = lambda t: jax.tree.map(np.shape, t)
  if jax.tree.structure(tree) != jax.tree.structure(reference) or shapes(tree) != shapes(reference):
    raise ValueError(f'{name} does not match the model: got shapes {shapes(tree)}, '
                     f'the model has {shapes(reference)}.')
