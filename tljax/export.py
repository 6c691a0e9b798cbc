r"""Export a trained model as a serialized `jax.export` artifact that runs without tljax.

  python -m tljax.export --workdir=W [--output=DIR] [--format=jax[,tflite]]
      [--batch=dynamic|N] [--dtype=float32|bfloat16] [--precision=highest|default]
  python -m tljax.export --weights=DIR ...        # a ported-weights directory instead

A trained run leaves its final model in `W/export/` (`tljax.train`), a
ported-weights directory the tljax model code must rebuild. The export is
the compiled function instead: `model.jax` holds the StableHLO of
`x -> logits` with the weights inside, so any JAX (no Flax, no tljax) can run
it. Preprocessing stays outside the function, because resizing and cropping
are host work on images of any size; `export.json` records it (and the
labels, input layout, temperature, source metadata, versions and the
sha256 of model.jax), and `export_loader.py`, copied beside them, applies it.

The function returns raw logits, exactly `model.apply(...)`; a fitted
`temperature` is recorded under `output` in export.json, and the loader
divides the logits by it before the softmax (sigmoid for a 1-logit head), as
`tljax.predict` does. Keeping it out of the graph leaves the logits
comparable with training's and lets a user choose.

The batch dimension is symbolic by default (`jax.export.symbolic_shape`), so
one artifact takes any batch size. The convolutions are traced with plain
`lax` ops (`tljax.ops.use_backend('xla')`): the CPU backend's C++ kernels are
custom calls that exist only inside tljax. It is lowered for CPU and CUDA
(lowering needs no GPU); a platform whose lowering fails is dropped and the
reason recorded. Convolutions and matmuls are traced at 'highest' precision
so a float32 export gives float32 results on a GPU too (not TF32);
`--precision=default` trades that for speed.

`--format=tflite` also converts through `jax.experimental.jax2tf` and
`tf.lite` when TensorFlow is installed (the `tljax[tfds]` extra). ONNX is
not offered: see docs/export.md.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any, Sequence

import numpy as np
from absl import app, flags, logging

from tljax.porting import weights_io

MODEL_FILE = 'model.jax'
SPEC_FILE = 'export.json'
LOADER_FILE = 'export_loader.py'
TFLITE_FILE = 'model.tflite'
FORMATS = ('jax', 'tflite')
DTYPES = ('float32', 'bfloat16')
PRECISIONS = ('highest', 'default')
PLATFORMS = ('cpu', 'cuda')
SPEC_VERSION = 1


class ExportError(ValueError):
  """An export that cannot be made; the message names the problem and the fix."""


def find_final_export(workdir: str) -> str:
  """The ported-weights directory a finished run wrote (`W/export`), or a one-line ExportError."""
  if not os.path.isdir(workdir):
    raise ExportError(f'workdir {workdir} does not exist; pass the --workdir of a finished '
                      'training run (or --weights=DIR for a ported-weights directory).')
  directory = os.path.join(workdir, 'export')
  if not os.path.isfile(os.path.join(directory, weights_io.METADATA_FILE)):
    raise ExportError(f'{workdir} has no final export ({directory}/{weights_io.METADATA_FILE} '
                      'is missing): the run has not finished, and training writes it after the '
                      'last phase; finish or resume the run with `python -m tljax.main '
                      f'--config=... --workdir={workdir}`, or export a ported-weights directory '
                      'with --weights=DIR.')
  return directory


def parse_formats(value: str | Sequence[str]) -> tuple[str, ...]:
  names = value.split(',') if isinstance(value, str) else list(value)
  names = [n.strip().lower() for n in names if n.strip()]
  if 'onnx' in names:
    raise ExportError('--format=onnx is not supported: no jax→ONNX converter worked offline '
                      'with this jax (see docs/export.md); use jax or tflite.')
  unknown = sorted(set(names) - set(FORMATS))
  if unknown or not names:
    raise ExportError(f'unknown --format {unknown or value!r}; use a comma list of '
                      f'{", ".join(FORMATS)} (jax is always written).')
  return tuple(dict.fromkeys(['jax'] + names))


def parse_batch(value: str | int) -> int | None:
  """None for a symbolic batch dimension, else the fixed batch size."""
  if isinstance(value, str) and value.strip().lower() == 'dynamic':
    return None
  try:
    batch = int(value)
  except (TypeError, ValueError):
    batch = 0
  if batch < 1:
    raise ExportError(f"--batch must be 'dynamic' or a positive integer, got {value!r}.")
  return batch


def load_model(weights_dir: str, dtype: str = 'float32'):
  """`(model, variables, metadata)` like `tljax.predict`, the model computing in `dtype`."""
  import jax.numpy as jnp
  from tljax import models, predict
  if dtype not in DTYPES:
    raise ExportError(f'--dtype must be one of {", ".join(DTYPES)}, got {dtype!r}.')
  model, variables, meta = predict.load_for_inference(weights_dir)
  if dtype != 'float32':
    model = models.create(meta['arch'], int(meta['num_classes']), head=meta.get('head'),
                          dtype=jnp.dtype(dtype), **meta.get('arch_kw', {}))
  return model, variables, meta


def inference_function(model, variables):
  """`x -> float32 logits` with the weights closed over (they become constants of the graph)."""
  import jax.numpy as jnp

  def logits(x):
    return model.apply(variables, x, train=False).astype(jnp.float32)

  return logits


def _input_struct(batch: int | None, size: int):
  import jax
  import jax.numpy as jnp
  lead = jax.export.symbolic_shape('b')[0] if batch is None else batch
  return jax.ShapeDtypeStruct((lead, size, size, 3), jnp.float32)


def _tracing(precision: str):
  """Plain lax ops, and the matmul/conv precision baked into the graph.

  The precision is fixed at trace time: with 'default' a float32 export runs
  its convolutions in TF32 on NVIDIA GPUs (about 1e-3 off the CPU result),
  and the caller's `jax.default_matmul_precision` can no longer change it.
  """
  import contextlib
  import jax
  from tljax import ops
  if precision not in PRECISIONS:
    raise ExportError(f'--precision must be one of {", ".join(PRECISIONS)}, got {precision!r}.')
  stack = contextlib.ExitStack()
  stack.enter_context(ops.use_backend('xla'))
  if precision == 'highest':
    stack.enter_context(jax.default_matmul_precision('highest'))
  return stack


def export_jax(fn, batch: int | None, size: int, platforms: Sequence[str] = PLATFORMS,
               precision: str = 'highest') -> tuple[bytes, list[str], dict[str, str]]:
  """Serialized export for every platform that lowers; `(bytes, platforms, {dropped: reason})`."""
  import jax
  struct = _input_struct(batch, size)
  dropped: dict[str, str] = {}
  with _tracing(precision):
    try:
      exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(struct)
    except Exception as e:  # noqa: BLE001 - fall back to the platforms that lower alone
      kept = []
      for platform in platforms:
        try:
          jax.export.export(jax.jit(fn), platforms=(platform,))(struct)
          kept.append(platform)
        except Exception as one:  # noqa: BLE001
          dropped[platform] = ' '.join(str(one).split())[:300] or type(one).__name__
      if not kept:
        raise ExportError(f'the model does not lower for any of {list(platforms)} ({e}).') from e
      exported = jax.export.export(jax.jit(fn), platforms=tuple(kept))(struct)
  return exported.serialize(), list(exported.platforms), dropped


def export_tflite(fn, batch: int | None, size: int, path: str,
                  precision: str = 'highest') -> None:
  """Writes a TFLite flatbuffer through jax2tf; needs TensorFlow (the `tljax[tfds]` extra)."""
  try:
    import tensorflow as tf
    from jax.experimental import jax2tf
  except ImportError as e:
    raise ExportError(f'--format=tflite needs TensorFlow ({e}); install the extra: '
                      "pip install 'tljax[tfds]', or export --format=jax only.") from None
  lead = 'b' if batch is None else str(batch)
  with _tracing(precision):
    converted = jax2tf.convert(fn, polymorphic_shapes=[f'({lead}, {size}, {size}, 3)'],
                               with_gradient=False)
    module = tf.Module()
    module.f = tf.function(converted, autograph=False, input_signature=[
        tf.TensorSpec([batch, size, size, 3], tf.float32)])
    concrete = module.f.get_concrete_function()
  converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], module)
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]  # no Flex: LiteRT runs it
  try:
    flatbuffer = converter.convert()
  except Exception as e:  # noqa: BLE001 - the converter's errors are long; keep the gist
    detail = ' '.join(str(e).split())[:400]
    raise ExportError(f'TFLite conversion failed ({detail}); export --format=jax only.') from e
  with open(path, 'wb') as f:
    f.write(flatbuffer)


def _json_safe(value: Any) -> Any:
  return json.loads(json.dumps(value, default=str))


def export(weights_dir: str, output: str, formats: Sequence[str] = ('jax',),
           batch: int | None = None, dtype: str = 'float32',
           platforms: Sequence[str] = PLATFORMS, precision: str = 'highest') -> dict:
  """Writes model.jax, export.json and export_loader.py (and other formats) into `output`.

  Returns the export.json document. Files are written under temporary names
  and renamed, so an interrupted export never leaves a model.jax whose
  sha256 matches a stale export.json.
  """
  import jax
  from tljax import labels as labels_lib
  from tljax.data.preprocess import Preprocessing
  from tljax.predict import temperature_of
  model, variables, meta = load_model(weights_dir, dtype)
  spec = Preprocessing.from_json(meta['preprocessing'])
  num_classes = int(meta['num_classes'])
  fn = inference_function(model, variables)
  blob, lowered_for, dropped = export_jax(fn, batch, spec.input_size, platforms, precision)
  os.makedirs(output, exist_ok=True)
  model_path = os.path.join(output, MODEL_FILE)
  with open(model_path + '.tmp', 'wb') as f:
    f.write(blob)
  os.replace(model_path + '.tmp', model_path)
  shutil.copyfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), LOADER_FILE),
                  os.path.join(output, LOADER_FILE))
  files = {'jax': {'file': MODEL_FILE, 'sha256': weights_io.sha256_of(model_path),
                   'platforms': lowered_for,
                   **({'dropped_platforms': dropped} if dropped else {})}}
  if 'tflite' in formats:
    tflite_path = os.path.join(output, TFLITE_FILE)
    export_tflite(fn, batch, spec.input_size, tflite_path, precision)
    files['tflite'] = {'file': TFLITE_FILE, 'sha256': weights_io.sha256_of(tflite_path)}
  doc = {
      'spec_version': SPEC_VERSION,
      'created_by': 'tljax.export',
      'arch': meta['arch'],
      'num_classes': num_classes,
      'input': {'shape': [batch, spec.input_size, spec.input_size, 3], 'dtype': 'float32',
                'layout': 'NHWC', 'batch': 'dynamic' if batch is None else batch,
                'values': 'RGB, (pixel in 0-255 - mean) / std, per preprocessing'},
      'output': {'shape': [batch, num_classes], 'dtype': 'float32', 'values': 'logits',
                 'activation': 'sigmoid' if num_classes == 1 else 'softmax',
                 'temperature': temperature_of(meta)},
      'compute_dtype': dtype,
      'precision': precision,
      'preprocessing': {**spec.to_json(), 'decode': 'EXIF rotation, then RGB; alpha composited '
                        'over white; 16-bit scaled to 8-bit (tljax.data.decode.to_rgb)'},
      'labels': labels_lib.resolve(meta.get('labels'), num_classes),
      'formats': files,
      'jax_version': jax.__version__,
      'source': os.path.abspath(weights_dir),
      'source_metadata': _json_safe(meta),
  }
  spec_path = os.path.join(output, SPEC_FILE)
  with open(spec_path + '.tmp', 'w') as f:
    json.dump(doc, f, indent=2)
  os.replace(spec_path + '.tmp', spec_path)
  return doc


# Private flags: `tljax.predict`, imported to load the weights, defines its own `--weights`.
FLAGS = flags.FlagValues()
flags.DEFINE_string('workdir', None, 'A finished training run; its final model (W/export) is used.',
                    flag_values=FLAGS)
flags.DEFINE_string('weights', None, 'A ported-weights directory (instead of --workdir).',
                    flag_values=FLAGS)
flags.DEFINE_string('output', None, 'Output directory (default: W/exported or DIR/exported).',
                    flag_values=FLAGS)
flags.DEFINE_string('format', 'jax', 'Comma list of formats: jax (always), tflite.',
                    flag_values=FLAGS)
flags.DEFINE_string('batch', 'dynamic', "'dynamic' (any batch size) or a fixed batch size.",
                    flag_values=FLAGS)
flags.DEFINE_enum('dtype', 'float32', list(DTYPES), 'Compute dtype (inputs/outputs stay float32).',
                  flag_values=FLAGS)
flags.DEFINE_enum('precision', 'highest', list(PRECISIONS),
                  'Conv/matmul precision baked into the graph; default allows TF32 on GPUs.',
                  flag_values=FLAGS)

USAGE = ('usage: python -m tljax.export --workdir=W | --weights=DIR [--output=DIR] '
         '[--format=jax,tflite] [--batch=dynamic|N] [--dtype=float32|bfloat16] '
         '[--precision=highest|default]')


def _parse(argv: list[str]) -> list[str]:
  """Our flags, then absl's own (--verbosity, ...); a bad flag is one `error:` line, status 2."""
  try:
    return flags.FLAGS(FLAGS(argv, known_only=True))
  except flags.Error as e:
    print(f'error: {e}; {USAGE}', file=sys.stderr)
    sys.exit(2)


