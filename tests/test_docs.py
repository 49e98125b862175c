"""The documents: every cited Markdown file exists, every relative link resolves, the code blocks run.

* No text file of the repository names a ``.md`` path that the repository lacks (design notes kept
  elsewhere cannot be read by someone who clones it).
* Every relative link of ``README.md`` and ``docs/*.md`` points to a file that exists and, with
  ``#anchor``, to a heading of that file (GitHub's anchors).
* The README's and the docs' ``python`` code blocks run as written (each file's blocks in order, in a
  temporary directory); the README's Optax loop is checked for what it promises.
"""

import contextlib
import io
import os
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / 'docs').glob('*.md'))
PAGES = [ROOT / 'README.md', *DOCS]

_URL = re.compile(r'[A-Za-z][A-Za-z0-9+.-]*://\S+')
_MD_PATH = re.compile(r'(?<![\w/.-])((?:\.\.?/|/)?(?:[\w.-]+/)*[\w-][\w.-]*\.md)(?![\w/])')
_PLACEHOLDERS = ('NAME.md',)                          # a name the caller fills in (results/NAME.md)
_FENCE = re.compile(r'^(```|~~~)')
_LINK = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)(?:\s+"[^"]*")?\)')
_SKIPPED_DIRS = {'.git', '.venv', '.venv-ci', 'venv', 'runs', '__pycache__', 'node_modules', '.pytest_cache'}


def _repository_files() -> list[pathlib.Path]:
  """Tracked files and untracked ones git does not ignore; every file outside build/venv folders without git."""
  try:
    out = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'], cwd=ROOT,
                         capture_output=True, check=True, timeout=60).stdout
    return sorted({ROOT / name for name in out.decode().split('\0') if name and (ROOT / name).is_file()})
  except (OSError, subprocess.SubprocessError):
    files = []
    for directory, subdirs, names in os.walk(ROOT):
      subdirs[:] = [d for d in subdirs if d not in _SKIPPED_DIRS and not d.endswith('.egg-info')]
      files += [pathlib.Path(directory) / n for n in names]
    return sorted(files)


def _text(path: pathlib.Path):
  data = path.read_bytes()
  if b'\0' in data:
    return None
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError:
    return None


def cited_md_paths(path: pathlib.Path, text: str) -> list[str]:
  """The ``.md`` paths a file names, outside URLs, that must exist (see :func:`_exists`)."""
  found = []
  text = _URL.sub(' ', text)
  if path.suffix == '.md':   # a link's text is a label; its target is what it cites
    text = _LINK.sub(lambda m: f' {m.group(1).partition("#")[0]} ', text)
  for token in _MD_PATH.findall(text):
    if pathlib.PurePosixPath(token).name in _PLACEHOLDERS:
      continue
    # A benchmark names the results file it writes (an output of the script, not a citation).
    output = '/' not in token or token.startswith(('results/', 'benchmarks/results/'))
    if path.parent == ROOT / 'benchmarks' and output:
      continue
    found.append(token)
  return found


def _exists(path: pathlib.Path, token: str, root: pathlib.Path = ROOT) -> bool:
  """Whether ``token`` names a file inside ``root``, from ``root`` or from the citing file's folder."""
  for base in (root, path.parent):
    target = (base / token).resolve() if not token.startswith('/') else pathlib.Path(token)
    if target.is_file() and root in target.parents:
      return True
  return False


def missing_citations(files, root: pathlib.Path = ROOT) -> list[str]:
  problems = []
  for path in files:
    text = _text(path)
    if text is None:
      continue
    for number, line in enumerate(text.splitlines(), start=1):
      for token in cited_md_paths(path, line):
        if not _exists(path, token, root):
          problems.append(f'{path.relative_to(root)}:{number} cites {token}, which the repository lacks')
  return problems


def _prose_lines(text: str, *, code_spans: bool = False):
  """``(line number, line)`` outside fenced code blocks; inline code spans removed (kept with ``code_spans``)."""
  fenced = False
  for number, line in enumerate(text.splitlines(), start=1):
    if _FENCE.match(line.strip()):
      fenced = not fenced
      continue
    if not fenced:
      yield number, line if code_spans else re.sub(r'`[^`]*`', '', line)


def heading_anchors(text: str) -> set[str]:
  """GitHub's anchors of a Markdown file's headings (repeated ones get -1, -2, ...)."""
  anchors, seen = set(), {}
  for _, line in _prose_lines(text, code_spans=True):
    match = re.match(r'^#{1,6}\s+(.*?)\s*#*\s*$', line)
    if not match:
      continue
    slug = re.sub(r'[^\w\- ]', '', match.group(1).strip().lower()).replace(' ', '-')
    count = seen.get(slug, 0)
    seen[slug] = count + 1
    anchors.add(slug if count == 0 else f'{slug}-{count}')
  return anchors


