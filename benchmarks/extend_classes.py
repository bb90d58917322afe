"""Class lifecycle, measured: extend a token set by new classes vs train everything from scratch.

Held-out images only (opaque keys), embedded model, per shot seed: train tokens for the old
classes, extend them by the new ones (`mcti train --extend`), and train all classes from scratch
with the same settings. Shapes: `8+2` (animal-mnist, old c00-c07, new c08-c09) and `8+5`
(13 classes: animal-mnist's 10 and fashion-mnist's t-shirt, trouser, pullover; old: bear, bird,
cat, cow, dog, elephant, t-shirt, trouser; new: giraffe, horse, sheep, zebra, pullover).
Test images are scored with the clip and the fused scorer: old classes before the extension
(among the old classes) and after it (among all), new classes after the extension vs from
scratch; beside them what a user would pick instead, on the same model's CLIP image features of
the same shots: nearest class mean and a linear probe (which need no training to extend).
Paired differences over seeds with a paired t-test; training CPU time of each run (one thread;
on a shared machine the CPU time is the comparable one; it includes the fused-state fit).
A token directory that exists under --out is reused with its recorded times (so the extension
alone can be rerun, e.g. by an older version of mcti on the same old sets).

    nice python benchmarks/extend_classes.py --shape 8+2 --seeds 0,1,2,3,4 --out runs/extend
    nice python benchmarks/extend_classes.py --shape 8+5 --seeds 0,1,2,3,4 --out runs/extend13
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import stats
from sklearn.linear_model import LogisticRegression

from mcti.core.model import load_model
from mcti.data.folders import load_images, scan_folder
from mcti.data.offline import held_out_sample, load_split
from mcti.eval.evaluate import evaluate, load_classifier
from mcti.settings import ScoreArgs, TrainArgs
from mcti.train.loop import train

ANIMAL = [("animal-mnist", k) for k in range(10)]
SHAPES = {  # (dataset, class) of c00, c01, ...; the first 8 are the old classes
    "8+2": ANIMAL,
    "8+5": ANIMAL[:6] + [("fashion-mnist", 0), ("fashion-mnist", 1)] + ANIMAL[6:]
    + [("fashion-mnist", 2)],
}  # fmt: skip
N_OLD = 8
SCORERS = ("clip", "fused")


def write_class(split, indices: np.ndarray, d: Path, size: int = 28) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for i in indices.tolist():
        im = Image.fromarray(split.images[i])
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        im.convert("RGB").save(d / f"{split.name}-{i:05d}.png")


def folders(out: Path, seed: int, shots: int, per_class: int, shape: str) -> dict[str, Path]:
    """train/ (all classes), old/ (the first 8), new/ (the rest) with `shots` images per class,
    test/ with `per_class` other images per class; keys c00, c01, ... in every folder."""
    if (out / "test").is_dir():
        return {k: out / k for k in ("train", "old", "new", "test")}
    splits = {}
    for j, (name, k) in enumerate(SHAPES[shape]):
        split = splits.setdefault(name, load_split(name))
        idx = held_out_sample(split, [k], shots + per_class, seed=seed)
        key = f"c{j:02d}"
        for part in ("train", "old" if j < N_OLD else "new"):
            write_class(split, idx[:shots], out / part / key)
        write_class(split, idx[shots:], out / "test" / key)
    return {k: out / k for k in ("train", "old", "new", "test")}


def accuracy(bundle, tokens: Path, test: Path, labels: set[str], scorer: str) -> dict:
    """Accuracy of `tokens` with `scorer` (among all its classes) on the test images of
    `labels`, overall and per class."""
    data = scan_folder(test)
    classes = [c for c in data.classes if c in labels]
    keep = [i for i, y in enumerate(data.labels) if data.classes[y] in labels]
    ys = [classes.index(data.classes[data.labels[i]]) for i in keep]
    sub = type(data)(data.root, classes, [data.paths[i] for i in keep], ys)
    loaded = load_classifier(ScoreArgs(tokens=str(tokens), scorer=scorer, device="cpu"), bundle)
    r = evaluate(loaded, sub, list(range(len(sub))), 64, quiet=True)
    return {"accuracy": r["accuracy"], "per_class": r["per_class"]}


@torch.no_grad()
def features(bundle, folder: Path) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """(N, P) CLIP image features of a folder's images, their class keys (N,), the classes."""
    data = scan_folder(folder)
    pixels, kept = load_images(data, list(range(len(data))), bundle.resolution, quiet=True)
    f = torch.cat(
        [bundle.clip_image_features(pixels[i : i + 64]) for i in range(0, len(pixels), 64)]
    )
    return f.float().cpu(), np.array([data.classes[data.labels[i]] for i in kept]), data.classes