def run(workdir: str | None, weights: str | None, output: str | None, formats: str = 'jax',
        batch: str = 'dynamic', dtype: str = 'float32', precision: str = 'highest') -> int:
  """Exports and prints where; returns the exit status (1 with one `error:` line on failure)."""
  from tljax.porting.merge import PortError
  try:
    if bool(workdir) == bool(weights):
      raise ExportError('pass exactly one of --workdir=W (a finished run) or --weights=DIR '
                        '(a ported-weights directory).')
    source = find_final_export(workdir) if workdir else weights
    if weights and not os.path.isdir(weights):
      raise ExportError(f'--weights {weights} does not exist; pass a ported-weights directory '
                        '(`python -m tljax.port ... --output=DIR`).')
    output = output or os.path.join(workdir or weights, 'exported')
    doc = export(source, output, parse_formats(formats), parse_batch(batch), dtype,
                 precision=precision)
  except (ExportError, PortError, ValueError, KeyError, OSError) as e:
    detail = ' '.join(str(e).split()) or type(e).__name__
    print(f'error: {detail}', file=sys.stderr)
    return 1
  written = ', '.join(f['file'] for f in doc['formats'].values())
  print(f'exported {doc["arch"]} to {output}: {written}, {SPEC_FILE}, {LOADER_FILE} '
        f'(platforms {", ".join(doc["formats"]["jax"]["platforms"])}, batch '
        f'{doc["input"]["batch"]}); run it with `python {os.path.join(output, LOADER_FILE)} '
        f'{output} IMAGE`')
  return 0


def main(argv):
  if len(argv) > 1:
    print(f'error: unexpected arguments {argv[1:]}; {USAGE}', file=sys.stderr)
    sys.exit(2)
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  sys.exit(run(FLAGS.workdir, FLAGS.weights, FLAGS.output, FLAGS.format, FLAGS.batch,
               FLAGS.dtype, FLAGS.precision))


if __name__ == '__main__':
  app.run(main, flags_parser=_parse)
