"""tljax: transfer learning on small image datasets with JAX/Flax."""

__version__ = '0.1.0'
