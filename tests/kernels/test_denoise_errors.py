"""kernels.denoise_errors against an independent float64 reference, on three backends.

- "torch":  the CPU PyTorch path (always runs here; `test_torch_path_without_triton` also runs it
  with triton unimportable, as the core runs without the `triton` extra).
- "interp": the Triton kernels under TRITON_INTERPRET=1 on CPU tensors. The flag must be set before
  triton/kernels are imported, and setting it in this process would leak into every other test
  folder of the suite (their CPU calls would crawl through the interpreter). So unless this process
  already imported kernels in interpreter mode, `test_interpreter_suite` re-runs this file in a
  fresh `python -m pytest` with the flag set and requires every "interp" case to pass there.
- "cuda":   the compiled Triton kernels (marked gpu, skipped without CUDA).
"""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import denoise_errors

DE = sys.modules["kernels.denoise_errors"]  # the module; `kernels.denoise_errors` is the function
TRI = DE.triton_path  # kernels.denoise_errors_triton, or None without triton installed
CHILD_FLAG = "MCTI_KERNELS_INTERP_CHILD"
if os.environ.get(CHILD_FLAG) == "1" and not DE.INTERPRET:  # module-level: fail loudly, never skip
    raise RuntimeError("interpreter child started but kernels were not built in interpreter mode")

HAS_CUDA = torch.cuda.is_available()
# "interp" cases exist only where the interpreter is active (else test_interpreter_suite runs them).
BACKENDS = ["torch", *(["interp"] if DE.INTERPRET else [])] + [
    pytest.param(
        "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]
    )
]
# The Triton paths only (the PyTorch path has no program grid to split rows over).
TRITON_BACKENDS = [b for b in BACKENDS if b != "torch"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Forward: inputs are cast to fp32 before the difference, so only the fp32 sum of N squares
# rounds: ~1e-6 relative whatever the input dtype (an fp16/bf16 accumulation would miss by 1e-3+).
FWD_RTOL = 1e-5
# Backward: grad_eps_pred is stored in the input dtype, so its rounding sets the tolerance.
BWD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}
# (R, B, S): R=1, B=1, R >> B, N not a multiple of any block, N > the interpreter's 16K block.
SHAPES = [(1, 1, (4, 5, 7)), (9, 2, (3, 7, 11)), (40, 3, (1, 33)), (5, 5, (130,)), (3, 2, (17000,))]


def reference(pred, eps, idx, w=None):
    """float64, written independently of the kernel module: gather, square, mean."""
    d = pred.double().flatten(1) - eps.double().flatten(1)[idx]
    err = d.square().mean(dim=1)
    return err if w is None else err * w.double()


class _Counted:
    """Wraps a Triton kernel so the test can see it was launched (kernel[grid](...))."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Yields the device for the backend; checks afterwards that the intended path really ran."""
    name = request.param
    if name == "torch":
        monkeypatch.setattr(DE, "INTERPRET", False)  # CPU tensors -> PyTorch path
        monkeypatch.setattr(DE, "_TORCH_CHUNK_ELEMS", 300)  # several row chunks per call
    if TRI is not None:
        fwd, bwd = _Counted(TRI._fwd_kernel), _Counted(TRI._bwd_kernel)
        monkeypatch.setattr(TRI, "_fwd_kernel", fwd)
        monkeypatch.setattr(TRI, "_bwd_kernel", bwd)
    # Poison every output buffer: an element the kernel forgets to write stays NaN and fails.
    monkeypatch.setattr(
        DE,
        "_alloc",
        lambda shape, dtype, device: torch.full(shape, math.nan, dtype=dtype, device=device),
    )
    device = "cuda" if name == "cuda" else "cpu"
    assert DE.uses_triton(device) == (name != "torch")
    yield device
    if name == "torch":
        if TRI is not None:
            assert fwd.launches == bwd.launches == 0, "PyTorch path launched a Triton kernel"
    else:
        assert fwd.launches > 0, f"{name}: the Triton forward kernel never ran"


