"""Triton GPU kernels (also run on CPU under TRITON_INTERPRET=1 in tests)."""
