"""Train K = 100 / 1000 classes in one DeepSpeed job, and what it costs; accuracy against steps.

    python benchmarks/train_k.py train --data synth1000/train --out runs/k1000 --steps 1600 \
        --save-every 100 [--hard-negatives] [--kill-at 250 [--kill-one]]
    python benchmarks/train_k.py eval --data synth1000 --runs runs/k1000 runs/k1000-hard
    python benchmarks/train_k.py compare runs/k1000/snapshots/step-000400 runs/resumed

`train` runs `mcti train --nproc N --method mcti --reg clip --flip 0` (one thread per rank) and,
while it runs, copies every token export (`--save-every`) to OUT/snapshots/step-NNNNNN/ and
reads each rank's peak resident set (VmHWM). With --kill-at S it SIGKILLs the ranks (all, or
rank 1 alone with --kill-one) once step S is logged, then reruns the command with --resume and
times the resume (launch to its first step). It writes OUT/bench.json: wall and CPU time
(every process of the job), samples/s of the steps, peak RSS per rank, checkpoint size.

`eval` scores each snapshot of the runs on a fixed test subset (the first --per-class test
images of every class, sorted by name) with the clip scorer (the tokens' CLIP text features)
and the fused scorer (mcti.core.fused, fitted on the run's shots as `mcti train` fits it), next
to what a user would pick instead on the same model's CLIP image features of the same shots:
nearest class mean and a linear probe (mcti.eval.baselines).

`compare` prints the largest difference between two token directories (resume == no kill?).
"""

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: `benchmarks.common`

from benchmarks.common import descendants  # noqa: E402


