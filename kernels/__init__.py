"""Fused kernels used by the MC-TI scorer and objectives (Triton on CUDA, PyTorch on CPU)."""

from kernels.denoise_errors import denoise_errors

__all__ = ["denoise_errors"]
