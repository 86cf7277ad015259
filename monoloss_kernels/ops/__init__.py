"""Fused kernels written in Triton, one module per op."""
