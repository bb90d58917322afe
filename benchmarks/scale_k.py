"""Classification cost against the number of classes K (issue 13, item 3), side by side in one run.

For each K: `mcti synth` data (seed 0, --shots train images per class and enough test images for
about --test-images in all, at least one per class), tokens from `mcti train --reg clip --flip 0
--steps max(--min-steps, --steps-per-class x K)` (or a token set given with --tokens K=DIR), then
on the same test images:
- clip, fused: every test image (a matrix product against K text / cache features);
- the references a user would pick instead: nearest class mean and a linear probe on the same
  model's CLIP image features of the same shots (mcti.eval.baselines);
- hybrid (clip top --hybrid-m, then diffusion), diffusion as configured by default (the clip
  prefilter to --prefilter-m once K exceeds it), on --unet-images test images spread over the
  classes; the full diffusion schedule (--prefilter-m 0, K x n_samples rows per image) once K
  exceeds --prefilter-m (at K <= m it is the default), on --full-images of them
  (--full-images-large above --full-max-k).
Per scorer: top-1 accuracy, wall and CPU s/image (--batch images per call, one thread), UNet
rows/image and the peak memory while scoring (resident set; allocated GPU memory on CUDA), and
the clip top-m recall of the prefilters. Writes --out/scale_k.json and --out/scale_k.png after
each K; a later run into the same --out keeps the other K's results.

    python benchmarks/scale_k.py --classes 10,100,1000 --out runs/scale_k
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from mcti.atomic import atomic_write_json
from mcti.core.fused import has_fused, load_fused
from mcti.core.model import load_model
from mcti.core.scoring import Classifier, Scores
from mcti.core.store import load_tokens
from mcti.data.folders import load_images, scan_folder
from mcti.data.synth import write_synth
from mcti.eval.baselines import linear_probe, nearest_class_mean
from mcti.settings import ScorerSettings

UNET_SCORERS = ("hybrid", "diffusion", "diffusion (full)")


def peak_rss_reset() -> None:
    """Reset the kernel's high-water mark of this process's resident set (VmHWM)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_data(root: Path, k: int, shots: int, test_images: int, seed: int) -> Path:
    """root/k<K>/{train,test}: `mcti synth` data, written once (same seed, same bytes)."""
    out = root / f"k{k}"
    if not (out / "test").is_dir():
        tmp = root / f".k{k}.tmp"
        test_per_class = max(1, math.ceil(test_images / k))
        write_synth(tmp, k, shots + test_per_class, shots, seed, size=32)
        tmp.rename(out)
    return out


def train_steps(k: int, a: argparse.Namespace) -> int:
    return max(a.min_steps, a.steps_per_class * k)