def _inputs(R, B, S, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(R, *S, generator=g).to(dtype)
    eps = torch.randn(B, *S, generator=g).to(dtype)
    idx = torch.randint(0, B, (R,), generator=g)
    idx[torch.randperm(R, generator=g)[: min(R, B)]] = torch.arange(min(R, B))  # any order
    w = torch.rand(R, generator=g) + 0.5
    return [t.to(device) for t in (pred, eps, idx, w)]


@pytest.mark.parametrize("weighted", [False, True], ids=["w=None", "w"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("R,B,S", SHAPES)
def test_forward(backend, R, B, S, dtype, weighted):
    pred, eps, idx, w = _inputs(R, B, S, dtype, backend)
    w = w if weighted else None
    out = denoise_errors(pred, eps, idx, w)
    assert out.shape == (R,) and out.dtype == torch.float32 and out.device == pred.device
    torch.testing.assert_close(out.double(), reference(pred, eps, idx, w), rtol=FWD_RTOL, atol=1e-7)


@pytest.mark.parametrize("weighted", [False, True], ids=["w=None", "w"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("R,B,S", SHAPES[:4])
def test_backward(backend, R, B, S, dtype, weighted):
    pred, eps, idx, w = _inputs(R, B, S, dtype, backend, seed=1)
    upstream = torch.randn(R, generator=torch.Generator().manual_seed(2)).to(backend)
    leaves = [pred, eps] + ([w] if weighted else [])
    got = [t.clone().requires_grad_() for t in leaves]
    want = [t.detach().double().requires_grad_() for t in leaves]
    denoise_errors(got[0], got[1], idx, got[2] if weighted else None).backward(upstream)
    reference(want[0], want[1], idx, want[2] if weighted else None).backward(upstream.double())
    for name, a, b in zip(["eps_pred", "eps", "weight"], got, want, strict=False):
        assert a.grad.dtype == a.dtype, name
        tol = BWD_RTOL[a.dtype] if name != "weight" else FWD_RTOL
        scale = b.grad.abs().max().item()  # grads are ~2/N: tolerances relative to their size
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=tol, atol=tol * scale, msg=name)


def test_backward_pred_only_and_mixed_dtypes(backend):
    """The usual case: eps is sampled noise (no grad), pred comes out of a bf16 UNet."""
    pred, eps, idx, w = _inputs(12, 3, (4, 9, 9), torch.bfloat16, backend, seed=3)
    eps = eps.float()  # bf16 predictions against fp32 noise
    pred.requires_grad_()
    denoise_errors(pred, eps, idx, w).sum().backward()
    want = pred.detach().double().requires_grad_()
    reference(want, eps, idx, w).sum().backward()
    assert eps.grad is None
    scale = want.grad.abs().max().item()
    torch.testing.assert_close(pred.grad.double(), want.grad, rtol=8e-3, atol=8e-3 * scale)


def test_non_contiguous_inputs(backend):
    pred, eps, idx, w = _inputs(6, 4, (5, 8, 3), torch.float32, backend, seed=4)
    pred_t = pred.transpose(1, 3)  # (6, 3, 8, 5) strided view
    eps_t = eps.transpose(1, 3)
    idx_s = torch.stack([idx, idx], 1)[:, 0]  # stride 2
    w_s = torch.stack([w, w], 1)[:, 1]
    assert not any(t.is_contiguous() for t in (pred_t, eps_t, idx_s, w_s))
    out = denoise_errors(pred_t, eps_t, idx_s, w_s)
    torch.testing.assert_close(
        out.double(), reference(pred_t, eps_t, idx_s, w_s), rtol=FWD_RTOL, atol=0
    )


def test_int32_index_and_single_element_samples(backend):
    pred, eps, idx, _ = _inputs(7, 3, (), torch.float32, backend, seed=5)  # S = (): N = 1
    out = denoise_errors(pred, eps, idx.int())
    torch.testing.assert_close(
        out.double(), reference(pred[:, None], eps[:, None], idx), rtol=FWD_RTOL, atol=0
    )


@pytest.mark.parametrize("backend", TRITON_BACKENDS, indirect=True)
def test_chunked_rows(backend, monkeypatch):
    """Few rows are split over several programs on a GPU; force that split at a small size."""
    monkeypatch.setattr(TRI, "_blocks", lambda N, R, device: TRI._split(N, R, 64, target=3 * R))
    assert TRI._blocks(1000, 4, backend)[1:] == (3, 384)  # 3 chunks, each looping over 6 blocks
    pred, eps, idx, w = _inputs(4, 2, (1000,), torch.bfloat16, backend, seed=6)
    out = denoise_errors(pred, eps, idx, w)
    torch.testing.assert_close(out.double(), reference(pred, eps, idx, w), rtol=FWD_RTOL, atol=0)


def test_empty_rows():
    out = denoise_errors(torch.zeros(0, 3), torch.zeros(2, 3), torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,) and out.dtype == torch.float32


def _bad(**over):
    args = dict(
        eps_pred=torch.zeros(4, 2, 3),
        eps=torch.zeros(2, 2, 3),
        image_index=torch.tensor([0, 1, 1, 0]),
        weight=None,
    )
    return {**args, **over}


BAD = {
    "S mismatch": (_bad(eps=torch.zeros(2, 3, 2)), r"must share S"),
    "rank mismatch": (_bad(eps=torch.zeros(2, 6)), r"must share S"),
    "index too big": (_bad(image_index=torch.tensor([0, 1, 2, 0])), r"\[0, 2\)"),
    "index negative": (_bad(image_index=torch.tensor([0, -1, 1, 0])), r"\[0, 2\)"),
    "index float": (_bad(image_index=torch.zeros(4)), r"image_index must be int64"),
    "index shape": (_bad(image_index=torch.zeros(4, 1, dtype=torch.long)), r"shape \(4,\)"),
    "index length": (_bad(image_index=torch.zeros(3, dtype=torch.long)), r"shape \(4,\)"),
    "weight shape": (_bad(weight=torch.ones(3)), r"weight must be"),
    "weight int": (_bad(weight=torch.ones(4, dtype=torch.long)), r"weight must be"),
    "int inputs": (_bad(eps_pred=torch.zeros(4, 2, 3, dtype=torch.long)), r"floating point"),
    "empty S": (_bad(eps_pred=torch.zeros(4, 0), eps=torch.zeros(2, 0)), r"empty sample"),
    "not a tensor": (_bad(eps=[[0.0]]), r"must be a torch.Tensor"),
    "devices": (_bad(eps=torch.zeros(2, 2, 3, device="meta")), r"one device"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_inputs_rejected(case):
    kwargs, pattern = BAD[case]
    with pytest.raises(ValueError, match=pattern) as info:
        denoise_errors(**kwargs)
    assert "\n" not in str(info.value) and str(info.value).startswith("denoise_errors:")


WITHOUT_TRITON = """
import torch
import kernels
DE = sys.modules["kernels.denoise_errors"]
assert DE.triton_path is None and not DE.HAS_TRITON and not DE.INTERPRET
assert not DE.uses_triton("cuda") and not DE.uses_triton("cpu")
g = torch.Generator().manual_seed(0)
pred = torch.randn(9, 3, 7, 11, generator=g, requires_grad=True)
eps = torch.randn(2, 3, 7, 11, generator=g, requires_grad=True)
idx = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1])
w = torch.rand(9, generator=g) + 0.5
out = kernels.denoise_errors(pred, eps, idx, w)
out.sum().backward()
p64, e64 = (t.detach().double().requires_grad_() for t in (pred, eps))
ref = ((p64.flatten(1) - e64.flatten(1)[idx]) ** 2).mean(1) * w.double()
ref.sum().backward()
torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-7)
torch.testing.assert_close(pred.grad.double(), p64.grad, rtol=1e-5, atol=1e-7)
torch.testing.assert_close(eps.grad.double(), e64.grad, rtol=1e-5, atol=1e-7)
assert_still_blocked()
print("ok")
"""


def test_torch_path_without_triton(tmp_path):
    """Without the `triton` extra the module imports, dispatches every device (CUDA included) to
    the PyTorch path, and gets forward and both grads right."""
    from tests.blocked_imports import run_without

    run = run_without(["triton"], WITHOUT_TRITON, cwd=tmp_path, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


@pytest.mark.skipif(TRI is None, reason="triton not installed (the `triton` extra)")
@pytest.mark.skipif(DE.INTERPRET, reason="interpreter already active: cases ran in this process")
def test_interpreter_suite():
    """Re-run the "interp" cases in a fresh process where TRITON_INTERPRET=1 precedes the imports."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", CHILD_FLAG: "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "interp and not suite",
           "-m", "not gpu", str(Path(__file__).resolve())]  # fmt: skip
    run = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    tail = run.stdout[-3000:] + run.stderr[-2000:]
    assert run.returncode == 0, tail
    summary = run.stdout.strip().splitlines()[-1]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    assert passed >= 50 and "skipped" not in summary and "failed" not in summary, summary


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("R,B", [(32, 8), (1000, 25), (4096, 16)])
def test_cuda_sd15_rows(R, B, dtype):
    """SD-1.5 latent rows (4x64x64), forward and both grads against float64 on the GPU."""
    pred, eps, idx, w = _inputs(R, B, (4, 64, 64), dtype, "cuda", seed=7)
    pred.requires_grad_()
    eps.requires_grad_()
    out = denoise_errors(pred, eps, idx, w)
    p64, e64 = (t.detach().double().requires_grad_() for t in (pred, eps))
    ref = reference(p64, e64, idx, w)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=FWD_RTOL, atol=0)
    out.sum().backward()
    ref.sum().backward()
    for a, b in ((pred, p64), (eps, e64)):
        tol = BWD_RTOL[dtype]
        torch.testing.assert_close(
            a.grad.double(), b.grad, rtol=tol, atol=tol * b.grad.abs().max().item()
        )


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_offsets_past_int32():
    """R * N > 2**31 elements: row offsets must be computed in int64."""
    R, N = 33_000, 65_536
    if torch.cuda.mem_get_info()[0] < 3 * R * N * 2:
        pytest.skip("not enough free GPU memory")
    pred = torch.empty(R, N, dtype=torch.bfloat16, device="cuda").normal_()
    eps = torch.randn(2, N, dtype=torch.bfloat16, device="cuda")
    idx = torch.arange(R, device="cuda") % 2
    out = denoise_errors(pred, eps, idx)
    rows = torch.tensor([0, 1, R // 2, R - 2, R - 1], device="cuda")
    torch.testing.assert_close(
        out[rows].double(), reference(pred[rows], eps, idx[rows]), rtol=FWD_RTOL, atol=0
    )
