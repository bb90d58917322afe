"""Open set on the embedded model: does a rejection score tell known classes from unknown ones?

For each dataset D (animal-mnist, fashion-mnist), shot count and seed: the seen classes of D are
known: `--shots` training images each (from the held-out split, so never pretrained on) and
`--per-class` disjoint test images. Unknown: held-out images of D's novel classes ("near") and
of the other dataset ("far"). MC-TI clip tokens are trained on the shots; every candidate score
of mcti.core.openset (the clip scorer's msp/margin, the CLIP-feature ncm/knn/mahalanobis) and
the linear probe's max softmax are measured: AUROC and FPR at 95% known recall (known vs near
+ far unknowns), and the `auto` threshold's known recall on the test images vs its target.
`ncm` is the nearest-class-mean baseline itself. Writes OUT/results.json and prints a table.

    nice python benchmarks/openset.py --shots 5 --seeds 0,1,2 --out runs/openset
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mcti.core.model import load_model
from mcti.core.openset import (
    DEFAULT_SCORE,
    REJECT_SCORES,
    Evidence,
    Reference,
    auroc,
    fit,
    fpr_at_recall,
)
from mcti.errors import UserError
from mcti.eval.baselines import PROBE_C, split_pixels
from mcti.eval.evaluate import load_classifier, score_all
from mcti.settings import ScoreArgs, TrainArgs
from mcti.train.loop import train

OTHER = {"animal-mnist": "fashion-mnist", "fashion-mnist": "animal-mnist"}


def write_shots(split, idx: np.ndarray, root: Path) -> None:
    for i in idx.tolist():
        d = root / f"k{split.seen.index(int(split.labels[i])):02d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(split.images[i]).convert("RGB").save(d / f"{i:05d}.png")


def probe_msp(train_f, train_y, test_f) -> torch.Tensor:
    from sklearn.linear_model import LogisticRegression

    probe = LogisticRegression(max_iter=2000, C=PROBE_C).fit(train_f.numpy(), train_y.numpy())
    return torch.from_numpy(probe.predict_proba(test_f.numpy()).max(1))


def one_run(bundle, splits, ds: str, shots: int, seed: int, args, out: Path) -> dict:
    s, o = splits[ds], splits[OTHER[ds]]
    rng = np.random.default_rng(5000 + seed)
    shot_idx, test_idx = [], []
    for k in s.seen:
        idx = rng.permutation(s.held_out[s.labels[s.held_out] == k])
        shot_idx.append(idx[:shots])
        test_idx.append(idx[shots : shots + args.per_class])
    shot_idx, test_idx = np.concatenate(shot_idx), np.concatenate(test_idx)
    near = np.concatenate(
        [rng.permutation(s.held_out[s.labels[s.held_out] == k])[: args.per_class] for k in s.novel]
    )
    far = rng.permutation(o.held_out)[: args.per_class * len(s.novel)]
    run_dir = out / f"{ds}-{shots}shot-seed{seed}"
    write_shots(s, shot_idx, run_dir / "train")
    tok = run_dir / "tok"
    if not (tok / "classes.json").is_file():
        cfg = TrainArgs(
            data=str(run_dir / "train"),
            out=str(tok),
            shots=shots,
            seed=seed,
            steps=args.steps,
            method="mcti",
            reg="clip",
            gamma=args.gamma,
            quiet=True,
            device="cpu",
        )
        train(cfg, bundle)
    loaded = load_classifier(ScoreArgs(tokens=str(tok), scorer="clip", device="cpu"), bundle)

    def px(split, idx):
        return split_pixels(split, idx, bundle.resolution).expand(-1, 3, -1, -1)

    x_shot, x_known = px(s, shot_idx), px(s, test_idx)
    x_unknown = torch.cat([px(s, near), px(o, far)])
    y_shot = torch.tensor([s.seen.index(int(y)) for y in s.labels[shot_idx]])
    y_known = torch.tensor([s.seen.index(int(y)) for y in s.labels[test_idx]])
    f_shot, f_known, f_unknown = (
        bundle.clip_image_features(x).cpu() for x in (x_shot, x_known, x_unknown)
    )
    sc_known = score_all(loaded, x_known, 64, quiet=True).scores
    sc_unknown = score_all(loaded, x_unknown, 64, quiet=True).scores
    ref = Reference(f_shot, y_shot, len(s.seen))
    ev_k, ev_u = Evidence(sc_known, f_known), Evidence(sc_unknown, f_unknown)
    n_near = len(near)
    run = {
        "dataset": ds,
        "shots": shots,
        "seed": seed,
        "n_known": len(test_idx),
        "n_near": n_near,
        "n_far": len(far),
        "accuracy": float((sc_known.argmax(1) == y_known).float().mean()),
        "scores": {},
    }
    candidates = {name: (fn(ev_k, ref), fn(ev_u, ref)) for name, fn in REJECT_SCORES.items()}
    candidates["probe msp (baseline)"] = (
        probe_msp(f_shot, y_shot, f_known),
        probe_msp(f_shot, y_shot, f_unknown),
    )
    for name, (k, u) in candidates.items():
        run["scores"][name] = {
            "auroc": auroc(k, u),
            "fpr_at_95": fpr_at_recall(k, u, 0.95),
            "auroc_near": auroc(k, u[:n_near]),
            "auroc_far": auroc(k, u[n_near:]),
        }
    try:
        state = fit(ref)
    except UserError:  # 1 shot per class: no leave-one-out, no auto threshold
        return run
    for name in state.loo:
        t = state.threshold(name, args.known_recall)
        k, u = candidates[name]
        run["scores"][name]["auto_known_recall"] = float((k >= t).float().mean())
        run["scores"][name]["auto_unknown_rejected"] = float((u < t).float().mean())
    return run


def report(results: dict) -> str:
    rows = {}
    for r in results["runs"]:
        for name, m in r["scores"].items():
            rows.setdefault((r["dataset"], r["shots"], name), []).append(m)
    lines = [
        "| dataset | shots | score | AUROC | near | far | FPR@95 | auto known recall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (ds, shots, name), ms in sorted(rows.items()):

        def ms_(key, ms=ms):
            v = [m[key] for m in ms if key in m]
            if not v:
                return "-"
            return f"{np.mean(v):.3f} ± {np.std(v):.3f}"

        mark = " (default)" if name == DEFAULT_SCORE else ""
        lines.append(
            f"| {ds} | {shots} | {name}{mark} | {ms_('auroc')} | {ms_('auroc_near')} | "
            f"{ms_('auroc_far')} | {ms_('fpr_at_95')} | {ms_('auto_known_recall')} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="animal-mnist,fashion-mnist")
    p.add_argument("--shots", default="5")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--per-class", type=int, default=40)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--gamma", type=float, default=0.1)
    p.add_argument("--known-recall", type=float, default=0.95)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/openset")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    if args.report_only:
        print(report(json.loads((out / "results.json").read_text())))
        return
    torch.set_num_threads(args.threads)
    from mcti.data.offline import load_split

    bundle = load_model("embedded", device="cpu")
    splits = {d: load_split(d) for d in OTHER}
    results = {"args": vars(args), "runs": []}
    t0 = time.time()
    for shots in [int(x) for x in args.shots.split(",")]:
        for ds in args.datasets.split(","):
            for seed in [int(x) for x in args.seeds.split(",")]:
                results["runs"].append(one_run(bundle, splits, ds, shots, seed, args, out))
                results["seconds"] = round(time.time() - t0, 1)
                out.mkdir(parents=True, exist_ok=True)
                (out / "results.json").write_text(json.dumps(results, indent=1))
                print(f"done {ds} {shots} shots seed {seed} ({results['seconds']} s)", flush=True)
    print(report(results))


if __name__ == "__main__":
    main()
