"""Can the embedded model tell the `mcti synth` classes apart at its 16x16 input? Measured.

For each K: write the dataset with `mcti.data.synth.write_synth` (5 train shots + `--test`
test images per class), load both splits at the model's resolution exactly as training and
evaluation do (`mcti.data.folders.load_images`), and fit on the train shots:
- nearest class mean (cosine) and logistic regression on the embedded model's CLIP image
  features (`ModelBundle.clip_image_features`);
- nearest class mean (Euclidean) and logistic regression on the raw 16x16 RGB pixels.
Reports test accuracy against chance (1/K) as a markdown table and JSON.

    python benchmarks/synth_separability.py --classes 100,1000 --out runs/synth_sep.json
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mcti.core.model import load_model
from mcti.data.folders import load_images, scan_folder
from mcti.data.synth import write_synth


def nearest_mean(xs: np.ndarray, ys: np.ndarray, xe: np.ndarray, cosine: bool) -> np.ndarray:
    classes = np.unique(ys)
    means = np.stack([xs[ys == c].mean(0) for c in classes])  # (K, D)
    if cosine:
        means /= np.linalg.norm(means, axis=1, keepdims=True)
        return classes[(xe @ means.T).argmax(1)]
    d = (xe**2).sum(1, keepdims=True) - 2 * xe @ means.T + (means**2).sum(1)  # (N, K)
    return classes[d.argmin(1)]


def logistic(xs: np.ndarray, ys: np.ndarray, xe: np.ndarray) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(xs)
    clf = LogisticRegression(max_iter=300, C=1.0).fit(scaler.transform(xs), ys)
    return clf.predict(scaler.transform(xe))


def features(bundle, x: torch.Tensor, batch: int = 512) -> np.ndarray:
    return torch.cat(
        [bundle.clip_image_features(x[i : i + batch]) for i in range(0, len(x), batch)]
    ).numpy()


def measure(bundle, k: int, shots: int, test: int, seed: int, logreg_max_k: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_synth(tmp, k, shots + test, shots, seed, size=32)
        t_write = time.perf_counter() - t0
        train, evals = scan_folder(Path(tmp) / "train"), scan_folder(Path(tmp) / "test")
        xs, _ = load_images(train, list(range(len(train))), bundle.resolution, quiet=True)
        xe, _ = load_images(evals, list(range(len(evals))), bundle.resolution, quiet=True)
    ys, ye = np.array(train.labels), np.array(evals.labels)
    fs, fe = features(bundle, xs), features(bundle, xe)
    ps, pe = xs.flatten(1).numpy(), xe.flatten(1).numpy()
    r = {"classes": k, "shots": shots, "test_per_class": test, "chance": 1 / k}
    r["write_s"] = round(t_write, 2)
    r["clip_ncm"] = float((nearest_mean(fs, ys, fe, cosine=True) == ye).mean())
    r["pixel_ncm"] = float((nearest_mean(ps, ys, pe, cosine=False) == ye).mean())
    if k <= logreg_max_k:
        r["clip_logreg"] = float((logistic(fs, ys, fe) == ye).mean())
        r["pixel_logreg"] = float((logistic(ps, ys, pe) == ye).mean())
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", default="100,1000", help="comma-separated K values")
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--test", type=int, default=20, help="test images per class")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--logreg-max-k", type=int, default=1000, help="skip logistic regression above")
    ap.add_argument("--model", default="embedded", help="model spec or diffusers directory")
    ap.add_argument("--out", default="", help="JSON results file")
    a = ap.parse_args()
    torch.set_num_threads(1)
    bundle = load_model(a.model, "cpu")
    rows = []
    for k in [int(s) for s in a.classes.split(",")]:
        rows.append(measure(bundle, k, a.shots, a.test, a.seed, a.logreg_max_k))
        print(json.dumps(rows[-1]), flush=True)
    cols = ["clip_ncm", "clip_logreg", "pixel_ncm", "pixel_logreg"]
    print(f"\n| K | chance | {' | '.join(cols)} |\n|---|---|{'---|' * len(cols)}")
    for r in rows:
        cells = " | ".join(f"{r[c]:.1%}" if c in r else "-" for c in cols)
        print(f"| {r['classes']} | {r['chance']:.2%} | {cells} |")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
