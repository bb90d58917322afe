"""SD-1.5-sized UNet (random weights, bf16): TI training step, inference rows/s, attention backends,
and what batching rows of (image, class, t) buys the diffusion classifier.

    python benchmarks/gpu_unet_bench.py                     # CUDA, SD-1.5 config, 64x64 latents
    python benchmarks/gpu_unet_bench.py --device cpu --tiny # tiny model: exercises the logic on CPU

Steps: (a) per attention backend (SDPA `AttnProcessor2_0`, xformers): a textual-inversion-like
training step (UNet frozen, gradient into the (rows, 77, 768) conditioning, loss through
kernels.denoise_errors) and inference rows/s; (b) batching: score N images x K classes x T
timesteps (rows share each image's (t, eps) draws) in calls of --batch-rows rows vs one call per
image vs one call per row (timed on one image, extrapolated). Lines starting "RESULT " are parsed
by benchmarks/gpu_check.sh for its summary.
"""

import argparse
import json
import sys
import time

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from torch.utils.flop_counter import FlopCounterMode

from kernels import denoise_errors

# SD-1.5 unet/config.json values (the rest are UNet2DConditionModel's defaults, equal to SD-1.5's).
SD15 = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
TINY = dict(SD15, sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)  # fmt: skip
SD15_GFLOP_PER_ROW = 803.0  # forward, 64x64 latents, 77 text tokens (multiply-add = 2 FLOP)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM datasheets
TEXT_LEN = 77


def result(key: str, value) -> None:
    print(f"RESULT {key}={value}", flush=True)


def clock(device: torch.device, fn, warmup: int, iters: int) -> float:
    """Median seconds per call of fn()."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def inputs(cfg: dict, rows: int, device, dtype, gen: torch.Generator):
    s, d = cfg["sample_size"], cfg["cross_attention_dim"]
    x = torch.randn(rows, cfg["in_channels"], s, s, generator=gen).to(device, dtype)
    t = torch.randint(0, 1000, (rows,), generator=gen).to(device)
    ctx = torch.randn(rows, TEXT_LEN, d, generator=gen).to(device, dtype)
    return x, t, ctx


def count_flops(unet, cfg, device, dtype, backward: bool) -> float:
    """FLOPs of one row (forward, or TI forward+backward) as torch's FlopCounterMode sees them."""
    gen = torch.Generator().manual_seed(0)
    x, t, ctx = inputs(cfg, 1, device, dtype, gen)
    ctx.requires_grad_(backward)
    with FlopCounterMode(display=False) as counter:
        out = unet(x, t, encoder_hidden_states=ctx).sample
        if backward:
            out.float().square().mean().backward()
    return float(counter.get_total_flops())


def attention_backends(unet):
    """(name, setter) pairs; a setter raises when its backend cannot run here."""

    def sdpa():
        unet.set_attn_processor(AttnProcessor2_0())

    def xformers():
        unet.enable_xformers_memory_efficient_attention()

    return [("sdpa", sdpa), ("xformers", xformers)]


def time_backend(unet, cfg, args, device, dtype, gen) -> tuple[float, float]:
    """(seconds per TI step of --train-batch rows, seconds per inference call of --infer-batch)."""
    # TI step: UNet frozen, gradient flows into the conditioning (the token embeddings).
    x, t, ctx = inputs(cfg, args.train_batch, device, dtype, gen)
    eps = torch.randn_like(x)
    ctx.requires_grad_()
    idx = torch.arange(args.train_batch, device=device)

    def train_step():
        pred = unet(x, t, encoder_hidden_states=ctx).sample
        denoise_errors(pred, eps, idx).mean().backward()
        ctx.grad = None

    t_train = clock(device, train_step, args.warmup, args.iters)
    xi, ti, ci = inputs(cfg, args.infer_batch, device, dtype, gen)

    @torch.inference_mode()
    def infer():
        unet(xi, ti, encoder_hidden_states=ci)

    t_inf = clock(device, infer, args.warmup, args.iters)
    return t_train, t_inf


