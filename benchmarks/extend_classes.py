"""Class lifecycle, measured: extend a token set by new classes vs train everything from scratch.

On animal-mnist (held-out images only, opaque keys) with the embedded model, per shot seed:
train tokens for the first `--old` classes, extend them by the remaining classes
(`mcti train --extend`), and train all classes from scratch with the same settings. Score the
test images with the clip scorer: old classes before the extension (among the old classes)
and after it (among all), new classes after the extension vs from scratch. Training wall and
CPU time of the extension vs scratch (same process, one thread each; on a shared machine the CPU
time is the comparable one).

    nice python benchmarks/extend_classes.py --seeds 0,1,2 --out runs/extend
    nice python benchmarks/extend_classes.py --seeds 0,1,2 --extend-steps 20 --out runs/extend20
"""

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from mcti.core.model import load_model
from mcti.data.folders import scan_folder
from mcti.data.offline import held_out_sample, load_split, write_folder
from mcti.eval.evaluate import evaluate, load_classifier
from mcti.settings import ScoreArgs, TrainArgs
from mcti.train.loop import train


def folders(out: Path, seed: int, shots: int, per_class: int, n_old: int) -> dict[str, Path]:
    """train/ (all), old/ (first n_old classes), new/ (the rest) with `shots` images per class,
    test/ with `per_class` other images per class; keys c00, c01, ... in every folder."""
    split = load_split("animal-mnist")
    classes = list(range(len(split.names)))
    idx = held_out_sample(split, classes, shots + per_class, seed=seed)
    labels = split.labels[idx]
    train_idx = np.concatenate([idx[labels == k][:shots] for k in classes])
    test_idx = np.concatenate([idx[labels == k][shots:] for k in classes])
    write_folder(split, train_idx, out / "train")
    write_folder(split, test_idx, out / "test")
    for name, keep in (("old", classes[:n_old]), ("new", classes[n_old:])):
        write_folder(split, train_idx[np.isin(split.labels[train_idx], keep)], out / name)
    # write_folder numbers keys by the classes present: rename new/ to the keys of train/
    for i, d in enumerate(sorted((out / "new").iterdir(), reverse=True)):
        d.rename(out / "new" / f"c{len(classes) - 1 - i:02d}")
    return {k: out / k for k in ("train", "old", "new", "test")}


def accuracy(bundle, tokens: Path, test: Path, labels: set[str]) -> dict[str, float]:
    """Clip-scorer accuracy of `tokens` on the test images of `labels` (mean over those classes)."""
    data = scan_folder(test)
    classes = [c for c in data.classes if c in labels]
    keep = [i for i, y in enumerate(data.labels) if data.classes[y] in labels]
    ys = [classes.index(data.classes[data.labels[i]]) for i in keep]
    sub = type(data)(data.root, classes, [data.paths[i] for i in keep], ys)
    loaded = load_classifier(ScoreArgs(tokens=str(tokens), scorer="clip", device="cpu"), bundle)
    r = evaluate(loaded, sub, list(range(len(sub))), 64, quiet=True)
    return {"accuracy": r["accuracy"], "per_class": r["per_class"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--old", type=int, default=8, help="classes of the first set (of 10)")
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--per-class", type=int, default=50, help="test images per class")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--extend-steps", type=int, help="steps of the extension (default: --steps)")
    ap.add_argument("--reg", default="clip")
    ap.add_argument("--out", default="runs/extend")
    a = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(a.out)
    bundle = load_model("embedded", "cpu")
    rows = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        root = out / f"seed{seed}"
        f = folders(root, seed, a.shots, a.per_class, a.old)
        old_labels = {p.name for p in f["old"].iterdir()}
        new_labels = {p.name for p in f["new"].iterdir()}
        common = dict(
            model="embedded", device="cpu", reg=a.reg, shots=a.shots, seed=seed, quiet=True
        )
        times = {}
        for name, data, extend in (
            ("old", f["old"], None),
            ("extend", f["new"], str(root / "tok-old")),
            ("scratch", f["train"], None),
        ):
            t, cpu = time.perf_counter(), time.process_time()
            steps = a.extend_steps or a.steps if extend else a.steps
            cfg = TrainArgs(data=str(data), out=str(root / f"tok-{name}"), extend=extend, **common)
            train(replace(cfg, steps=steps, save_every=steps), bundle)
            times[name] = time.perf_counter() - t
            times[f"{name}_cpu"] = time.process_time() - cpu  # blind to other jobs' load
        row = {
            "seed": seed,
            "train_s": times,
            "old_before": accuracy(bundle, root / "tok-old", f["test"], old_labels),
            "old_after_extend": accuracy(bundle, root / "tok-extend", f["test"], old_labels),
            "old_scratch": accuracy(bundle, root / "tok-scratch", f["test"], old_labels),
            "new_extend": accuracy(bundle, root / "tok-extend", f["test"], new_labels),
            "new_scratch": accuracy(bundle, root / "tok-scratch", f["test"], new_labels),
        }
        rows.append(row)
        print(json.dumps({k: (v["accuracy"] if isinstance(v, dict) and "accuracy" in v else v) for k, v in row.items()}), flush=True)  # fmt: skip
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    keys = ("old_before", "old_after_extend", "old_scratch", "new_extend", "new_scratch")
    print("mean over seeds:")
    for k in keys:
        v = [r[k]["accuracy"] for r in rows]
        print(f"  {k:18s} {100 * np.mean(v):5.1f} +- {100 * np.std(v):4.1f}")
    for k in ("old", "extend", "scratch"):
        wall, cpu = (np.mean([r["train_s"][x] for r in rows]) for x in (k, f"{k}_cpu"))
        print(f"  train {k:10s} wall {wall:6.1f} s, CPU {cpu:6.1f} s")


if __name__ == "__main__":
    main()
