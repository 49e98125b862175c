"""Saving and loading a compact (removed) network that describes itself.

A compact model directory holds

* ``model.json``: the zoo's model name, ``num_classes``, ``input_shape``, every
  width argument (``kwargs``: :func:`dessilbi_jax.models.model_kwargs`, i.e.
  ``widths`` and the ResNets' ``block_widths``, ``shortcut_offsets``,
  ``stem_width``, ``stream_widths``), its params and MACs, and per array its
  shape, dtype and SHA-256;
* ``variables/``: the params and batch statistics, written with orbax.

:func:`load_compact` needs nothing else: it rebuilds the model with
``models.get_model`` and checks every array against ``model.json``, so a
truncated, bit-flipped, missing or mismatched file gets a clear error instead
of a network that computes something else.

Example::

  >>> import tempfile, jax, jax.numpy as jnp
  >>> from dessilbi_jax import models
  >>> from dessilbi_jax.structure import export
  >>> model = models.get_model('lenet5', 10, (8, 8, 1), widths=(3, 5, 20, 10))
  >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  >>> directory = tempfile.mkdtemp() + '/compact'
  >>> export.save_compact(directory, model, variables, input_shape=(8, 8, 1))['params']
  1198
  >>> loaded, loaded_vars = export.load_compact(directory)
  >>> loaded.widths, bool(jnp.all(loaded.apply(loaded_vars, jnp.ones((1, 8, 8, 1)))
  ...                             == model.apply(variables, jnp.ones((1, 8, 8, 1)))))
  ((3, 5, 20, 10), True)
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from dessilbi_jax import models

FORMAT = 'dessilbi-compact'
VERSION = 1
model_name = models.model_name   # the zoo name of a zoo module (defined in models, named here as before)


def _digest(array) -> str:
  return hashlib.sha256(np.ascontiguousarray(np.asarray(array)).tobytes()).hexdigest()


def _arrays(variables) -> dict[str, dict[str, Any]]:
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): {
      'shape': list(np.shape(leaf)), 'dtype': str(np.asarray(leaf).dtype), 'sha256': _digest(leaf)}
          for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(variables))[0]}


def save_compact(directory, model: Union[str, Any], variables, *, input_shape: Sequence[int],
                 num_classes: Optional[int] = None, **layer_widths) -> dict[str, Any]:
  """Writes ``variables`` of ``model`` (a zoo module, or its name with widths) to a new ``directory``.

  Args:
    directory: a directory that does not exist yet or is empty (nothing is overwritten).
    model: a zoo module (e.g. from :func:`dessilbi_jax.structure.remove`) or
      its name, then with ``num_classes`` and ``**layer_widths`` (``widths=...``, ...).
    variables: ``{'params': ..., 'batch_stats': ...}`` of that model.
    input_shape: the shape of one example.

  Returns:
    The description written to ``model.json``.
  """
  directory = pathlib.Path(directory)
  if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
    raise FileExistsError(f'{directory} exists and is not empty; save the compact model into a new directory '
                          '(nothing is overwritten).')
  if isinstance(model, str):
    if num_classes is None:
      raise ValueError('save_compact with a model name needs num_classes.')
    model = models.get_model(model, num_classes, input_shape, **layer_widths)
  name, kwargs = models.model_name(model), models.model_kwargs(model)
  rebuilt = models.get_model(name, model.num_classes, input_shape, **kwargs)
  expected = jax.eval_shape(rebuilt.init, jax.random.key(0), jnp.zeros((1, *input_shape)))
  shapes = lambda tree: jax.tree.map(lambda a: tuple(np.shape(a)), tree)
  if shapes(expected) != shapes(dict(variables)):
    raise ValueError(f'The variables do not fit {name} with these widths ({kwargs}): pass the '
                     'variables of this model.')
  variables = jax.device_get(dict(variables))
  description = dict(
      format=FORMAT, version=VERSION, model=name, num_classes=int(model.num_classes),
      input_shape=[int(n) for n in input_shape], kwargs=kwargs,
      params=models.count_params(variables['params']), macs=models.count_flops(rebuilt, tuple(input_shape)),
      arrays=_arrays(variables))
  directory.mkdir(parents=True, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  try:
    checkpointer.save((directory / 'variables').absolute(), variables)
    checkpointer.wait_until_finished()
  finally:
    checkpointer.close()
  (directory / 'model.json').write_text(json.dumps(description, indent=2) + '\n')  # last: marks it complete
  return description


def _damaged(directory, what: str) -> ValueError:
  return ValueError(f'{directory} is not a readable compact model: {what}. Write it again with '
                    '`dessilbi compact --run RUN --out DIR` (or structure.export.save_compact).')


def load_compact(directory) -> tuple[Any, dict[str, Any]]:
  """``(model, variables)`` saved by :func:`save_compact`, ready for ``model.apply(variables, x)``.

  Raises:
    FileNotFoundError: no compact model in ``directory``.
    ValueError: a damaged, truncated or mismatched file (named).
  """
  directory = pathlib.Path(directory)
  description_path = directory / 'model.json'
  if not description_path.is_file():
    raise FileNotFoundError(f'{directory} holds no compact model: model.json is missing.')
  try:
    description = json.loads(description_path.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise _damaged(directory, f'model.json is not valid JSON ({e})') from e
  if not isinstance(description, dict) or description.get('format') != FORMAT:
    raise _damaged(directory, f'model.json does not describe a {FORMAT!r} model')
  if description.get('version') != VERSION:
    raise _damaged(directory, f'version {description.get("version")!r}; this library reads version {VERSION}')
  try:
    model = models.get_model(description['model'], description['num_classes'], description['input_shape'],
                             **description['kwargs'])
  except (KeyError, TypeError, ValueError) as e:
    raise _damaged(directory, f'model.json names no buildable model ({e})') from e
  target = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *description['input_shape'])))
  expected = {path: (entry['shape'], entry['dtype']) for path, entry in description['arrays'].items()}
  implied = {path: (list(a.shape), str(a.dtype)) for path, a in _flat(target).items()}
  if expected != implied:
    raise _damaged(directory, 'its arrays do not match the model model.json describes')
  if not (directory / 'variables').is_dir():
    raise _damaged(directory, 'the variables/ directory is missing')
  checkpointer = ocp.StandardCheckpointer()
  try:
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), target)
    variables = checkpointer.restore((directory / 'variables').absolute(), abstract)
  except Exception as e:  # orbax raises many types for damaged files; name the directory instead.
    raise _damaged(directory, f'variables/ cannot be read ({type(e).__name__}: {str(e)[:200]})') from e
  finally:
    checkpointer.close()
  for path, leaf in _flat(variables).items():
    if tuple(np.shape(leaf)) != tuple(expected[path][0]):
      raise _damaged(directory, f'{path} has shape {np.shape(leaf)}, model.json says {expected[path][0]}')
    if _digest(leaf) != description['arrays'][path]['sha256']:
      raise _damaged(directory, f'{path} differs from what was saved (checksum mismatch)')
  return model, jax.tree.map(jnp.asarray, variables)


def _flat(tree) -> dict[str, Any]:
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