def feature_baselines(bundle, f: dict[str, Path], old: set[str]) -> dict[str, float]:
    """Nearest class mean and a linear probe on the shots' CLIP image features: old classes
    among the old ones, and old and new classes among all (extending them costs nothing)."""
    x_tr, y_tr, classes = features(bundle, f["train"])
    x_te, y_te, _ = features(bundle, f["test"])
    out = {}
    for among, keys in (("old", sorted(old)), ("all", classes)):
        tr, te = np.isin(y_tr, keys), np.isin(y_te, keys)
        means = torch.nn.functional.normalize(
            torch.stack([x_tr[torch.from_numpy(y_tr == k)].mean(0) for k in keys]), dim=1
        )
        ncm = np.array(keys)[(x_te[torch.from_numpy(te)] @ means.T).argmax(1).numpy()]
        probe = LogisticRegression(C=10.0, max_iter=2000).fit(x_tr[torch.from_numpy(tr)], y_tr[tr])
        lp = probe.predict(x_te[torch.from_numpy(te)])
        for name, pred in (("ncm", ncm), ("probe", lp)):
            right = pred == y_te[te]
            if among == "old":
                out[f"{name}_old_among_old"] = float(right.mean())
            else:
                is_old = np.isin(y_te[te], sorted(old))
                out[f"{name}_old_among_all"] = float(right[is_old].mean())
                out[f"{name}_new_among_all"] = float(right[~is_old].mean())
    return out


def trained(bundle, cfg: TrainArgs) -> dict[str, float]:
    """Train (or reuse) a token directory; its wall and CPU seconds."""
    record = Path(cfg.out) / "bench_time.json"
    if record.is_file():
        return json.loads(record.read_text())
    t, cpu = time.perf_counter(), time.process_time()
    train(cfg, bundle)
    times = {"wall_s": time.perf_counter() - t, "cpu_s": time.process_time() - cpu}
    record.write_text(json.dumps(times))
    return times


def paired(a: list[float], b: list[float]) -> str:
    """mean difference a - b in points, its 95% CI and the paired t-test's p."""
    d = 100 * (np.array(a) - np.array(b))
    if len(d) < 2 or np.all(d == d[0]):
        return f"{d.mean():+.1f}"
    t = stats.ttest_rel(a, b)
    lo, hi = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    return f"{d.mean():+.1f} (95% CI {lo:+.1f} to {hi:+.1f}, p={t.pvalue:.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8+2")
    ap.add_argument("--seeds", default="0,1,2,3,4")
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
        f = folders(root, seed, a.shots, a.per_class, a.shape)
        old = {p.name for p in f["old"].iterdir()}
        new = {p.name for p in f["new"].iterdir()}
        common = dict(model="embedded", device="cpu", reg=a.reg, shots=a.shots, seed=seed,
                      quiet=True)  # fmt: skip
        times = {}
        for name, data, extend in (
            ("old", f["old"], None),
            ("extend", f["new"], str(root / "tok-old")),
            ("scratch", f["train"], None),
        ):
            steps = (a.extend_steps or a.steps) if extend else a.steps
            cfg = TrainArgs(data=str(data), out=str(root / f"tok-{name}"), extend=extend,
                            steps=steps, save_every=steps, **common)  # fmt: skip
            times[name] = trained(bundle, cfg)
        row = {"seed": seed, "train": times, **feature_baselines(bundle, f, old)}
        tok = {k: root / f"tok-{k}" for k in ("old", "extend", "scratch")}
        for s in SCORERS:  # each group's accuracy: the mean over its classes (50 images each)
            before = accuracy(bundle, tok["old"], f["test"], old, s)["per_class"]
            ext = accuracy(bundle, tok["extend"], f["test"], old | new, s)["per_class"]
            scr = accuracy(bundle, tok["scratch"], f["test"], old | new, s)["per_class"]
            row[s] = {
                k: {"accuracy": float(np.mean([pc[c] for c in sorted(group)])), "per_class": pc}
                for k, pc, group in (
                    ("old_before", before, old),
                    ("old_after_extend", ext, old),
                    ("old_scratch", scr, old),
                    ("new_extend", ext, new),
                    ("new_scratch", scr, new),
                )
            }
        rows.append(row)
        print(json.dumps({"seed": seed, "cpu_s": {k: round(v["cpu_s"], 1) for k, v in times.items()},
                          **{s: {k: v["accuracy"] for k, v in row[s].items()} for s in SCORERS}}),
              flush=True)  # fmt: skip
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    summary(rows)


def summary(rows: list[dict]) -> None:
    def col(s, k):
        return [r[s][k]["accuracy"] for r in rows]

    n = len(rows)
    print(f"mean +- std over {n} seeds (accuracy %; old and new each over their own test images)")
    for s in SCORERS:
        for k in ("old_before", "old_after_extend", "old_scratch", "new_extend", "new_scratch"):
            v = 100 * np.array(col(s, k))
            print(f"  {s:6s} {k:18s} {v.mean():5.1f} +- {v.std():4.1f}   per seed {np.round(v, 1).tolist()}")  # fmt: skip
        print(f"  {s:6s} new: extend - scratch  {paired(col(s, 'new_extend'), col(s, 'new_scratch'))}")  # fmt: skip
        print(f"  {s:6s} old: after - before    {paired(col(s, 'old_after_extend'), col(s, 'old_before'))}")  # fmt: skip
    for k in ("ncm", "probe"):
        for g in ("old_among_old", "old_among_all", "new_among_all"):
            v = 100 * np.array([r[f"{k}_{g}"] for r in rows])
            print(f"  {k:6s} {g:18s} {v.mean():5.1f} +- {v.std():4.1f}   per seed {np.round(v, 1).tolist()}")  # fmt: skip
    for k in ("old", "extend", "scratch"):
        cpu = [r["train"][k]["cpu_s"] for r in rows]
        print(f"  train {k:8s} CPU {np.mean(cpu):6.1f} s   per seed {np.round(cpu, 1).tolist()}")


if __name__ == "__main__":
    main()