def train_tokens(data: Path, out: Path, k: int, a: argparse.Namespace) -> dict:
    """`mcti train --reg clip --flip 0` in a subprocess (one thread); its wall and CPU time. A
    run that fails after writing the tokens (e.g. fitting the fused state) is recorded, not fatal."""
    if (out / "learned_embeds.safetensors").is_file():
        return {"steps": train_steps(k, a), "reused": str(out)}
    cmd = [sys.executable, "-m", "mcti", "train", "--data", str(data / "train"), "--out", str(out)]
    cmd += ["--model", a.model, "--reg", "clip", "--flip", "0", "--shots", str(a.shots)]
    cmd += ["--steps", str(train_steps(k, a)), "--seed", str(a.seed), "--device", a.device]
    cmd += ["--quiet"]
    path = os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    t0, c0 = time.perf_counter(), os.times()
    done = subprocess.run(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    c1 = os.times()
    if done.returncode and not (out / "learned_embeds.safetensors").is_file():
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return {
        "error": done.stderr.strip().splitlines()[-1] if done.returncode else None,
        "steps": train_steps(k, a),
        "command": " ".join(["mcti"] + cmd[3:]),
        "wall_s": round(time.perf_counter() - t0, 1),
        "cpu_s": round(
            c1.children_user + c1.children_system - c0.children_user - c0.children_system, 1
        ),
    }


def spread(n_total: int, n: int) -> list[int]:
    """n indices spread evenly over range(n_total) (test images are in class order)."""
    n = min(n, n_total)
    return [round(j * n_total / n) for j in range(n)]


def timed_scores(
    clf: Classifier, pixels: torch.Tensor, batch: int
) -> tuple[Scores, tuple[float, float], float]:
    """Scores of all images (`batch` per call), (wall, CPU) seconds, and the peak memory (MB):
    resident on CPU, allocated on CUDA."""
    cuda = clf.bundle.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(clf.bundle.device)
    peak_rss_reset()
    t0, c0, parts = time.perf_counter(), time.process_time(), []
    for i in range(0, len(pixels), batch):
        parts.append(clf.score(pixels[i : i + batch]))
    sec = (time.perf_counter() - t0, time.process_time() - c0)
    scores = Scores(
        torch.cat([p.scores for p in parts]),
        torch.cat([p.stage for p in parts]),
        sum(p.unet_rows for p in parts),
    )
    peak = torch.cuda.max_memory_allocated(clf.bundle.device) / 2**20 if cuda else peak_rss_mb()
    return scores, sec, peak


def measure_k(bundle, k: int, a: argparse.Namespace, given_tokens: dict[int, str]) -> dict:
    root = Path(a.out)
    data = make_data(root / "data", k, a.shots, a.test_images, a.seed)
    tok_dir = Path(given_tokens.get(k) or root / "tokens" / f"k{k}")
    training = (
        train_tokens(data, tok_dir, k, a) if k not in given_tokens else {"given": str(tok_dir)}
    )
    tokens, table, labels, meta = load_tokens(tok_dir, bundle)
    train, test = scan_folder(data / "train", quiet=True), scan_folder(data / "test", quiet=True)
    assert train.classes == test.classes == labels, "token classes differ from the data's"
    x_train, _ = load_images(train, list(range(len(train))), bundle.resolution, quiet=True)
    x_test, _ = load_images(test, list(range(len(test))), bundle.resolution, quiet=True)
    y_train, y_test = torch.tensor(train.labels), torch.tensor(test.labels)
    subset = spread(len(test), a.unet_images)
    print(f"K={k}: {len(x_test)} test images, {len(subset)} for the UNet scorers", flush=True)

    res: dict = {"classes": k, "test_images": len(x_test), "training": training, "scorers": {}}
    res["prefilter_m"], res["hybrid_m"] = a.prefilter_m, a.hybrid_m
    settings = ScorerSettings(hybrid_m=a.hybrid_m, prefilter_m=a.prefilter_m, seed=a.seed)
    fused = load_fused(tok_dir, k) if has_fused(tok_dir) else None  # a given set may lack it

    def record(name: str, pred: torch.Tensor, truth: torch.Tensor, sec, rows: int, peak):
        n = len(truth)
        res["scorers"][name] = {
            "accuracy": round(float((pred == truth).float().mean()), 4),
            "images": n,
            "s_per_image": round(sec[0] / n, 5),  # wall clock, on a shared machine
            "cpu_s_per_image": round(sec[1] / n, 5),  # CPU of this process (one thread)
            "unet_rows_per_image": round(rows / n, 1),
            # CPU: the process's peak resident set; CUDA: peak allocated GPU memory
            "peak_cuda_mb" if a.device.startswith("cuda") else "peak_rss_mb": (
                None if peak is None else round(peak, 1)
            ),
        }
        print(f"  {name:18} {json.dumps(res['scorers'][name])}", flush=True)

    # the cheap scorers and references on every test image, and on the UNet subset
    if fused is None:
        res["scorers_missing"] = {"fused": f"no fused state in {tok_dir} (see training.error)"}
    for name in ("clip", "fused") if fused is not None else ("clip",):
        clf = Classifier.from_settings(bundle, tokens, table, settings, name, fused)
        s, sec, peak = timed_scores(clf, x_test, a.batch)
        top1 = s.ranking()[:, 0]
        record(name, top1, y_test, sec, 0, peak)
        res["scorers"][name]["accuracy_unet_subset"] = round(
            float((top1[subset] == y_test[subset]).float().mean()), 4
        )
        if name == "clip":  # how often the prefilters keep the true class
            rank = (s.ranking() == y_test.view(-1, 1)).float().argmax(1)
            res["clip_top_m_recall"] = {
                m: round(float((rank < m).float().mean()), 4)
                for m in sorted({a.hybrid_m, a.prefilter_m, 50})
            }

    def clock() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def since(t: tuple[float, float]) -> tuple[float, float]:
        return time.perf_counter() - t[0], time.process_time() - t[1]

    t = clock()
    f_train = bundle.clip_image_features(x_train).float().cpu()
    f_test = bundle.clip_image_features(x_test).float().cpu()
    t_feat = since(t)
    t = clock()
    ncm = nearest_class_mean(f_train, y_train, f_test, k)
    t_ncm = since(t)
    record(
        "nearest class mean",
        ncm,
        y_test,
        [f + g for f, g in zip(t_feat, t_ncm, strict=True)],
        0,
        None,
    )
    if k <= a.probe_max_k:
        t = clock()
        probe = linear_probe(f_train, y_train, f_test)
        res["linear_probe_fit_cpu_s"] = round(since(t)[1], 1)
        record("linear probe", probe, y_test, t_feat, 0, None)  # s/image: the features
    for name, pred in [("nearest class mean", ncm)] + (
        [("linear probe", probe)] if k <= a.probe_max_k else []
    ):
        res["scorers"][name]["accuracy_unet_subset"] = round(
            float((pred[subset] == y_test[subset]).float().mean()), 4
        )

    for name in UNET_SCORERS:
        if name == "diffusion (full)" and k <= a.prefilter_m:
            continue  # the default runs the full schedule at K <= m
        n = len(subset)
        if name == "diffusion (full)":  # K x n_samples rows per image: a few images only
            n = a.full_images if k <= a.full_max_k else a.full_images_large
        idx = subset[:: max(1, len(subset) // n)][:n]
        scorer = "diffusion" if name.startswith("diffusion") else name
        cfg = settings if name != "diffusion (full)" else ScorerSettings(prefilter_m=0, seed=a.seed)
        clf = Classifier.from_settings(bundle, tokens, table, cfg, scorer)
        s, sec, peak = timed_scores(clf, x_test[idx], a.batch)
        record(name, s.ranking()[:, 0], y_test[idx], sec, s.unet_rows, peak)
    res["token_state_mb"] = round(
        tokens.class_conditioning(table).numel() * 4 / 2**20, 2
    )  # the (K, L, d) fp32 UNet conditioning each diffusion classifier holds
    return res


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def scorer(r: dict, name: str) -> dict | None:
        if name == "diffusion (full)" and r["classes"] <= r.get("prefilter_m", 20):
            return r["scorers"].get("diffusion")  # K <= m: the default is the full schedule
        return r["scorers"].get(name)

    ks = [r["classes"] for r in results]
    names = list(dict.fromkeys(n for r in results for n in r["scorers"]))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for i, name in enumerate(names):
        pts = [(r["classes"], scorer(r, name)) for r in results if scorer(r, name)]
        x, kw = [p[0] for p in pts], {"label": name, "color": f"C{i}"}
        ref = name in ("nearest class mean", "linear probe")
        axes[0].plot(x, [p[1]["accuracy"] for p in pts], "--" if ref else "-o", **kw)
        if not ref:
            axes[1].plot(x, [p[1]["cpu_s_per_image"] for p in pts], "-o", **kw)
        if any(p[1]["unet_rows_per_image"] for p in pts):
            axes[2].plot(x, [p[1]["unet_rows_per_image"] for p in pts], "-o", **kw)
    for ax, title in zip(
        axes, ("top-1 accuracy", "CPU s / image (1 thread)", "UNet rows / image"), strict=True
    ):
        ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("classes K")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].set_ylim(-0.02, 1.02)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9)
    fig.suptitle("mcti synth (seed 0, 5 shots), embedded model, tokens: mcti train --reg clip")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--classes", default="10,100,1000", help="comma-separated K values")
    p.add_argument("--out", required=True, help="folder: data/, tokens/, scale_k.json, scale_k.png")
    p.add_argument("--model", default="embedded")
    p.add_argument("--device", default="cpu", help="cpu or cuda (benchmarks/gpu_check.sh)")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--test-images", type=int, default=400, help="about this many test images per K")
    p.add_argument("--unet-images", type=int, default=40, help="test images for the UNet scorers")
    p.add_argument("--full-images", type=int, default=8, help="full diffusion: images")
    p.add_argument("--full-images-large", type=int, default=2, help="... above --full-max-k")
    p.add_argument("--full-max-k", type=int, default=100)
    p.add_argument("--hybrid-m", type=int, default=ScorerSettings.hybrid_m)
    p.add_argument("--prefilter-m", type=int, default=ScorerSettings.prefilter_m)
    p.add_argument(
        "--min-steps", type=int, default=200, help="training steps: max(this, per-class x K)"
    )
    p.add_argument("--steps-per-class", type=int, default=2)
    p.add_argument("--tokens", action="append", default=[], help="K=DIR: use this token set for K")
    p.add_argument("--batch", type=int, default=8, help="images per score call")
    p.add_argument("--probe-max-k", type=int, default=1000, help="no linear probe above this K")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replot", action="store_true", help="only redraw --out/scale_k.png")
    a = p.parse_args()
    if a.replot:
        plot(
            json.loads((Path(a.out) / "scale_k.json").read_text())["results"],
            Path(a.out) / "scale_k.png",
        )
        return
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    given = {int(t.split("=", 1)[0]): t.split("=", 1)[1] for t in a.tokens}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = load_model(a.model, device=a.device)
    # results of other K from an earlier run into the same --out are kept (e.g. --classes 1000
    # rerun alone); the K of this run are measured again
    ks = [int(x) for x in a.classes.split(",")]
    previous = out / "scale_k.json"
    results = [
        r
        for r in (json.loads(previous.read_text())["results"] if previous.is_file() else [])
        if r["classes"] not in ks
    ]
    for k in ks:
        results.append({**measure_k(bundle, k, a, given), "argv": sys.argv[1:]})
        results.sort(key=lambda r: r["classes"])  # any run order (e.g. the largest K first)
        summary = {"date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:], "results": results}
        atomic_write_json(out / "scale_k.json", summary)  # after each K: a partial run still counts
        plot(results, out / "scale_k.png")
    base = results[0]
    print(
        "\n| scorer | "
        + " | ".join(f"K={r['classes']}" for r in results)
        + f" | s/image, K={results[-1]['classes']} vs K={base['classes']} |"
    )
    print(f"|---|{'---|' * len(results)}---|")
    for name in base["scorers"]:
        cells = []
        for r in results:
            s = r["scorers"].get(name)
            cells.append(
                "-"
                if s is None
                else f"{s['accuracy']:.1%} ({s['images']}), {s['cpu_s_per_image']:.4g} s, "
                f"{s['unet_rows_per_image']:g} rows"
            )
        last = results[-1]["scorers"].get(name)
        ratio = last and last["cpu_s_per_image"] / base["scorers"][name]["cpu_s_per_image"]
        print(f"| {name} | {' | '.join(cells)} | {f'{ratio:.2f}x' if ratio else '-'} |")


if __name__ == "__main__":
    main()