def rank_pids(root: int) -> list[int]:
    """The `python -m training` processes (the ranks) under `root`, by rank order of start."""
    ranks = []
    for pid in descendants(root):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"training" in cmd and b"-m" in cmd and b"torch.distributed.run" not in cmd:
            ranks.append(pid)
    return sorted(ranks)


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def last_step(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = path.read_text().strip().splitlines()
    try:
        return json.loads(lines[-1])["step"] if lines else 0
    except (json.JSONDecodeError, KeyError):
        return 0  # a line being written


def snapshot(out: Path, seen: set[int]) -> None:
    """Copy the token export if it is a step not copied yet (classes.json is written last)."""
    try:
        meta = json.loads((out / "classes.json").read_bytes())
        step = int(meta["steps"])
    except (OSError, json.JSONDecodeError, KeyError, ValueError):
        return
    if step in seen:
        return
    dest = out / "snapshots" / f"step-{step:06d}"
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("learned_embeds.safetensors", "classes.json"):
        shutil.copy2(out / name, tmp / name)
    if json.loads((out / "classes.json").read_bytes()).get("steps") != step:
        return  # a newer export landed while copying: take that one next time
    tmp.rename(dest)
    seen.add(step)


def launch(
    cmd: list[str],
    out: Path,
    seen: set[int],
    peaks: dict,
    kill_at: int = 0,
    kill_one: bool = False,
    start_step: int | None = None,
) -> dict:
    """Run the job, snapshot its exports, track each rank's peak RSS; SIGKILL at kill_at.
    `first_step_s`: launch to the first step after `start_step` (default: the last logged)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    t0, t_wall, first_step_s, killed = time.perf_counter(), time.time(), None, False
    start_step = last_step(out) if start_step is None else start_step
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    while proc.poll() is None:
        pids = rank_pids(proc.pid)
        for i, pid in enumerate(pids):
            mb = peak_rss_mb(pid)
            if mb is not None:
                peaks[f"rank{i}"] = max(peaks.get(f"rank{i}", 0.0), mb)
        step = last_step(out)
        fresh = (out / "metrics.jsonl").is_file() and (
            out / "metrics.jsonl"
        ).stat().st_mtime > t_wall
        if first_step_s is None and fresh and step > start_step:  # not the killed run's lines
            first_step_s = time.perf_counter() - t0
        snapshot(out, seen)
        if kill_at and not killed and step >= kill_at and pids:
            for pid in pids[1:] if kill_one else pids:
                os.kill(pid, signal.SIGKILL)
            killed = True
        time.sleep(0.2)
    snapshot(out, seen)
    return {
        "rc": proc.returncode,
        "wall_s": time.perf_counter() - t0,
        "first_step_s": first_step_s,
        "killed_at_step": last_step(out) if killed else None,
    }


def dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def cmd_train(a: argparse.Namespace) -> None:
    out = Path(a.out)
    settings = {"--nproc": a.nproc, "--data": a.data, "--out": out, "--steps": a.steps,
                "--save-every": a.save_every, "--batch-size": a.batch_size, "--lr": a.lr,
                "--negatives": a.negatives, "--gamma": a.gamma, "--seed": a.seed}  # fmt: skip
    cmd = [sys.executable, "-m", "mcti", "train", "--method", "mcti", "--reg", "clip"]
    cmd += ["--flip", "0", "--quiet"] + [str(x) for kv in settings.items() for x in kv]
    cmd += ["--hard-negatives"] if a.hard_negatives else []
    seen: set[int] = set()
    peaks: dict[str, float] = {}
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    runs = [launch(cmd, out, seen, peaks, a.kill_at, a.kill_one)]
    if a.kill_at:
        latest = (out / "checkpoint" / "latest").read_text().strip()
        ckpt = out / "checkpoint" / latest
        runs[0]["checkpoint"] = {"tag": latest, "mb": round(dir_mb(ckpt), 2)}
        # the resumed run redoes the steps after its checkpoint: it starts at the checkpoint
        runs.append(launch(cmd + ["--resume"], out, seen, peaks, start_step=int(latest[5:])))
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    meta = json.loads((out / "classes.json").read_bytes())
    step_s = sorted(x["step_s"] for x in lines)
    result = {
        "command": " ".join(cmd[2:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "K": lines[-1]["K"],
        "steps": lines[-1]["step"],
        "batch_size": a.batch_size,
        "runs": runs,
        "wall_s": round(sum(r["wall_s"] for r in runs), 1),
        "cpu_s": round(cpu, 1),
        "startup_s": meta.get("trainer", {}).get("startup_s"),
        "steps_wall_s": round(sum(step_s), 1),
        "samples_per_s": round(a.batch_size * len(step_s) / sum(step_s), 2),
        "median_step_s": step_s[len(step_s) // 2],
        "peak_rss_mb": {k: round(v, 1) for k, v in sorted(peaks.items())},
        "checkpoint_mb": round(dir_mb(out / "checkpoint" / meta_tag(out)), 2),
        "tokens_mb": round((out / "learned_embeds.safetensors").stat().st_size / 2**20, 2),
        "snapshots": sorted(seen),
        "load_average": os.getloadavg(),
    }
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "snapshots"}, indent=1))


def meta_tag(out: Path) -> str:
    return (out / "checkpoint" / "latest").read_text().strip()


def token_matrix(path: Path) -> torch.Tensor:
    """(K, n * d) tokens of a token directory, in class order."""
    meta = json.loads((path / "classes.json").read_bytes())
    sd = load_file(str(path / "learned_embeds.safetensors"))
    return torch.stack([sd[tok].flatten() for tok in meta["classes"].values()])


def cmd_compare(a: argparse.Namespace) -> None:
    x, y = token_matrix(Path(a.a)), token_matrix(Path(a.b))
    diff = (x - y).abs().max().item()
    print(json.dumps({"a": a.a, "b": a.b, "max_abs_diff": diff, "bit_identical": diff == 0.0}))


def test_subset(data: Path, per_class: int) -> tuple[list[Path], list[str]]:
    """The first `per_class` test images of every class, sorted (the same for every run)."""
    paths, labels = [], []
    for d in sorted(p for p in (data / "test").iterdir() if p.is_dir()):
        for f in sorted(d.iterdir())[:per_class]:
            paths.append(f)
            labels.append(d.name)
    return paths, labels


def cmd_eval(a: argparse.Namespace) -> None:
    from mcti.core.fused import fit_for_tokens
    from mcti.core.model import load_model
    from mcti.core.store import load_tokens
    from mcti.data.images import load_image
    from mcti.eval.baselines import linear_probe, nearest_class_mean

    sys.path.insert(0, str(REPO / "benchmarks"))
    from synth_separability import logistic

    torch.set_num_threads(a.threads)
    bundle = load_model("embedded", "cpu")
    data = Path(a.data)

    def pixels(paths: list[Path]) -> torch.Tensor:  # (N, 3, H, W)
        return torch.stack([load_image(p, bundle.resolution) for p in paths])

    def feats(x: torch.Tensor) -> torch.Tensor:  # (N, P)
        with torch.no_grad():
            return torch.cat(
                [bundle.clip_image_features(x[i : i + 512]) for i in range(0, len(x), 512)]
            )

    test_paths, test_labels = test_subset(data, a.per_class)
    test_f = feats(pixels(test_paths))
    report = {
        "data": str(data),
        "per_class": a.per_class,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "runs": {},
    }
    for run in map(Path, a.runs):
        snaps = sorted((run / "snapshots").glob("step-*"))
        last = json.loads((snaps[-1] / "classes.json").read_bytes())
        labels = list(last["classes"])
        index = {label: k for k, label in enumerate(labels)}
        y = torch.tensor([index[label] for label in test_labels])
        shot_paths = [Path(last["data_root"]) / f for f in last["train_files"]]
        shot_y = torch.tensor([index[p.parent.name] for p in shot_paths])
        shot_px = pixels(shot_paths)
        shot_f = feats(shot_px)
        t0 = time.perf_counter()
        rows = {
            "nearest class mean": acc(nearest_class_mean(shot_f, shot_y, test_f, len(labels)), y),
            "linear probe": acc(linear_probe(shot_f, shot_y, test_f), y),
            # benchmarks/synth_separability.py's probe: standardised features, C = 1
            "linear probe, standardised": acc(
                torch.from_numpy(logistic(shot_f.numpy(), shot_y.numpy(), test_f.numpy())), y
            ),
        }
        probe_s = time.perf_counter() - t0
        steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        batch = last["settings"]["batch_size"]
        curve, prev = [], 0
        for snap in snaps:
            tokens, table, _, meta = load_tokens(snap, bundle)
            with torch.no_grad():
                text = tokens.clip_text_features(
                    table, [tokens.prompt(k) for k in range(len(labels))]
                )
                cos = test_f @ text.T  # (M, K)
                fused = fit_for_tokens(bundle, tokens, table, shot_px, shot_y)
                fused_pred = fused.logits(test_f, cos).argmax(1)
                cache_pred = fused.cache_logp(test_f).argmax(1)  # the fused scorer without tokens
            window = [x for x in steps if prev < x["step"] <= meta["steps"]]  # since the last one
            prev = meta["steps"]
            curve.append(
                {
                    "step": meta["steps"],
                    "visits_per_class": round(meta["steps"] * batch / len(labels), 1),
                    "clip": acc(cos.argmax(1), y),
                    "fused": acc(fused_pred, y),
                    "cache_only": acc(cache_pred, y),
                    "fused_w_tokens": round(fused.params.w_tokens, 3),
                    "clip_on_shots": round(fused.params.evidence["tokens_shot_acc"], 4),
                    "train_ce": round(sum(x["ce"] for x in window) / len(window), 4),
                    "train_disc_acc": round(sum(x["disc_acc"] for x in window) / len(window), 4),
                }
            )
            print(run.name, curve[-1], flush=True)
        report["runs"][run.name] = {
            "K": len(labels),
            "test_images": len(y),
            "baselines": rows,
            "probe_fit_s": round(probe_s, 1),
            "curve": curve,
        }
    text = json.dumps(report, indent=1)
    if a.json:
        Path(a.json).write_text(text)
    print(text)


def acc(pred: torch.Tensor, y: torch.Tensor) -> float:
    return round(float((pred.cpu() == y).float().mean()), 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="one mcti train --nproc N job, measured")
    t.add_argument("--data", required=True, help="DIR/train of `mcti synth`")
    t.add_argument("--out", required=True)
    t.add_argument("--nproc", type=int, default=2)
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--save-every", type=int, default=100)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=5e-3)
    t.add_argument("--negatives", type=int, default=4)
    t.add_argument("--gamma", type=float, default=0.1, help="weight of the clip term")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--hard-negatives", action="store_true")
    t.add_argument("--kill-at", type=int, default=0, help="SIGKILL the ranks at this step, resume")
    t.add_argument("--kill-one", action="store_true", help="--kill-at: kill rank 1 only")
    e = sub.add_parser("eval", help="accuracy of every snapshot of the runs, and the baselines")
    e.add_argument("--data", required=True, help="DIR of `mcti synth` (DIR/test is read)")
    e.add_argument("--runs", nargs="+", required=True)
    e.add_argument("--per-class", type=int, default=5)
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--json", help="also write the report here")
    c = sub.add_parser("compare", help="largest token difference of two token directories")
    c.add_argument("a")
    c.add_argument("b")
    a = ap.parse_args()
    {"train": cmd_train, "eval": cmd_eval, "compare": cmd_compare}[a.cmd](a)


if __name__ == "__main__":
    main()