def bench_backends(unet, cfg, args, device, dtype, flops) -> dict:
    out = {}
    gen = torch.Generator().manual_seed(1)
    for name, enable in attention_backends(unet):
        try:
            enable()
        except Exception as exc:  # xformers missing, or no CUDA: say why and go on
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            print(f"[{name}] not available: {reason}")
            result(f"{name}_status", f"not available: {reason}")
            out[name] = {"status": f"not available: {reason}"}
            continue
        t_train, t_inf = time_backend(unet, cfg, args, device, dtype, gen)
        res = {
            "status": "ok",
            "train_step_s": t_train,
            "train_rows_per_s": args.train_batch / t_train,
            "train_TFLOPs": args.train_batch * flops["train"] / t_train / 1e12,
            "infer_rows_per_s": args.infer_batch / t_inf,
            "infer_TFLOPs": args.infer_batch * flops["fwd"] / t_inf / 1e12,
        }
        if args.peak_tflops:
            res["train_MFU"] = res["train_TFLOPs"] / args.peak_tflops
            res["infer_MFU"] = res["infer_TFLOPs"] / args.peak_tflops
        out[name] = res
        mfu = (f", {res['train_MFU']:.1%} / {res['infer_MFU']:.1%} of peak" if args.peak_tflops else "")  # fmt: skip
        print(f"[{name}] TI step {args.train_batch} rows: {t_train * 1e3:.1f} ms "
              f"({res['train_TFLOPs']:.1f} TFLOP/s); inference {args.infer_batch} rows: "
              f"{res['infer_rows_per_s']:.1f} rows/s ({res['infer_TFLOPs']:.1f} TFLOP/s){mfu}")  # fmt: skip
        for k, v in res.items():
            if k != "status":
                result(f"{name}_{k}", f"{v:.4g}")
    unet.set_attn_processor(AttnProcessor2_0())
    return out


