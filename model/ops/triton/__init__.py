"""Triton kernels (CUDA backends of the ops in model/ops/). Importing one needs the `triton` package; tests run
them on CPU under TRITON_INTERPRET=1."""
