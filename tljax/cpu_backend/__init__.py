"""The CPU backend: everything that makes XLA:CPU fast for these models, in one package.

Reached only through `tljax.ops` (which calls `conv2d`, `max_pool` and
`batch_norm_train` below when the platform is CPU) and through `tljax.main`
(which may restart a CPU run under the `allocator` settings). Nothing else
imports it, and GPU/TPU runs never load it.

  conv        which formulation each convolution gets (matmul, patches, C++)
  depthwise   depthwise conv with hand-written gradients
  dense_conv  K x K conv whose kernel gradient is one matmul
  pool        max pooling at memory speed with XLA's exact gradient
  batchnorm   training BatchNorm with the closed-form gradient
  native      builds, caches and registers the C++ kernels (`csrc/`)
  allocator   glibc malloc settings and the huge-block cache (`csrc/hostalloc.c`)

Switches: TLJAX_OPS=xla (or `tljax.ops.use_backend('xla')`) turns the whole
backend off; TLJAX_NATIVE=0 keeps it without the C++ kernels;
`python -m tljax.main --notune_malloc` leaves the process's allocator alone.
"""

from tljax.cpu_backend.batchnorm import batch_norm_train
from tljax.cpu_backend.conv import conv2d
from tljax.cpu_backend.pool import max_pool

__all__ = ['batch_norm_train', 'conv2d', 'max_pool']
