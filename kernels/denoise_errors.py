"""Per-row denoising error: weight[r] * mean((eps_pred[r] - eps[image_index[r]]) ** 2).

The scorer and the MC-TI `denoise` objective push rows of (image, class, t) through the UNet and
need one error per row against the noise of that row's image. Doing it eagerly costs a gather
that copies eps K times, a diff, a square and a mean, each a full (R, N) round trip through memory
(and an fp32 copy of everything for bf16 inputs). Here every input element is read once, squared
and summed in fp32 registers; only (R,) floats are written.

Dispatch: CUDA tensors -> the Triton kernels (kernels/denoise_errors_triton.py). CPU tensors -> a
chunked PyTorch path with the same semantics, unless TRITON_INTERPRET=1 was set before this module
was imported: then the Triton kernels run on CPU tensors through Triton's interpreter (that is how
CI tests them). Without triton installed (it is the `triton` extra) every tensor takes the PyTorch
path, so the core classifies and trains on CPU without it.
"""

import math

import torch

try:
    from kernels import denoise_errors_triton as triton_path
except ImportError as e:  # no `triton` extra: every tensor, CUDA included, takes the PyTorch path
    if (e.name or "").partition(".")[0] != "triton":
        raise  # a broken module of ours is an error, not a missing extra
    triton_path = None

