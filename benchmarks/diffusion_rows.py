"""UNet rows per image of the diffusion scorer: the Diffusion Classifier's reference schedule
against a short schedule with the significance rule and a calibrated timestep grid, on the same
token set, images and noise seed, side by side in one run.

The token set's own shots (picked as `mcti train` picked them: --shots/--seed of its
classes.json; the first --calib-shots of each class) calibrate the timestep density
(`separation_by_t`, reported in --out, never written to the token directory); the test images are the other images of
DATA, the first --per-class of each class in file order.

    python benchmarks/diffusion_rows.py --tokens DEMO/tokens --data DEMO/data --per-class 2 \
        --out rows.json
"""

import argparse
import json
import time

import torch

from mcti.atomic import atomic_write_json
from mcti.core.diffusion import separation_by_t
from mcti.core.model import load_model
from mcti.core.scoring import DiffusionScorer, parse_schedule
from mcti.core.store import load_tokens
from mcti.data.folders import few_shot, load_images, scan_folder


def score_all(
    scorer: DiffusionScorer, x0: torch.Tensor, batch: int
) -> tuple[torch.Tensor, int, float]:
    """Top-1 predictions (N,), UNet rows and seconds over all latents, `batch` images at a time."""
    t0, preds, rows = time.perf_counter(), [], 0
    for i in range(0, len(x0), batch):
        s = scorer.score_latents(x0[i : i + batch])
        preds.append(s.ranking()[:, 0])
        rows += s.unet_rows
        print(f"  {i + len(s.scores)} images: top-1 {torch.cat(preds).tolist()}", flush=True)
    return torch.cat(preds), rows, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--model", default="embedded")
    p.add_argument("--per-class", type=int, default=2, help="test images per class")
    p.add_argument("--ref", default="50,500/5,1", help="reference n_samples/to_keep")
    p.add_argument("--ours", default="8,16,32,64/5,3,2,1", help="our n_samples/to_keep")
    p.add_argument("--stop-level", type=float, default=0.05)
    p.add_argument("--bins", type=int, default=10, help="timestep bands of the calibration")
    p.add_argument("--calib-shots", type=int, default=5, help="training shots per class used")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=5, help="images per score_latents call")
    p.add_argument("--out", default="")
    a = p.parse_args()
    torch.set_grad_enabled(False)

    bundle = load_model(a.model, device="cpu")
    tokens, table, labels, meta = load_tokens(a.tokens, bundle)
    cond = tokens.class_conditioning(table)  # (K, L, d)
    data = scan_folder(a.data, min_classes=1)
    assert data.classes == labels, f"class folders {data.classes} != token classes {labels}"
    settings = meta.get("settings", {})
    shots = few_shot(data, settings.get("shots", 5), settings.get("seed", 0))
    rest = [i for i in range(len(data)) if i not in set(shots)]
    test = [
        i
        for k in range(len(labels))
        for i in [j for j in rest if data.labels[j] == k][: a.per_class]
    ]
    size = bundle.resolution

    def latents(idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        pix, kept = load_images(data, idx, size)
        return bundle.encode_images(pix), torch.tensor([data.labels[i] for i in kept])

    # calibration shots: the first --calib-shots of each class's training shots
    per = {
        k: [i for i in shots if data.labels[i] == k][: a.calib_shots] for k in range(len(labels))
    }
    shots = [i for k in per for i in per[k]]
    x_shots, y_shots = latents(shots)
    x_test, y_test = latents(test)
    t0 = time.perf_counter()
    weights = separation_by_t(bundle, cond, x_shots, y_shots, bins=a.bins, seed=a.seed)
    calib = {
        "bins": a.bins,
        "weights": [round(float(w), 4) for w in weights],
        "unet_rows": len(shots) * len(labels) * a.bins,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print("timestep weights by band:", calib["weights"], flush=True)

    def schedule(text: str) -> tuple[list[int], list[int]]:
        ns, tk = text.split("/")
        return parse_schedule(ns, tk, len(labels))

    # the reference last: on a slow machine its partial results (printed per batch) still count
    runs = {
        "short even": (a.ours, 0.0, None),
        "short even + stop": (a.ours, a.stop_level, None),
        "short calibrated + stop": (a.ours, a.stop_level, weights),
        "reference": (a.ref, 0.0, None),
    }
    results = {}
    for name, (sched, level, w) in runs.items():
        scorer = DiffusionScorer.from_conditioning(
            bundle, cond, schedule(sched), seed=a.seed, stop_level=level, t_weights=w
        )
        pred, rows, sec = score_all(scorer, x_test, a.batch)
        results[name] = {
            "schedule": sched,
            "stop_level": level,
            "grid": "calibrated" if w is not None else "even",
            "accuracy": round((pred == y_test).float().mean().item(), 4),
            "correct": int((pred == y_test).sum()),
            "rows_per_image": round(rows / len(x_test), 1),
            "s_per_image": round(sec / len(x_test), 2),
        }
        print(name, results[name], flush=True)
    ref_rows = results["reference"]["rows_per_image"]
    for r in results.values():
        r["rows_vs_reference"] = round(r["rows_per_image"] / ref_rows, 4)
    out = {
        "tokens": a.tokens,
        "data": a.data,
        "classes": len(labels),
        "test_images": len(x_test),
        "calibration": calib,
        "results": results,
    }
    print(json.dumps(out, indent=1))
    print("test labels:", y_test.tolist())
    if a.out:
        atomic_write_json(a.out, out)


if __name__ == "__main__":
    main()
