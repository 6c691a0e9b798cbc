"""Numerical kernels whose fastest formulation depends on the platform."""
