"""Training over all local devices, recording DessiLBI's path; retraining tickets.

:func:`fit` trains ``cfg.model`` on ``cfg.dataset`` data-parallel with
``jax.pmap`` (the batch split over the local devices, gradients averaged with
``pmean``, params and optimizer state replicated), the same code on one device
and on eight; on several hosts each process feeds its own slice of the batch
and only process 0 writes files. One job per file:

==========================  ==================================================
``config.py``               :class:`TrainConfig`, :data:`PRESETS`, the checks
``optimizers.py``           :data:`OPTIMIZERS`, the registry: per optimizer its
                            sub-config, its build, its extensions;
                            :func:`make_optimizer`, the learning-rate schedule
``steps.py``                the model, :class:`TrainState`, the pmapped steps
``loop.py``                 :func:`fit`, the loop over epochs
``extensions.py``           what features add to the loop (below)
``compact_report.py``       the compact network's metrics every epoch
``l0_gates.py``             L0 gates trained beside the weights
``run_dir.py``              the run directory: files, lock, damage
``regularization_path.py``  :class:`RegularizationPath`, ``path.npz``
``tickets.py``              :func:`retrain_ticket`
==========================  ==================================================

With an output directory :func:`fit` writes ``config.json``, ``init_params/``,
``metrics.jsonl``, ``path.npz`` and ``checkpoints/<E>/`` (see ``run_dir.py``);
:func:`write_run_plots` draws ``plots/*.png`` from them (``dessilbi train``
does). A line of ``metrics.jsonl`` holds ``epoch``, ``step``,
``lr``, ``train_loss``, ``train_acc``, ``dense_test_acc`` (W),
``sparse_test_acc`` (W ⊙ 1[Γ≠0]), ``weights_kept`` and ``groups_kept``
(fractions of the structured leaves' weights and groups inside Γ's support),
``seconds``, ``per_leaf`` (per leaf path: ``kind``, ``groups``,
``groups_in_support``, ``weights``, ``weights_kept``) and what extensions add.
For optimizers without Γ the sparse accuracy is ``None`` and the support is
that of the non-zero weights.

Resuming restores params, batch statistics, the optimizer state, the step
(the data position: batch k depends only on the seed and k), the RNG and the
extensions' state, after checking every array's checksum, so N epochs, then
``resume=True`` up to N + M epochs, gives the same bits as N + M epochs
straight. What ``metrics.jsonl`` holds after the checkpoint is dropped.

**Extensions** (:class:`Extension`, ``extensions.py``) let a feature add to
the loop without editing it: trainable state beside the params with its own
optimizer (:class:`ExtraTrainable`: L0 gates, Lagrange multipliers), a hook
after every epoch that may return a state of other shapes (:class:`Reshaped`:
growth; the step is recompiled and the widths go into every checkpoint), and
metrics per epoch (a compacted network's accuracy) with the words that
say them on screen. An optimizer's registry entry names the extensions it
trains with (L0 gates; the compact network's metrics), so the loop names no
feature. For instance a scalar
``s`` pulled towards 3 by a loss term ``(s − 3)²/2`` and reported per epoch::

  >>> import jax.numpy as jnp, optax
  >>> from dessilbi_jax import train
  >>> pull = train.ExtraTrainable(
  ...     init=lambda params, key: jnp.zeros([]), tx=optax.sgd(0.1),
  ...     forward=lambda params, s, key: (params, 0.5 * (s - 3.0) ** 2))
  >>> report = train.Extension('pull', trainable=pull,
  ...                          metrics=lambda epoch: {'s': epoch.state.extra['pull']})
  >>> cfg = train.TrainConfig(widths=(4, 8, 16, 16), batch_size=128, epochs=1)
  >>> result = train.fit(cfg, quiet=True, extensions=[report])
  >>> round(result.history[-1]['s'], 4)    # 11 steps of s ← s − 0.1·(s − 3): 3·(1 − 0.9¹¹)
  2.0586
"""

from dessilbi_jax.train.config import INITS
from dessilbi_jax.train.config import PRESETS
from dessilbi_jax.train.config import ConfigError
from dessilbi_jax.train.config import TrainConfig
from dessilbi_jax.train.config import check_config
from dessilbi_jax.train.config import check_values
from dessilbi_jax.train.config import preset
from dessilbi_jax.train.extensions import Epoch
from dessilbi_jax.train.extensions import Extension
from dessilbi_jax.train.extensions import ExtraTrainable
from dessilbi_jax.train.extensions import Reshaped
from dessilbi_jax.train.l0_gates import l0_extension
from dessilbi_jax.train.loop import TrainResult
from dessilbi_jax.train.loop import fit
from dessilbi_jax.train.optimizers import OPTIMIZERS
from dessilbi_jax.train.optimizers import Optimizer
from dessilbi_jax.train.optimizers import learning_rate_schedule
from dessilbi_jax.train.optimizers import make_optimizer
from dessilbi_jax.train.regularization_path import DamagedFileError
from dessilbi_jax.train.regularization_path import RegularizationPath
from dessilbi_jax.train.run_dir import RunLockedError
from dessilbi_jax.train.run_dir import load_config
from dessilbi_jax.train.run_dir import load_path
from dessilbi_jax.train.run_dir import write_plots
from dessilbi_jax.train.run_dir import write_run_plots
from dessilbi_jax.train.steps import TrainState
from dessilbi_jax.train.steps import build_model
from dessilbi_jax.train.steps import evaluate
from dessilbi_jax.train.steps import init_variables
from dessilbi_jax.train.steps import model_fields
from dessilbi_jax.train.tickets import retrain_ticket
from dessilbi_jax.train.tickets import suggest_epoch
from dessilbi_jax.train.tickets import ticket_masks

__all__ = (
    'ConfigError', 'DamagedFileError', 'Epoch', 'Extension', 'ExtraTrainable', 'INITS', 'OPTIMIZERS',
    'Optimizer', 'PRESETS', 'RegularizationPath', 'Reshaped', 'RunLockedError', 'TrainConfig', 'TrainResult',
    'TrainState', 'build_model', 'check_config', 'check_values', 'evaluate', 'fit', 'init_variables',
    'l0_extension', 'learning_rate_schedule', 'load_config', 'load_path', 'make_optimizer', 'model_fields', 'preset', 'retrain_ticket',
    'suggest_epoch', 'ticket_masks', 'write_plots', 'write_run_plots',
)