HAS_TRITON: bool = triton_path is not None
# TRITON_INTERPRET=1 before import: CPU tensors run the Triton kernels in Triton's interpreter.
INTERPRET: bool = HAS_TRITON and triton_path.INTERPRET

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_TORCH_CHUNK_ELEMS = 1 << 20  # CPU path: rows per chunk * N stays near this (4 MiB of fp32)


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output buffer comes from here, so tests can poison them (fill with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _fwd_triton(pred, eps, idx, w):  # (R, N), (B, N), (R,), (R,)|None -> (R,) fp32
    return triton_path.forward(pred, eps, idx, w, alloc=_alloc)


def _bwd_triton(g, pred, eps, idx, w, need_pred: bool, need_eps: bool):
    return triton_path.backward(g, pred, eps, idx, w, need_pred, need_eps, alloc=_alloc)


def _fwd_torch(pred, eps, idx, w):  # CPU path, chunked over rows: no (R, N) copy of eps
    R, N = pred.shape
    eps32 = eps.float()  # (B, N): B is small, one copy at most
    step = max(1, _TORCH_CHUNK_ELEMS // N)
    norms = []
    for s in range(0, R, step):
        # index_select + in-place sub + one-pass norm: ~2x faster than eager's gather/sub/pow/mean
        buf = eps32.index_select(0, idx[s : s + step]).sub_(pred[s : s + step])  # (r, N) fp32
        norms.append(torch.linalg.vector_norm(buf, dim=1))
    out = torch.cat(norms).square_().div_(N)  # (R,)
    return out if w is None else out.mul_(w)


def _bwd_torch(g, pred, eps, idx, w, need_pred: bool, need_eps: bool):
    R, N = pred.shape
    eps32 = eps.float()
    neg_scale = g * (-2.0 / N) if w is None else g * w * (-2.0 / N)  # (R,)
    gpred = _alloc(pred.shape, pred.dtype, pred.device) if need_pred else None
    geps = torch.zeros(eps.shape, dtype=torch.float32, device=eps.device) if need_eps else None
    step = max(1, _TORCH_CHUNK_ELEMS // N)
    for s in range(0, R, step):
        rows = idx[s : s + step]
        buf = eps32.index_select(0, rows).sub_(pred[s : s + step])  # (r, N) eps - pred
        grad = buf.mul_(neg_scale[s : s + step, None])  # d err / d pred
        if need_pred:
            gpred[s : s + step] = grad
        if need_eps:
            geps.index_add_(0, rows, grad, alpha=-1.0)
    return gpred, geps


def uses_triton(device: torch.device | str) -> bool:
    """True when tensors on `device` go through the Triton kernels (CUDA, or the interpreter);
    always False without triton installed."""
    return HAS_TRITON and (torch.device(device).type == "cuda" or INTERPRET)


class DenoiseErrors(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, eps, idx, w):  # (R, N), (B, N), (R,), (R,) fp32 | None -> (R,)
        ctx.save_for_backward(pred, eps, idx, w)
        return _run(pred, _fwd_triton, _fwd_torch, pred, eps, idx, w)

    @staticmethod
    def backward(ctx, g):  # g: (R,)
        pred, eps, idx, w = ctx.saved_tensors
        need_pred, need_eps, _, need_w = ctx.needs_input_grad
        g = g.float().contiguous()
        gpred = geps = gw = None
        if need_pred or need_eps:
            args = (g, pred, eps, idx, w, need_pred, need_eps)
            gpred, geps = _run(pred, _bwd_triton, _bwd_torch, *args)
            geps = None if geps is None else geps.to(eps.dtype)
        if need_w:  # rare (weights are usually constants): one more, unweighted, forward
            gw = g * _run(pred, _fwd_triton, _fwd_torch, pred, eps, idx, None)
        return gpred, geps, None, gw


def _run(like: torch.Tensor, triton_fn, torch_fn, *args):
    if not uses_triton(like.device):
        return torch_fn(*args)
    if like.is_cuda:  # Triton launches on the current device: make it the tensors' one
        with torch.cuda.device(like.device):
            return triton_fn(*args)
    return triton_fn(*args)


def _check(eps_pred, eps, image_index, weight) -> None:
    """One-line ValueErrors for the mistakes that would otherwise read out of bounds."""
    tensors = {"eps_pred": eps_pred, "eps": eps, "image_index": image_index, "weight": weight}
    for name, t in tensors.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise ValueError(
                f"denoise_errors: {name} must be a torch.Tensor, got {type(t).__name__}"
            )
    devices = {t.device for t in tensors.values() if t is not None}
    if len(devices) > 1:
        raise ValueError(
            f"denoise_errors: all inputs must be on one device, got {sorted(map(str, devices))}"
        )
    if eps_pred.dim() < 1 or eps.dim() < 1 or eps_pred.shape[1:] != eps.shape[1:]:
        raise ValueError(
            f"denoise_errors: eps_pred (R, *S) and eps (B, *S) must share S, "
            f"got {tuple(eps_pred.shape)} and {tuple(eps.shape)}"
        )
    for name in ("eps_pred", "eps"):
        if tensors[name].dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"denoise_errors: {name} must be floating point, got {tensors[name].dtype}"
            )
    R, B = eps_pred.shape[0], eps.shape[0]
    if image_index.dtype not in (torch.int64, torch.int32) or image_index.shape != (R,):
        raise ValueError(
            f"denoise_errors: image_index must be int64 (or int32) of shape ({R},), "
            f"got {image_index.dtype} of shape {tuple(image_index.shape)}"
        )
    # One device sync: the kernels trust the index and would read out of bounds otherwise.
    lo, hi = torch.stack(torch.aminmax(image_index)).tolist() if R else (0, 0)
    if lo < 0 or hi >= B:
        raise ValueError(f"denoise_errors: image_index values must lie in [0, {B}), got {lo}..{hi}")
    if weight is not None and (weight.shape != (R,) or not weight.is_floating_point()):
        raise ValueError(
            f"denoise_errors: weight must be floating point of shape ({R},), "
            f"got {weight.dtype} of shape {tuple(weight.shape)}"
        )


def denoise_errors(
    eps_pred: torch.Tensor,
    eps: torch.Tensor,
    image_index: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """(R, *S) predictions vs (B, *S) per-image noise -> (R,) float32 errors.

    result[r] = weight[r] * mean((eps_pred[r] - eps[image_index[r]]) ** 2), accumulated in fp32
    for fp32/bf16/fp16 inputs; differentiable in eps_pred, eps and weight.
    """
    _check(eps_pred, eps, image_index, weight)
    R, B = eps_pred.shape[0], eps.shape[0]
    if math.prod(eps_pred.shape[1:]) == 0:
        raise ValueError(
            f"denoise_errors: empty sample shape {tuple(eps_pred.shape[1:])} has no mean"
        )
    if R == 0:
        return eps_pred.new_zeros((0,), dtype=torch.float32)
    pred = eps_pred.reshape(R, -1).contiguous()  # (R, N); autograd-tracked, so grads reshape back
    eps2 = eps.reshape(B, -1).contiguous()  # (B, N)
    w = None if weight is None else weight.float().contiguous()
    return DenoiseErrors.apply(pred, eps2, image_index.contiguous(), w)
