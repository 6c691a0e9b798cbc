"""Recounts the forward FLOPs of a benchmark JSON from the lowered HLO, on this machine.

GPU runs made before `bench_tljax` counted FLOPs on the lowered program took
them from the compiled executable, where cuDNN convolutions are custom calls
that XLA's cost analysis skips (MFU came out ~100x too low); CPU runs with
`--rounds` before the fix in `bench_tljax.run_model` kept the count of the
C++-kernel lowering, whose convs are custom calls too. The FLOP count depends
only on the program (model, batch, input size), not on the device, so it is
recounted here on XLA's own conv path; the JSON records that it was.

  python -m tools.recount_flops gpu.json   # rewrites the file in place
"""

import json
import sys

import jax
import jax.numpy as jnp

from experiments import bench_tljax
from tljax import ops


def recount(path: str) -> None:
  with open(path) as f:
    result = json.load(f)
  for row in result['models']:
    setup = bench_tljax.Setup(row['model'], batch=row['batch'], dtype=jnp.dtype(row['dtype']),
                              device=jax.devices('cpu')[0], size=row['input_size'])
    with ops.use_backend('xla'):
      flops = bench_tljax._flops(setup.lower_inference()[0])
    print(f"{row['model']} {row['dtype']} batch {row['batch']}: "
          f"{(row.get('flops') or {}).get('inference')} -> {flops}")
    row.setdefault('flops', {})['inference'] = flops
  note = ('forward FLOPs recounted from the lowered HLO (XLA convs) on a CPU machine after the '
          'run (`tools/recount_flops.py`): the run counted a program whose convs are custom '
          'calls (cuDNN on GPU, the C++ kernels on CPU), which XLA\'s cost analysis skips')
  result['meta'].setdefault('notes', [])
  if note not in result['meta']['notes']:
    result['meta']['notes'].append(note)
  with open(path, 'w') as f:
    json.dump(result, f, indent=1)


if __name__ == '__main__':
  for p in sys.argv[1:]:
    recount(p)
