"""Fused kernels used by the MC-TI scorer and objectives (Triton on CUDA, PyTorch on CPU and
wherever the `triton` extra is not installed).

Name clash: Hugging Face's `kernels` library has this import name, and transformers probes it by
distribution version (ours resolves to `mcti`, far below its supported range) or, when no
distribution claims it, by importing it and reading `__version__`. Keep this package without a
`__version__` and `mcti`'s version outside 0.18.x (tests/kernels/test_name_clash.py).
"""

from kernels.denoise_errors import denoise_errors

__all__ = ["denoise_errors"]