@torch.inference_mode()
def bench_batching(unet, cfg, args, device, dtype) -> dict:
    """Diffusion-classifier scoring of N images: one row per (image, t, class), shared (t, eps)."""
    n, K, T = args.images, args.classes, args.timesteps
    gen = torch.Generator().manual_seed(2)
    s, d = cfg["sample_size"], cfg["cross_attention_dim"]
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    x0 = torch.randn(n, cfg["in_channels"], s, s, generator=gen).to(device, dtype)
    cond = torch.randn(K, TEXT_LEN, d, generator=gen).to(device, dtype)  # cached once per class
    ts = torch.linspace(50, 950, T).long().to(device)  # evenly spaced, shared by all classes
    pair_img = torch.arange(n, device=device).repeat_interleave(T)  # (n*T,) one (t, eps) pair
    pair_t = ts.repeat(n)
    eps = torch.randn(n * T, *x0.shape[1:], generator=gen).to(device, dtype)  # (n*T, C, s, s)
    x_t = sched.add_noise(x0[pair_img], eps, pair_t.cpu()).to(dtype)  # (n*T, C, s, s)
    row_pair = torch.arange(n * T, device=device).repeat_interleave(K)  # rows: (image, t, class)
    row_cls = torch.arange(K, device=device).repeat(n * T)

    def score(rows: torch.Tensor, kernel: bool) -> torch.Tensor:
        p, c = row_pair[rows], row_cls[rows]
        pred = unet(x_t[p], pair_t[p], encoder_hidden_states=cond[c]).sample
        if kernel:
            return denoise_errors(pred, eps, p)
        return (pred.float() - eps[p].float()).square().flatten(1).mean(1)

    R = n * T * K
    every = torch.arange(R, device=device)

    def batched():
        return torch.cat([score(r, True) for r in every.split(args.batch_rows)])

    def per_image():  # one call per image: its T*K rows
        return torch.cat([score(r, False) for r in every.split(T * K)])

    def per_row_one_image():  # the naive classifier: one UNet call per (t, class)
        return torch.cat([score(every[i : i + 1], False) for i in range(T * K)])

    err_b, err_i = batched(), per_image()
    diff = (err_b - err_i).abs().max().item() / err_i.abs().max().item()
    pick_b, pick_i = (e.view(n, T, K).mean(1).argmin(1) for e in (err_b, err_i))
    same = (pick_b == pick_i).float().mean().item()
    t_b = clock(device, batched, 1, args.iters)
    t_i = clock(device, per_image, 1, args.iters)
    t_r = clock(device, per_row_one_image, 1, max(1, args.iters // 2)) * n  # extrapolated to n
    res = {"images": n, "classes": K, "timesteps": T, "rows": R, "batch_rows": args.batch_rows,
           "batched_s": t_b, "per_image_s": t_i, "per_row_s_extrapolated": t_r,
           "speedup_vs_per_image": t_i / t_b, "speedup_vs_per_row": t_r / t_b,
           "rows_per_s": R / t_b, "max_rel_err_diff": diff, "argmin_agreement": same}  # fmt: skip
    print(f"[batching] {n} images x {T} t x {K} classes = {R} rows: batched ({args.batch_rows} rows/call) "
          f"{t_b:.3f} s; one call per image {t_i:.3f} s ({t_i / t_b:.2f}x); one call per row "
          f"~{t_r:.3f} s ({t_r / t_b:.2f}x, extrapolated from 1 image); errors agree to {diff:.1e} "
          f"(relative), argmin agreement {same:.0%}; goal >= 3x")  # fmt: skip
    for k in (
        "batched_s",
        "per_image_s",
        "speedup_vs_per_image",
        "speedup_vs_per_row",
        "rows_per_s",
    ):
        result(f"batching_{k}", f"{res[k]:.4g}")
    return res


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny UNet, small batches (CPU logic check)")
    p.add_argument(
        "--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default bf16 (fp32 on CPU)"
    )
    p.add_argument("--train-batch", type=int, default=None, help="rows per TI step (default 16)")
    p.add_argument(
        "--infer-batch", type=int, default=None, help="rows per inference call (default 128)"
    )
    p.add_argument("--images", type=int, default=None, help="batching test: images (default 32)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--timesteps", type=int, default=4)
    p.add_argument(
        "--batch-rows", type=int, default=None, help="rows per batched call (default 320)"
    )
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="dense bf16 peak (default by GPU name)"
    )
    p.add_argument("--skip-batching", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a busy box)")
    p.add_argument("--json", action="store_true", help="print the results as JSON at the end")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    small = a.tiny or device.type != "cuda"
    a.dtype = a.dtype or ("fp32" if device.type == "cpu" else "bf16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    a.train_batch = a.train_batch or (2 if small else 16)
    a.infer_batch = a.infer_batch or (4 if small else 128)
    a.images = a.images or (4 if small else 32)
    a.classes, a.timesteps = (
        (3, 2) if small and a.classes == 10 and a.timesteps == 4 else (a.classes, a.timesteps)
    )
    a.batch_rows = a.batch_rows or (8 if small else 320)
    a.warmup = a.warmup if a.warmup is not None else (1 if small else 3)
    a.iters = a.iters if a.iters is not None else (2 if small else 5)
    cfg = TINY if a.tiny else SD15
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if a.peak_tflops is None and device.type == "cuda":
        a.peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    print(
        f"device {gpu}, torch {torch.__version__}, {a.dtype}, {'tiny' if a.tiny else 'SD-1.5'} UNet, random weights"
    )
    t0 = time.perf_counter()
    with torch.device(device):  # build in place: no 3.4 GB fp32 copy through host memory
        unet = UNet2DConditionModel(**cfg)
    unet = unet.to(dtype).eval().requires_grad_(False)
    params = sum(q.numel() for q in unet.parameters())
    print(f"built {params / 1e6:.1f} M params in {time.perf_counter() - t0:.1f} s")
    unet.set_attn_processor(AttnProcessor2_0())
    fwd = count_flops(unet, cfg, device, dtype, backward=False)
    train = count_flops(unet, cfg, device, dtype, backward=True)
    flops = {"fwd": fwd, "train": train}
    if not a.tiny:  # the figure the project quotes, against torch's own count
        print(f"FLOP/row: assumed {SD15_GFLOP_PER_ROW:.0f} GFLOP forward (SD-1.5, 64x64); counted "
              f"{fwd / 1e9:.0f} GFLOP forward, {train / 1e9:.0f} GFLOP TI fwd+bwd (input grads only)")  # fmt: skip
        flops = {"fwd": SD15_GFLOP_PER_ROW * 1e9, "train": SD15_GFLOP_PER_ROW * 1e9 * train / fwd}
    else:
        print(
            f"FLOP/row counted: {fwd / 1e9:.3f} GFLOP forward, {train / 1e9:.3f} GFLOP TI fwd+bwd"
        )
    print(
        f"peak assumed: {a.peak_tflops} TFLOP/s dense bf16"
        if a.peak_tflops
        else "peak: unknown (pass --peak-tflops)"
    )
    result("gflop_per_row_counted", f"{fwd / 1e9:.4g}")

    out = {"device": gpu, "dtype": a.dtype, "params": params, "flops_per_row": flops}
    out["backends"] = bench_backends(unet, cfg, a, device, dtype, flops)
    if not a.skip_batching:
        out["batching"] = bench_batching(unet, cfg, a, device, dtype)
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    if a.json:
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
