"""What every benchmark shares: where results go, and the machine they ran on."""

from __future__ import annotations

import os
import pathlib
import platform

import jax

RESULTS = pathlib.Path(__file__).parent / 'results'


def machine() -> str:
  """CPU model, core count and JAX backend, in one line."""
  cpu = platform.processor() or 'unknown CPU'
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  devices = jax.devices()
  return (f'{cpu}, {cores} cores; JAX {jax.__version__} backend `{jax.default_backend()}` '
          f'({len(devices)} x {devices[0].device_kind})')


def write_result(name: str, title: str, text: str, command: str = None) -> pathlib.Path:
  """Writes ``results/<name>.md``: a title, the command that regenerates it (default
  ``python -m benchmarks.<name>``), ``text``."""
  RESULTS.mkdir(parents=True, exist_ok=True)
  path = RESULTS / f'{name}.md'
  path.write_text(f'# {title}\n\nRegenerate: `{command or f"python -m benchmarks.{name}"}`.\n\n{text}')
  return path
