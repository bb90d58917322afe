"""Speed of kernels.denoise_errors vs eager PyTorch and torch.compile of the naive expression.

    python benchmarks/kernel_speed.py                      # CUDA if present: SD-1.5 rows (4x64x64)
    python benchmarks/kernel_speed.py --device cpu         # small CPU shapes
    python benchmarks/kernel_speed.py --backward --json    # forward+backward, machine-readable

GB/s counts the bytes a perfect kernel reads once: R*N + B*N elements, the (R,) index and the
(R,) fp32 output. "of copy" divides it by this device's own copy bandwidth (read + write of a
large buffer, measured here), i.e. how close the kernel gets to streaming memory.
"""

import argparse
import json
import statistics
import sys
import time
from functools import partial

import torch

from kernels import denoise_errors

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def naive(pred, eps, idx):
    """What the scorer would write without the kernel: gathers a (R, N) copy of eps."""
    return ((pred - eps[idx]) ** 2).flatten(1).mean(1)


def step(fn, pred, eps, idx, backward: bool) -> None:
    out = fn(pred, eps, idx)
    if backward:
        out.sum().backward()
        pred.grad = None


def timer(device: torch.device, warmup: int, iters: int):
    """Returns bench(fn) -> median seconds per call. CUDA: events, L2 flushed before each call."""
    if device.type != "cuda":

        def bench(fn):
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)

        return bench

    flush = torch.empty(256 << 20, dtype=torch.int8, device=device)  # > L2 (50-60 MB on H100/H200)

    def bench(fn):
        for _ in range(warmup):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for s, e in zip(starts, ends, strict=True):
            flush.zero_()  # small rows would otherwise be served from L2
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)) / 1e3

    return bench


def copy_bandwidth(device: torch.device, bench) -> float:
    """GB/s of a device-to-device copy (bytes read + bytes written)."""
    n = (1 << 30) if device.type == "cuda" else (1 << 27)
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    return 2 * n / bench(lambda: dst.copy_(src)) / 1e9


def run(args) -> list[dict]:
    device = torch.device(args.device)
    bench = timer(device, args.warmup, args.iters)
    copy_gbs = copy_bandwidth(device, bench)
    # dynamic=None: specialise on the first shape, go dynamic on a recompile (few compiles in all)
    compiled = None if args.no_compile else torch.compile(naive)
    results = []
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        for R in args.rows:
            B = max(1, R // args.rows_per_image)
            S = tuple(args.shape)
            N = torch.Size(S).numel()
            g = torch.Generator(device=device).manual_seed(0)
            pred = torch.randn(R, *S, device=device, dtype=dtype, generator=g)
            eps = torch.randn(B, *S, device=device, dtype=dtype, generator=g)
            idx = torch.randint(0, B, (R,), device=device, generator=g)
            if args.backward:
                pred.requires_grad_()
            call = partial(step, pred=pred, eps=eps, idx=idx, backward=args.backward)

            row = {"device": str(device), "dtype": dname, "R": R, "B": B, "N": N}
            row["bytes"] = (R + B) * N * pred.element_size() + R * (8 + 4)
            if args.backward:  # forward read + backward read of both + write of grad_pred
                row["bytes"] = 2 * row["bytes"] + R * N * pred.element_size()
            row["kernel_s"] = bench(
                partial(call, denoise_errors)
            )  # a failing kernel is an error: raise
            impls = {"eager": naive} | ({"compile": compiled} if compiled is not None else {})
            for name, fn in impls.items():
                try:
                    row[f"{name}_s"] = bench(partial(call, fn))
                except Exception as exc:  # e.g. inductor without a C++ compiler: report, go on
                    row[f"{name}_s"] = None
                    row[f"{name}_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            t = row["kernel_s"]
            row["kernel_GBps"] = row["bytes"] / t / 1e9
            row["of_copy"] = row["kernel_GBps"] / copy_gbs
            row["vs_eager"] = row["eager_s"] / t if row["eager_s"] else None
            row["vs_compile"] = row.get("compile_s") / t if row.get("compile_s") else None
            row["copy_GBps"] = copy_gbs
            results.append(row)
    return results


def table(results: list[dict]) -> str:
    head = f"{'dtype':5} {'R':>5} {'B':>4} {'N':>6} {'kernel us':>10} {'GB/s':>8} {'of copy':>8} {'eager us':>10} {'x eager':>8} {'compile us':>10} {'x comp':>7}"
    lines = [head, "-" * len(head)]

    def us(v):
        return f"{v * 1e6:10.1f}" if v else f"{'n/a':>10}"

    def x(v, w):
        return f"{v:{w}.2f}" if v else f"{'n/a':>{w}}"

    for r in results:
        lines.append(
            f"{r['dtype']:5} {r['R']:5d} {r['B']:4d} {r['N']:6d} {us(r['kernel_s'])} "
            f"{r['kernel_GBps']:8.1f} {r['of_copy']:8.1%} {us(r['eager_s'])} {x(r['vs_eager'], 8)} "
            f"{us(r.get('compile_s'))} {x(r['vs_compile'], 7)}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--device", default="cuda" if cuda else "cpu", help="cpu or cuda (default: cuda if present)"
    )
    p.add_argument(
        "--dtypes", nargs="+", choices=list(DTYPES), default=None, help="default fp32 bf16"
    )
    p.add_argument(
        "--rows", nargs="+", type=int, default=None, help="values of R (default by device)"
    )
    p.add_argument(
        "--shape",
        nargs="+",
        type=int,
        default=None,
        help="sample shape S (default: 4 64 64 on cuda, 4 32 32 on cpu)",
    )
    p.add_argument(
        "--rows-per-image", type=int, default=40, help="B = R // this (10 classes x 4 t)"
    )
    p.add_argument("--backward", action="store_true", help="time forward + backward (grad of pred)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 = steadier on a busy box)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    p.add_argument("--json-out", default=None, help="also write the JSON list to this file")
    args = p.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dtypes = args.dtypes or ["fp32", "bf16"]
    args.rows = args.rows or ([32, 128, 512, 1024, 2048, 4096] if on_gpu else [8, 32, 128])
    args.shape = args.shape or ([4, 64, 64] if on_gpu else [4, 32, 32])
    args.warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 2)
    args.iters = args.iters if args.iters is not None else (50 if on_gpu else 10)
    results = run(args)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=1)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        name = (
            torch.cuda.get_device_name() if on_gpu else f"cpu ({torch.get_num_threads()} threads)"
        )
        mode = "forward+backward" if args.backward else "forward"
        print(f"denoise_errors {mode} on {name}, torch {torch.__version__}; copy bandwidth "
              f"{results[0]['copy_GBps']:.1f} GB/s (read+write)")  # fmt: skip
        print(table(results))
        for r in results:
            for k in ("kernel_error", "eager_error", "compile_error"):
                if k in r:
                    print(f"  {r['dtype']} R={r['R']}: {k}: {r[k]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
