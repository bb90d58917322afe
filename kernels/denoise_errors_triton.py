"""Triton kernels of kernels.denoise_errors: the per-row forward and its backward, with launchers.

Imported by kernels/denoise_errors.py only when triton is installed (the `triton` extra); without
it every tensor takes that module's PyTorch path. Output buffers come from the caller's `alloc`
so that tests can poison them (fill with NaN) and see any element a kernel forgets to write.
"""

from collections.abc import Callable

import torch
import triton
import triton.language as tl

# Read once, at import, from the same knob that made @triton.jit build interpreted kernels below:
# TRITON_INTERPRET=1 must be set before this module is imported.
INTERPRET: bool = bool(triton.knobs.runtime.interpret)

Alloc = Callable[[tuple[int, ...], torch.dtype, torch.device], torch.Tensor]


@triton.jit
def _fwd_kernel(
    pred_ptr,  # (R, N) any float dtype
    eps_ptr,  # (B, N)
    idx_ptr,  # (R,) int32/int64, row -> image
    w_ptr,  # (R,) fp32, unused unless HAS_W
    part_ptr,  # (R, n_chunks) fp32 partial errors
    N,
    n_chunks,
    span,  # elements per chunk, a multiple of BLOCK
    HAS_W: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    img = tl.load(idx_ptr + row).to(tl.int64)
    pred_row = pred_ptr + row.to(tl.int64) * N  # int64: R * N can pass 2**31
    eps_row = eps_ptr + img * N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    start = chunk * span
    for off in range(start, start + span, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < N
        p = tl.load(pred_row + cols, mask=mask, other=0.0).to(tl.float32)
        e = tl.load(eps_row + cols, mask=mask, other=0.0).to(tl.float32)
        acc += (p - e) * (p - e)
    err = tl.sum(acc, axis=0) / N
    if HAS_W:
        err = err * tl.load(w_ptr + row)
    tl.store(part_ptr + row * n_chunks + chunk, err)


@triton.jit
def _bwd_kernel(
    pred_ptr,  # (R, N)
    eps_ptr,  # (B, N)
    idx_ptr,  # (R,)
    w_ptr,  # (R,) fp32, unused unless HAS_W
    g_ptr,  # (R,) fp32 upstream gradient
    gpred_ptr,  # (R, N) in pred's dtype, written if PRED_GRAD
    geps_ptr,  # (B, N) fp32 zeros, accumulated if EPS_GRAD
    N,
    HAS_W: tl.constexpr,
    PRED_GRAD: tl.constexpr,
    EPS_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    img = tl.load(idx_ptr + row).to(tl.int64)
    scale = tl.load(g_ptr + row) * 2.0 / N
    if HAS_W:
        scale = scale * tl.load(w_ptr + row)
    p = tl.load(pred_ptr + row.to(tl.int64) * N + cols, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(eps_ptr + img * N + cols, mask=mask, other=0.0).to(tl.float32)
    grad = scale * (p - e)  # (BLOCK,) d err / d pred
    if PRED_GRAD:
        out = gpred_ptr + row.to(tl.int64) * N + cols
        tl.store(out, grad.to(gpred_ptr.dtype.element_ty), mask=mask)
    if EPS_GRAD:
        # Several rows share one image: sum their contributions (fp32 atomics, order-free).
        tl.atomic_add(geps_ptr + img * N + cols, -grad, mask=mask)


def _split(N: int, R: int, BLOCK: int, target: int) -> tuple[int, int, int]:
    """(BLOCK, n_chunks, span): cut each row into chunks so that R * n_chunks ~ target programs."""
    n_blocks = triton.cdiv(N, BLOCK)
    per_chunk = triton.cdiv(n_blocks, min(n_blocks, max(1, target // R)))
    return BLOCK, triton.cdiv(n_blocks, per_chunk), per_chunk * BLOCK


def _blocks(N: int, R: int, device: torch.device) -> tuple[int, int, int]:
    if INTERPRET:  # the interpreter pays per program and per op, not per element: few, big blocks
        return _split(N, R, min(triton.next_power_of_2(N), 1 << 14), target=1)
    # Few rows (R=32 at SD-1.5 size is 32 programs on 132 SMs) would leave the GPU idle:
    # aim at ~4 programs per SM; their partial sums are added by a tiny (R, n_chunks) sum.
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return _split(N, R, min(max(triton.next_power_of_2(N), 16), 2048), target=4 * sms)


def _warps(BLOCK: int) -> int:
    return 8 if BLOCK >= 2048 else 4  # 8+ elements per thread: 16-byte loads for bf16 and fp32


def forward(pred, eps, idx, w, alloc: Alloc):  # (R, N), (B, N), (R,), (R,)|None -> (R,) fp32
    R, N = pred.shape
    BLOCK, n_chunks, span = _blocks(N, R, pred.device)
    part = alloc((R, n_chunks), torch.float32, pred.device)  # (R, C)
    w_arg = w if w is not None else part  # any pointer; never read when HAS_W is False
    _fwd_kernel[(R, n_chunks)](
        pred, eps, idx, w_arg, part, N, n_chunks, span, HAS_W=w is not None, BLOCK=BLOCK,
        num_warps=_warps(BLOCK),
    )  # fmt: skip
    return part.view(R) if n_chunks == 1 else part.sum(dim=1)


def backward(g, pred, eps, idx, w, need_pred: bool, need_eps: bool, alloc: Alloc):
    R, N = pred.shape
    BLOCK = min(max(triton.next_power_of_2(N), 16), (1 << 14) if INTERPRET else 2048)
    gpred = alloc(pred.shape, pred.dtype, pred.device) if need_pred else None
    geps = torch.zeros(eps.shape, dtype=torch.float32, device=eps.device) if need_eps else None
    _bwd_kernel[(R, triton.cdiv(N, BLOCK))](
        pred, eps, idx, w if w is not None else g, g,
        gpred if need_pred else g, geps if need_eps else g, N,
        HAS_W=w is not None, PRED_GRAD=need_pred, EPS_GRAD=need_eps, BLOCK=BLOCK,
        num_warps=_warps(BLOCK),
    )  # fmt: skip
    return gpred, geps
