"""Saving and loading a compact (removed) network that describes itself.

A compact model directory holds

* ``model.json``: for a zoo model, its name, ``num_classes``, ``input_shape``, every
  width argument (``kwargs``: :func:`dessilbi_jax.models.model_kwargs`, i.e.
  ``widths`` and the ResNets' ``block_widths``, ``shortcut_offsets``,
  ``stem_width``, ``stream_widths``), its params and MACs, and per array its
  shape, dtype and SHA-256; for any other model (a user's, e.g. the
  :class:`~dessilbi_jax.structure.resized.Resized` network ``remove`` gives
  it), ``model: null``, its input and output shapes and
* ``apply.jaxexport``: its eval-mode ``apply(variables, x)`` serialized by
  ``jax.export`` for any batch size, with its SHA-256 in ``model.json``;
* ``variables/``: the params and batch statistics, written with orbax.

:func:`load_compact` needs nothing else (not the user's Python class): it
rebuilds a zoo model with ``models.get_model`` or deserializes the program,
and checks every array against ``model.json``, so a truncated, bit-flipped,
missing or mismatched file gets a clear one-line error instead of a network
that computes something else.

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
PROGRAM = 'apply.jaxexport'
VERSION = 1
model_name = models.model_name   # the zoo name of a zoo module (defined in models, named here as before)


def _digest(array) -> str:
  return hashlib.sha256(np.ascontiguousarray(np.asarray(array)).tobytes()).hexdigest()


def _arrays(variables) -> dict[str, dict[str, Any]]:
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): {
      'shape': list(np.shape(leaf)), 'dtype': str(np.asarray(leaf).dtype), 'sha256': _digest(leaf)}
          for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(variables))[0]}


def _zoo_name(model) -> Optional[str]:
  if isinstance(model, str):
    return model
  try:
    return models.model_name(model)
  except ValueError:
    return None


def save_compact(directory, model: Union[str, Any], variables, *, input_shape: Sequence[int],
                 num_classes: Optional[int] = None, apply_kwargs: Optional[dict] = None,
                 **layer_widths) -> dict[str, Any]:
  """Writes ``variables`` of ``model`` to a new ``directory`` (see the module docstring).

  Args:
    directory: a directory that does not exist yet or is empty (nothing is overwritten).
    model: a zoo module (e.g. from :func:`dessilbi_jax.structure.remove`) or
      its name, then with ``num_classes`` and ``**layer_widths`` (``widths=...``, ...);
      or any other module with ``apply`` (a user's Flax model, the
      :class:`~dessilbi_jax.structure.resized.Resized` network ``remove`` gives
      it): its eval-mode computation is exported with ``jax.export``.
    variables: ``{'params': ..., 'batch_stats': ...}`` of that model.
    input_shape: the shape of one example.
    apply_kwargs: for an exported model, the keyword arguments of its eval-mode
      ``apply`` (default: the ones ``remove`` traced it with, else ``train=False``
      where its ``__call__`` takes it).

  Returns:
    The description written to ``model.json``.
  """
  directory = pathlib.Path(directory)
  if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
    raise FileExistsError(f'{directory} exists and is not empty; save the compact model into a new directory '
                          '(nothing is overwritten).')
  name = _zoo_name(model)
  if name is None:
    description, program = _exported(model, variables, tuple(int(n) for n in input_shape), apply_kwargs)
  else:
    description, program = _zoo_description(name, model, variables, input_shape, num_classes, layer_widths), None
  variables = jax.device_get(dict(variables))
  description['arrays'] = _arrays(variables)
  directory.mkdir(parents=True, exist_ok=True)
  if program is not None:
    (directory / PROGRAM).write_bytes(program)
  checkpointer = ocp.StandardCheckpointer()
  try:
    checkpointer.save((directory / 'variables').absolute(), variables)
    checkpointer.wait_until_finished()
  finally:
    checkpointer.close()
  (directory / 'model.json').write_text(json.dumps(description, indent=2) + '\n')  # last: marks it complete
  return description


def _zoo_description(name, model, variables, input_shape, num_classes, layer_widths) -> dict[str, Any]:
  if isinstance(model, str):
    if num_classes is None:
      raise ValueError('save_compact with a model name needs num_classes.')
    model = models.get_model(model, num_classes, input_shape, **layer_widths)
  kwargs = models.model_kwargs(model)
  rebuilt = models.get_model(name, model.num_classes, input_shape, **kwargs)
  expected = jax.eval_shape(rebuilt.init, jax.random.key(0), jnp.zeros((1, *input_shape)))
  shapes = lambda tree: jax.tree.map(lambda a: tuple(np.shape(a)), tree)
  if shapes(expected) != shapes(dict(variables)):
    raise ValueError(f'The variables do not fit {name} with these widths ({kwargs}): pass the '
                     'variables of this model.')
  return dict(format=FORMAT, version=VERSION, model=name, num_classes=int(model.num_classes),
              input_shape=[int(n) for n in input_shape], kwargs=kwargs,
              params=models.count_params(variables['params']), macs=models.count_flops(rebuilt, tuple(input_shape)))


def _eval_call(model, apply_kwargs, variables, x):
  """``(fn(variables, x), kwargs)``: the model's eval-mode apply."""
  if apply_kwargs is None:
    apply_kwargs = getattr(model, 'apply_kwargs', None)
  candidates = [apply_kwargs] if apply_kwargs is not None else [{'train': False}, {}]
  for i, kwargs in enumerate(candidates):
    fn = lambda v, inputs, kwargs=dict(kwargs): model.apply(v, inputs, **kwargs)
    try:
      out = jax.eval_shape(fn, variables, x)
      return fn, out
    except TypeError as e:
      if i + 1 < len(candidates) and "'train'" in str(e):
        continue
      raise ValueError(f'save_compact: {type(model).__name__}.apply(variables, x) fails on these variables '
                       f'({e}); pass the variables of this model.') from None
  raise AssertionError('unreachable')


