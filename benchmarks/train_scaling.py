"""Data-parallel training throughput and its cost in the number of classes K.

    python benchmarks/train_scaling.py                      # CPU: scaling 1 -> 2 processes, K sweep
    python benchmarks/train_scaling.py --only k --ks 10,2000
    python benchmarks/train_scaling.py --only sd --device cuda --nproc 1   # needs a GPU

Sections (each a real `python -m training` run; numbers come from its metrics.jsonl):
- scaling: samples/s of the tiny model at 1 process (1 and 2 threads) and 2 processes x 1 thread
  (torchrun, gloo); efficiency = samples/s(2 processes) / (2 x samples/s(1 process, 1 thread)).
- k: K = 10 vs K = 2000 classes at 1 process (1 shot per class, or --k-images in total for every
  K): median step time, peak RSS at start-up and at the end, and the sizes that may grow with K
  (token table, latent cache).
- sd: an SD-1.5-shaped model with random weights (UNet 860M, CLIP-L text encoder, SD VAE, 512 px)
  in bf16 through DeepSpeed (zero1_bf16), samples/s per GPU. Built once into --sd-dir.
Step times skip the first --warmup steps (allocator and cache warm-up). On a shared machine the
wall-clock numbers follow the other jobs' load; the per-step CPU time (`step_cpu_ms`, rank 0)
does not, so the K comparison and `cpu_efficiency` hold up under load.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def make_folder(root: Path, classes: int, shots: int, size: int, seed: int = 0) -> Path:
    """root/c-XXXXX/iN.png: a random coloured square per class on noise."""
    rng = np.random.default_rng(seed)
    for k in range(classes):
        d = root / f"c-{k:05d}"
        d.mkdir(parents=True, exist_ok=True)
        colour = rng.integers(0, 256, 3)
        for i in range(shots):
            a = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
            a[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = colour
            Image.fromarray(a).save(d / f"i{i}.png")
    return root


def run(nproc: int, threads: int, flags: list[str], out: Path, timeout: int = 3600) -> dict:
    """One training run; returns wall time, per-step records and the run's trainer metadata."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = str(threads)
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += [f"--nproc-per-node={nproc}", "-m", "training"]
    else:
        cmd = [sys.executable, "-m", "training"]
    t0 = time.perf_counter()
    p = subprocess.run(
        cmd + flags + ["--out", str(out), "--quiet"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    wall = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"training failed ({' '.join(cmd)}):\n{p.stderr[-3000:]}")
    recs = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    meta = json.loads((out / "classes.json").read_text())["trainer"]
    return {"wall_s": wall, "records": recs, "meta": meta}


def summarize(r: dict, warmup: int) -> dict:
    recs = r["records"][warmup:] or r["records"]
    step = statistics.median(x["step_s"] for x in recs)
    cpu = statistics.median(x["step_cpu_s"] for x in recs)
    return {
        "samples_per_s": round(statistics.median(x["samples_per_s"] for x in recs), 2),
        "step_ms": round(1000 * step, 1),
        "step_cpu_ms": round(1000 * cpu, 1),  # rank 0's CPU time per step
        "startup_s": r["meta"]["startup_s"],
        "wall_s": round(r["wall_s"], 1),
        "startup_peak_mb": r["meta"]["startup_peak_mem_mb"],
        "peak_mb": round(r["records"][-1]["peak_mem_mb"], 1),
    }


def bench_scaling(a, tmp: Path) -> dict:
    data = make_folder(tmp / "scaling", a.classes, a.shots, 32)
    flags = ["--data", str(data), "--steps", str(a.steps), "--batch-size", str(a.batch_size)]
    flags += ["--shots", str(a.shots), "--save-every", str(10**6), "--device", "cpu"]
    rows = {}
    for name, nproc, threads in (("1 proc x 1 thread", 1, 1), ("1 proc x 2 threads", 1, 2),
                                 ("2 procs x 1 thread", 2, 1)):  # fmt: skip
        rows[name] = summarize(run(nproc, threads, flags, tmp / f"s{nproc}{threads}"), a.warmup)
        print(f"  {name:<20} {rows[name]}", flush=True)
    one, two = rows["1 proc x 1 thread"], rows["2 procs x 1 thread"]
    best1 = max(one["samples_per_s"], rows["1 proc x 2 threads"]["samples_per_s"])
    return {
        "rows": rows,
        # wall clock: what a user gets, on this machine at this load
        "efficiency": round(two["samples_per_s"] / (2 * one["samples_per_s"]), 3),
        "speedup_vs_best_1proc": round(two["samples_per_s"] / best1, 3),
        # CPU time: each rank should need half the work of one process (1.0 = no overhead);
        # it is what the wall-clock efficiency would be on 2 idle cores, less communication waits
        "cpu_efficiency": round(one["step_cpu_ms"] / (2 * two["step_cpu_ms"]), 3),
    }


def bench_k(a, tmp: Path) -> dict:
    rows = {}
    for K in [int(k) for k in a.ks.split(",")]:
        shots = max(1, a.k_images // K)  # --k-images: the same images for every K
        data = make_folder(tmp / f"k{K}", K, shots, 32)
        flags = ["--data", str(data), "--steps", str(a.steps), "--batch-size", str(a.batch_size)]
        flags += ["--shots", str(shots), "--save-every", str(10**6), "--device", "cpu"]
        flags += ["--hard-negatives"] if a.hard else []
        r = run(1, 1, flags, tmp / f"ko{K}")
        d, n = 32, K * shots  # tiny model: width 32, 1 vector per class; latents 4 x 16 x 16
        rows[K] = {
            **summarize(r, a.warmup),
            "images": n,
            "table_kb": round(K * d * 4 / 1024, 1),
            "latent_cache_kb": round(2 * n * 4 * 16 * 16 * 4 / 1024, 1),
            "negatives": r["records"][-1]["negatives"],
        }
        print(f"  K={K:<6} {rows[K]}", flush=True)
    return rows


def build_sd15_shaped(out: Path, resolution: int) -> None:
    """Random weights in SD 1.5's shapes (diffusers' defaults are SD 1.x's UNet)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from mcti.core.model import save_model
    from mcti.core.tokenizer import build_clip_tokenizer
    from mcti.core.tokens import TEMPLATES

    torch.manual_seed(0)
    words = sorted({w for t in TEMPLATES for w in t.replace("{}", "").split()} | {"object"})
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            projection_dim=768,
        )  # fmt: skip
    )
    unet = UNet2DConditionModel(sample_size=resolution // 8, cross_attention_dim=768)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=resolution,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )  # fmt: skip
    sched = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )
    parts = dict(tokenizer=build_clip_tokenizer(words), text_encoder=text, unet=unet, vae=vae)
    save_model({**parts, "scheduler": sched, "clip": None}, out)
    n = sum(p.numel() for p in unet.parameters())
    print(f"  built an SD-1.5-shaped model in {out} (UNet {n / 1e6:.0f}M parameters)", flush=True)


def bench_sd(a, tmp: Path) -> dict:
    sd_dir = Path(a.sd_dir or tmp / "sd15")
    if not (sd_dir / "model_index.json").is_file():
        build_sd15_shaped(sd_dir, a.sd_resolution)
    data = make_folder(tmp / "sd_data", 10, 5, a.sd_resolution)
    batch = a.sd_micro_batch * a.nproc
    flags = ["--data", str(data), "--model", str(sd_dir), "--steps", str(a.sd_steps)]
    flags += ["--batch-size", str(batch), "--device", a.device, "--save-every", str(10**6)]
    if a.device.startswith("cuda"):
        flags += ["--deepspeed-config", "zero1_bf16"]
    r = run(a.nproc, int(os.environ.get("OMP_NUM_THREADS", "4")), flags, tmp / "sd_out")
    s = summarize(r, min(a.warmup, a.sd_steps - 1))
    s["samples_per_s_per_device"] = round(s["samples_per_s"] / a.nproc, 2)
    s["precision"] = r["meta"]["model_precision"]
    print(f"  SD-1.5-shaped x{a.nproc} ({a.device}): {s}", flush=True)
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["scaling", "k", "sd"], help="run one section")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda for the sd section")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="first steps left out of the medians")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--classes", type=int, default=10, help="scaling section: classes")
    ap.add_argument("--shots", type=int, default=5, help="scaling section: shots per class")
    ap.add_argument("--ks", default="10,2000", help="k section: class counts")
    ap.add_argument("--hard", action="store_true", help="k section: with --hard-negatives")
    ap.add_argument(
        "--k-images", type=int, default=0, help="k section: total images (0: 1 shot per class)"
    )
    ap.add_argument("--nproc", type=int, default=1, help="sd section: processes (GPUs)")
    ap.add_argument("--sd-dir", help="sd section: where the built model is kept between runs")
    ap.add_argument("--sd-resolution", type=int, default=512)
    ap.add_argument("--sd-micro-batch", type=int, default=4, help="sd section: images per GPU")
    ap.add_argument("--sd-steps", type=int, default=10)
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    sections = [a.only] if a.only else ["scaling", "k"] + (["sd"] if a.device != "cpu" else [])
    results = {"cpu_count": os.cpu_count(), "load_avg_at_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="train_scaling_") as tmp:
        for name in sections:
            print(f"{name}:", flush=True)
            fn = {"scaling": bench_scaling, "k": bench_k, "sd": bench_sd}[name]
            results[name] = fn(a, Path(tmp))
    results["load_avg_at_end"] = os.getloadavg()
    print(json.dumps(results, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
