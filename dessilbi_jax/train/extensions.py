"""What a feature adds to :func:`dessilbi_jax.train.fit` without editing its loop.

An :class:`Extension` is a name and up to three plain functions (a
NamedTuple, like optax's ``GradientTransformation``; nothing to subclass):

* ``trainable``, an :class:`ExtraTrainable`: state trained beside the params
  with its own optimizer (L0 gate parameters, Lagrange multipliers). Its
  ``forward`` says which params the model runs with and what it adds to the
  loss; its ``evaluate`` which params the test accuracies see.
* ``epoch_end(epoch: Epoch) -> Reshaped | None``: run after every epoch's
  metrics, before the checkpoint. Returning :class:`Reshaped` replaces the
  training state by one of other shapes (network growth: new widths, params,
  batch statistics, optimizer state); the loop rebuilds the model from the
  widths (and per-layer widths), checks the new state against it, compiles
  the step once more, and stores them in every later checkpoint, so that
  ``resume`` rebuilds the grown network.
* ``metrics(epoch: Epoch) -> dict``: numbers added to the epoch's row of
  ``metrics.jsonl`` (e.g. a compacted network's accuracy, params and MACs,
  measured with ``epoch.evaluate``).
* ``summary(row) -> str | None``: the feature's words about an epoch's row,
  on that epoch's line and at the end of ``dessilbi train`` (without it, the
  line shows the scalar metrics the extension added as ``key value``).

Extensions run in the order given; pass the same ones again to resume.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Optional

import jax
import optax

from dessilbi_jax.train.steps import TrainState

Params = Any


class ExtraTrainable(NamedTuple):
  """Trainable state beside the params, with its own optimizer; it enters the loss.

  The loss of a step is ``cross_entropy(model(forward_params)) + Σ terms``
  where ``forward_params, term = forward(params, extra, key)`` (one key per
  step, the same on every device). ``tx`` steps ``extra`` down the gradient of
  that loss (give it a negative learning rate to step up, e.g. for Lagrange
  multipliers: ``optax.sgd(-η)``).

  Attributes:
    init: ``(params, key) -> extra``, the initial state (a pytree of arrays).
    tx: its optimizer.
    forward: ``(params, extra, key) -> (params the model runs with, loss term)``.
    evaluate: ``(params, extra) -> params`` that the test accuracies see
      (``None``: the params themselves).
    prepare: ``params -> params``, applied once to a fresh initialization
      (e.g. the L0 paper's rescaling of the weights); ``None``: none.
  """
  init: Callable[[Params, jax.Array], Any]
  tx: optax.GradientTransformation
  forward: Callable[[Params, Any, jax.Array], tuple[Params, jax.Array]]
  evaluate: Optional[Callable[[Params, Any], Params]] = None
  prepare: Optional[Callable[[Params], Params]] = None


class Epoch(NamedTuple):
  """What an extension sees after an epoch (host arrays of one replica)."""
  epoch: int
  cfg: Any                  # the TrainConfig
  model: Any                # the flax module the state belongs to
  widths: Optional[tuple[int, ...]]
  state: TrainState
  tx: optax.GradientTransformation
  steps_per_epoch: int
  row: Mapping[str, Any]    # the epoch's metrics so far
  evaluate: Callable[..., float]   # evaluate(model, variables) -> test accuracy
  history: Sequence[Mapping[str, Any]] = ()   # the rows of the epochs before (restored ones included)


class Reshaped(NamedTuple):
  """A new training state of other shapes, and the widths of the model it belongs to.

  ``layer_widths``: the per-layer widths of a ResNet's (``TrainConfig.layer_widths``,
  or a mapping ``{'block_widths': ...}``; ``None``: none, the model of ``widths``
  alone); ``Reshaped(state=state, **train.model_fields(model))`` says both.
  """
  widths: tuple[int, ...]
  state: TrainState
  layer_widths: Optional[Any] = None


class Extension(NamedTuple):
  """A feature's additions to the training loop (module docstring)."""
  name: str
  trainable: Optional[ExtraTrainable] = None
  epoch_end: Optional[Callable[[Epoch], Optional[Reshaped]]] = None
  metrics: Optional[Callable[[Epoch], Mapping[str, Any]]] = None
  summary: Optional[Callable[[Mapping[str, Any]], Optional[str]]] = None


def trainables(extensions) -> tuple[tuple[str, ExtraTrainable], ...]:
  return tuple((e.name, e.trainable) for e in extensions if e.trainable is not None)


def summaries(extensions, row: Mapping[str, Any]) -> tuple[str, ...]:
  """The extensions' words about ``row`` (those that have some)."""
  texts = (e.summary(row) for e in extensions if e.summary is not None)
  return tuple(t for t in texts if t)


def check_names(extensions) -> None:
  names = [e.name for e in extensions]
  if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
    raise ValueError(f'Extensions need distinct, non-empty names; got {names}.')