def _exported(model, variables, input_shape, apply_kwargs) -> tuple[dict[str, Any], bytes]:
  """The description and serialized ``jax.export`` program of any module's eval-mode apply (batch polymorphic)."""
  if not hasattr(model, 'apply'):
    raise ValueError(f'save_compact: model must be a Flax module (or the network structure.remove gives); '
                     f'got {type(model).__name__}.')
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), dict(variables))
  fn, out = _eval_call(model, apply_kwargs, abstract,
                       jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
  batch, = jax.export.symbolic_shape('batch')
  try:
    exported = jax.export.export(jax.jit(fn))(abstract, jax.ShapeDtypeStruct((batch, *input_shape), jnp.float32))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'save_compact: {type(model).__name__} cannot be exported for any batch size '
                     f'({type(e).__name__}: {str(e).splitlines()[0][:300]}).') from None
  module = getattr(model, 'module', model)
  description = dict(format=FORMAT, version=VERSION, model=None, program=PROGRAM,
                     program_sha256=hashlib.sha256(blob := exported.serialize()).hexdigest(),
                     source=f'{type(module).__module__}.{type(module).__qualname__}',
                     input_shape=list(input_shape), output_shape=list(np.shape(out))[1:],
                     params=models.count_params(abstract['params']) if 'params' in abstract else 0)
  return description, blob


class ExportedModel:
  """A compact model saved as a ``jax.export`` program: ``apply(variables, x, train=False)`` without its class.

  Attributes:
    exported: the :class:`jax.export.Exported` eval-mode computation (any batch size).
    input_shape: one example's shape; ``num_classes``: the last output axis.
  """

  def __init__(self, exported, description: dict[str, Any]):
    self.exported = exported
    self.input_shape = tuple(description['input_shape'])
    self.output_shape = tuple(description.get('output_shape', ()))
    self.num_classes = self.output_shape[-1] if self.output_shape else None
    self.source = description.get('source', '')

  def apply(self, variables, x, *, train: bool = False):
    if train:
      raise ValueError(f'This compact model ({self.source}, loaded from its exported program) runs in eval mode '
                       'only: call apply(variables, x, train=False).')
    return self.exported.call(variables, jnp.asarray(x, jnp.float32))

  def __repr__(self):
    return f'ExportedModel({self.source}, input_shape={self.input_shape})'


def _damaged(directory, what: str) -> ValueError:
  return ValueError(f'{directory} is not a readable compact model: {what}. Write it again with '
                    '`dessilbi compact --run RUN --out DIR` (or structure.export.save_compact).')


def load_compact(directory) -> tuple[Any, dict[str, Any]]:
  """``(model, variables)`` saved by :func:`save_compact`, ready for ``model.apply(variables, x, train=False)``.

  A zoo model comes back as its Flax module; any other as an
  :class:`ExportedModel` (its exported program: no Python class needed).

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
  if description.get('model') is None:
    model, target = _load_program(directory, description)
  else:
    try:
      model = models.get_model(description['model'], description['num_classes'], description['input_shape'],
                               **description['kwargs'])
    except (KeyError, TypeError, ValueError) as e:
      raise _damaged(directory, f'model.json names no buildable model ({e})') from e
    target = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *description['input_shape'])))
  if not isinstance(description.get('arrays'), dict):
    raise _damaged(directory, 'model.json lists no arrays')
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


def _load_program(directory: pathlib.Path, description: dict[str, Any]):
  """The :class:`ExportedModel` of ``directory``'s program and its variables' abstract tree."""
  path = directory / str(description.get('program', PROGRAM))
  if not path.is_file():
    raise _damaged(directory, f'{path.name} (the exported program) is missing')
  blob = path.read_bytes()
  if hashlib.sha256(blob).hexdigest() != description.get('program_sha256'):
    raise _damaged(directory, f'{path.name} differs from what was saved (checksum mismatch)')
  try:
    exported = jax.export.deserialize(bytearray(blob))
    (abstract, _), _ = jax.tree.unflatten(exported.in_tree, exported.in_avals)
  except Exception as e:  # pylint: disable=broad-except
    raise _damaged(directory, f'{path.name} cannot be read ({type(e).__name__}: {str(e)[:200]})') from e
  if 'input_shape' not in description:
    raise _damaged(directory, 'model.json gives no input_shape')
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract)
  return ExportedModel(exported, description), target


def _flat(tree) -> dict[str, Any]:
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