def broken_links(page: pathlib.Path, root: pathlib.Path = ROOT) -> list[str]:
  problems = []
  text = page.read_text(encoding='utf-8')
  for number, line in _prose_lines(text):
    for target in _LINK.findall(line):
      if re.match(r'^[A-Za-z][A-Za-z0-9+.-]*:', target):   # https:, mailto:
        continue
      file_part, _, anchor = target.partition('#')
      destination = page if not file_part else (page.parent / file_part).resolve()
      where = f'{page.relative_to(root)}:{number}'
      if not destination.exists() or root not in [destination, *destination.parents]:
        problems.append(f'{where} links to {target}: no such file in the repository')
      elif anchor and destination.suffix == '.md' and anchor not in heading_anchors(
          destination.read_text(encoding='utf-8')):
        problems.append(f'{where} links to {target}: {destination.name} has no heading #{anchor}')
  return problems


def python_blocks(page: pathlib.Path) -> list[str]:
  return re.findall(r'^```python\n(.*?)^```', page.read_text(encoding='utf-8'), re.S | re.M)


# -- the checks themselves work ---------------------------------------------------------------------


def test_the_checks_catch_missing_documents_links_and_anchors(tmp_path):
  root = tmp_path / 'repo'
  (root / 'docs').mkdir(parents=True)
  (root / 'docs' / 'A.md').write_text('# A title\n## Choosing λ and ν\n```\n# not a heading\n```\n## A title\n')
  (root / 'code.py').write_text('"""See docs/A.md, docs/B.md, ../shared/A.md, NAME.md and https://x.org/C.md."""\n')
  (root / 'README.md').write_text('[a](docs/A.md#choosing-λ-and-ν) [b](docs/A.md#a-title-1) [c](#top)\n'
                                  '[d](docs/B.md) [e](docs/A.md#not-a-heading) `[f](docs/F.md)`\n# Top\n')
  assert missing_citations([root / 'code.py'], root) == [
      'code.py:1 cites docs/B.md, which the repository lacks',
      'code.py:1 cites ../shared/A.md, which the repository lacks']
  assert heading_anchors((root / 'docs' / 'A.md').read_text()) == {'a-title', 'choosing-λ-and-ν', 'a-title-1'}
  assert broken_links(root / 'README.md', root) == [
      'README.md:2 links to docs/B.md: no such file in the repository',
      'README.md:2 links to docs/A.md#not-a-heading: A.md has no heading #not-a-heading']


# -- the repository ---------------------------------------------------------------------------------


def test_no_file_cites_a_document_the_repository_lacks():
  here = pathlib.Path(__file__).resolve()   # its own examples of bad citations are data
  problems = missing_citations([p for p in _repository_files() if p.resolve() != here])
  assert not problems, 'Point these at docs/... or at a file of the repository:\n' + '\n'.join(problems)


@pytest.mark.parametrize('page', PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
  problems = broken_links(page)
  assert not problems, '\n'.join(problems)


def test_the_design_documents_are_in_the_repository():
  names = {p.name for p in DOCS}
  assert {'ALGORITHM.md', 'STRUCTURE.md', 'GROWTH.md', 'CONTROLLED_SPARSITY.md', 'TRAINING.md', 'SPEED.md'} <= names
  readme = (ROOT / 'README.md').read_text(encoding='utf-8')
  assert all(f'(docs/{name})' in readme for name in names), 'the README links every page of docs/'


def _run_blocks(blocks, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv('DESSILBI_DATA_DIR', str(tmp_path / 'data'))
  namespace, out = {'__name__': '__docs__'}, io.StringIO()
  with contextlib.redirect_stdout(out):
    for block in blocks:
      exec(compile(block, '<docs>', 'exec'), namespace)   # pylint: disable=exec-used
  return namespace, out.getvalue()


def test_the_readme_optax_loop_runs_and_finds_a_sparse_structure(tmp_path, monkeypatch):
  blocks = python_blocks(ROOT / 'README.md')
  assert len(blocks) == 1 and 'dl.dessilbi(' in blocks[0] and 'tx.update(grads, opt_state, params)' in blocks[0]
  namespace, out = _run_blocks(blocks, tmp_path, monkeypatch)
  dense, sparse = map(float, re.search(r'dense ([\d.]+), sparse ([\d.]+)', out).groups())
  assert dense > 0.9 and sparse > 0.9, out    # 10 classes: chance is 0.1
  import dessilbi_jax as dl  # pylint: disable=g-import-not-at-top
  summary = dl.sparsity_summary(namespace['params'], namespace['opt_state'])
  structured = [leaf for leaf in summary.values() if leaf['kind']]
  kept = sum(leaf['weights_kept'] for leaf in structured) / sum(leaf['weights'] for leaf in structured)
  assert 0 < kept < 1, kept                   # some weights entered Γ's support, not all
  for path, leaf in summary.items():
    if leaf['kind']:
      assert f"{path}: {leaf['groups_in_support']} of {leaf['groups']} {leaf['kind']} groups" in out


@pytest.mark.parametrize('page', [p for p in DOCS if python_blocks(p)], ids=lambda p: p.name)
def test_the_code_blocks_of_the_docs_run(page, tmp_path, monkeypatch):
  _run_blocks(python_blocks(page), tmp_path, monkeypatch)   # the blocks assert what they show
