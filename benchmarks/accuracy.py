"""The paper's claim, measured: TI vs MC-TI (denoise, clip) on real data with the embedded model.

For each task (seen concepts: named in pretraining captions, names unused by the method; novel
concepts: never in pretraining) and each shot seed: pick `--shots` training images per class and
`--per-class` disjoint test images from the held-out split (mcti.data.offline), train TI, MC-TI
denoise and MC-TI clip tokens, and score the test images with the diffusion and clip scorers.
Baselines on the same frozen model: linear probe and nearest class mean on the CLIP vision
features of the same shots; zero-shot with the true names (seen only). Generation: the fraction
of images drawn from each class token that an independent classifier (logistic regression on
pixels, trained on other real held-out images) assigns to that class.
Fused scorer (mcti.core.fused, needs the CLIP tower): each token set's fused scorer as `mcti eval
--scorer fused` runs it (its parts computed once by `Classifier.fused_parts`, fused by the
state's `combine`, as `Classifier.score` does), and its ablations, each refitted on the shots'
evidence alone: the cache alone (once per seed: no tokens), without the diffusion part, without
the tokens (cache + diffusion, out-of-fold), the tokens alone and the diffusion part alone (on
the cache's top m), and the fit before folds (in-sample token weight, shrink 0.5); with the ECE
(15 bins) of each calibrated output, UNet rows/image and s/image. `--fit-folds K` trains the
token sets with K fold token sets (the out-of-fold evidence and the diffusion part).
Writes a JSON of everything and a markdown table (mean +- std over seeds; paired t-test of MC-TI
vs TI over seeds, and McNemar's test on the pooled per-image outcomes).

`--tasks openset` runs the open-set protocol of benchmarks/openset.py (known: seen classes;
unknown: novel classes and the other dataset) through that script's code, at this run's shots,
seeds and sizes.

    python benchmarks/accuracy.py --seeds 0,1,2 --shots 5 --out runs/accuracy
    python benchmarks/accuracy.py --tasks openset --seeds 0,1,2,3,4 --shots 16 --per-class 40
    python benchmarks/accuracy.py --seeds 0,1,2,3,4 --per-class 30 --methods "MC-TI clip" \
        --scorers clip,fused --fit-folds 3 --gen-n 0 --out runs/fused-folds   # fused ablations
"""

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mcti.core.fused import (
    FusedParts,
    diffusion_part,
    fit_for_tokens,
    fit_fused,
    fit_weights,
    zscore,
)
from mcti.core.generate import generate
from mcti.core.model import load_model
from mcti.core.store import load_tokens
from mcti.data.folders import scan_folder
from mcti.data.offline import load_split
from mcti.eval.baselines import clip_feature_baselines, predict, true_name_classifier
from mcti.eval.evaluate import evaluate, expected_calibration_error, load_classifier
from mcti.settings import EvalArgs, TrainArgs
from mcti.train.loop import train

TASKS = {
    # name: [(dataset, "seen" | "novel")]
    "seen": [("fashion-mnist", "seen")],
    "novel": [("animal-mnist", "novel"), ("fashion-mnist", "novel")],
}
METHODS = {
    "TI": dict(method="ti"),
    "MC-TI denoise": dict(method="mcti", reg="denoise"),
    "MC-TI clip": dict(method="mcti", reg="clip"),
}


def write_task(task: str, seed: int, shots: int, per_class: int, size: int, root: Path) -> dict:
    """train/, test/ and gen-ref arrays for one task and shot seed; opaque keys k00, k01..."""
    rng = np.random.default_rng(1000 + seed)
    classes, train_x, test_x, ref_x, ref_y = [], [], [], [], []
    for ds, which in TASKS[task]:
        s = load_split(ds)
        for k in s.seen if which == "seen" else s.novel:
            idx = rng.permutation(s.held_out[s.labels[s.held_out] == k])
            classes.append(s.names[k])
            train_x.append(s.images[idx[:shots]])
            test_x.append(s.images[idx[shots : shots + per_class]])
            ref = s.images[idx[shots + per_class : shots + per_class + 200]]
            ref_x.append(ref)
            ref_y += [len(classes) - 1] * len(ref)
    for part, arrays in (("train", train_x), ("test", test_x)):
        for j, arr in enumerate(arrays):
            d = root / part / f"k{j:02d}"
            d.mkdir(parents=True, exist_ok=True)
            for i, im in enumerate(arr):
                Image.fromarray(im).convert("RGB").save(d / f"{i:04d}.png")
    return {"names": classes, "ref_x": np.concatenate(ref_x), "ref_y": np.array(ref_y)}


def pixels_for_probe(images: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(images).float().unsqueeze(1) / 255.0
    return (
        torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", antialias=True)
        .flatten(1)
        .numpy()
    )


def load_folder_pixels(folder: Path, size: int):
    from mcti.data.folders import load_images

    data = scan_folder(folder, min_classes=1)
    x, kept = load_images(data, list(range(len(data))), size)
    return x, torch.tensor([data.labels[i] for i in kept])


def baselines(bundle, task_dir: Path, names: list[str], seen: bool, args, ece: dict) -> dict:
    xtr, ytr = load_folder_pixels(task_dir / "train", bundle.resolution)
    xte, yte = load_folder_pixels(task_dir / "test", bundle.resolution)
    out = {}
    if bundle.clip is not None:
        for name, pred in clip_feature_baselines(bundle, xtr, ytr, xte, len(names)).items():
            out[name] = (pred == yte).tolist()
        if "fused" in args.scorers.split(","):  # the fused scorer without tokens: same per seed
            ftr, fte = bundle.clip_image_features(xtr), bundle.clip_image_features(xte)
            probs = fit_fused(ftr, ytr, len(names), None).logits(fte, None).softmax(1)
            out["cache alone (fused without tokens)"] = (probs.argmax(1) == yte).tolist()
            ece["cache alone (fused without tokens)"] = expected_calibration_error(probs, yte)
    if seen:
        scorers = [x for x in ("diffusion", "clip") if x in args.scorers.split(",")]
        for scorer in scorers if bundle.clip is not None else ("diffusion",):
            kw = (
                {}
                if scorer == "clip"
                else dict(
                    n_samples=args.n_samples,
                    to_keep=args.to_keep,
                    batch_rows=args.batch_rows,
                    seed=0,
                )
            )
            pred = predict(true_name_classifier(bundle, names, scorer, **kw), xte, 16)
            out[f"zero-shot true names ({scorer})"] = (pred == yte).tolist()
    return out


def fused_variants(bundle, tok_dir: Path, task_dir: Path, run: dict, name: str, args) -> None:
    """The fused scorer of one token set and its ablations (accuracy, ECE, cost into `run`)."""
    xte, yte = load_folder_pixels(task_dir / "test", bundle.resolution)
    ea = EvalArgs(
        model=args.model, tokens=str(tok_dir), data=str(task_dir / "test"), scorer="fused",
        batch_rows=args.batch_rows, device="cpu",
    )  # fmt: skip
    clf = load_classifier(ea, bundle).classifier
    state = clf.fused
    t0 = time.perf_counter()
    chunks = [clf.fused_parts(xte[i : i + 16]) for i in range(0, len(xte), 16)]
    seconds = time.perf_counter() - t0
    parts = FusedParts(
        torch.cat([c.cache for c in chunks]),
        torch.cat([c.token_cos for c in chunks]),
        torch.cat([c.diffusion for c in chunks]) if chunks[0].diffusion is not None else None,
        sum(c.unet_rows for c in chunks),
    )
    # the shots and their evidence, as the token set's fused state stored them
    ftr, ytr, K, P = state.features, state.labels, state.num_classes, state.params
    text = clf.clip.text.float().cpu()
    F, tc, df = P.folds, state.oof.get("token_cos"), state.oof.get("diffusion")
    variants = {"(fused)": state}
    variants["fused before folds (in-sample token weight, shrink 0.5)"] = fit_fused(
        ftr, ytr, K, ftr @ text.T, 0.5
    )
    if F:
        variants["fused without diffusion"] = fit_fused(ftr, ytr, K, tc, folds=F)
        if df is not None:
            variants["fused without tokens (cache + diffusion)"] = fit_fused(
                ftr, ytr, K, None, diffusion=df, folds=F
            )
    cost = {"rows_per_image": parts.unet_rows / len(xte), "s_per_image": seconds / len(xte)}
    for key, st in variants.items():
        k = f"{name} {key}"
        if st.params.w_diffusion == 0 and parts.diffusion is not None:
            logits = st.combine(FusedParts(parts.cache, parts.token_cos))
        else:
            logits = st.combine(parts)
        probs = logits.softmax(1)
        run["correct"][k] = (probs.argmax(1) == yte).tolist()
        run["ece"][k] = expected_calibration_error(probs, yte)
        run.setdefault("cost", {})[k] = cost if st.params.w_diffusion else {"rows_per_image": 0}
    # single parts, each with its temperature fitted on the shots' (out-of-fold if any) scores
    (w,) = fit_weights([zscore(tc if tc is not None else ftr @ text.T)], ytr)
    singles = {"tokens alone (fused without cache)": w * zscore(parts.token_cos)}
    if df is not None and parts.diffusion is not None:
        form, scale = P.diffusion_form, P.diffusion_scale
        (w,) = fit_weights([diffusion_part(df, form, scale)], ytr)
        singles["diffusion part alone (on the cache's top m)"] = w * diffusion_part(
            parts.diffusion, form, scale
        )
    for key, logits in singles.items():
        probs = logits.softmax(1)
        run["correct"][f"{name} {key}"] = (probs.argmax(1) == yte).tolist()
        run["ece"][f"{name} {key}"] = expected_calibration_error(probs, yte)
    run["fused_params"] = run.get("fused_params", {}) | {
        name: {k: v for k, v in vars(P).items() if k != "diffusion_bands"}
    }


def generation_score(bundle, tok_dir: Path, ref_x: np.ndarray, ref_y: np.ndarray, n: int) -> float:
    """Fraction of generated images that a pixel classifier trained on real images assigns to
    the class whose token drew them."""
    from sklearn.linear_model import LogisticRegression

    size = bundle.resolution
    clf = LogisticRegression(max_iter=3000, C=1.0).fit(pixels_for_probe(ref_x, size), ref_y)
    tokens, table, labels, _ = load_tokens(tok_dir, bundle)
    hits = 0
    for k in range(len(labels)):
        imgs = generate(
            bundle, tokens, table, k, n=n, steps=20, guidance=3.0, seed=k
        )  # (n, 3, H, W)
        grey = ((imgs.mean(1) + 1) * 127.5).clamp(0, 255).byte().numpy()
        hits += int((clf.predict(pixels_for_probe(grey, size)) == k).sum())
    return hits / (n * len(labels))


def mcnemar_p(a: list[bool], b: list[bool]) -> float:
    """Exact two-sided McNemar test on paired per-image outcomes."""
    n01 = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    n10 = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    n = n01 + n10
    if n == 0:
        return 1.0
    k = min(n01, n10)
    p = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * p)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--per-class", type=int, default=20, help="test images per class")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--gamma", type=float, default=0.1)
    p.add_argument("--tau", type=float, default=0.002)
    p.add_argument("--draws", type=int, default=2)
    p.add_argument("--negatives", type=int, default=4)
    p.add_argument(
        "--tasks",
        default="seen,novel",
        help="comma-separated: seen, novel, openset (benchmarks/openset.py's protocol)",
    )
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument(
        "--scorers",
        default="diffusion,clip,fused",
        help="scorers of each token set (comma-separated)",
    )
    p.add_argument("--n-samples", default="6,12")
    p.add_argument("--to-keep", default="3,1")
    p.add_argument("--batch-rows", type=int, default=512)
    p.add_argument("--gen-n", type=int, default=8, help="generated images per class (0: skip)")
    p.add_argument("--fit-folds", type=int, default=0, help="mcti train --fit-folds")
    p.add_argument("--fused-m", type=int, default=3, help="mcti train --fused-m")
    p.add_argument("--fused-timesteps", type=int, default=8, help="mcti train --fused-timesteps")
    p.add_argument("--out", default="runs/accuracy")
    p.add_argument(
        "--fill-generation",
        action="store_true",
        help="add missing generation scores to OUT/results.json from the saved tokens, then report",
    )
    p.add_argument(
        "--report-only", action="store_true", help="print the tables of OUT/results.json and stop"
    )
    args = p.parse_args()
    if (args.report_only or args.fill_generation) and not (
        Path(args.out) / "results.json"
    ).is_file():
        p.error(f"no results.json in '{args.out}': run the benchmark with this --out first")
    if args.report_only:  # also for a run stopped part-way: each task-seed is saved when done
        print(report(json.loads((Path(args.out) / "results.json").read_text())))
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    bundle = load_model(args.model, device="cpu")
    if args.fill_generation:
        fill_generation(bundle, out)
        return
    results = {"args": vars(args), "runs": []}
    t_start = time.time()
    tasks = args.tasks.split(",")
    if "openset" in tasks:
        openset_task(bundle, args, out)
    for seed in [int(s) for s in args.seeds.split(",")]:  # seed-major: a stopped run is paired
        for task in [t for t in tasks if t != "openset"]:
            d = out / f"{task}-seed{seed}"
            info = write_task(task, seed, args.shots, args.per_class, bundle.resolution, d)
            run = {
                "task": task,
                "seed": seed,
                "classes": len(info["names"]),
                "correct": {},
                "ece": {},
                "generation": {},
            }
            run["correct"].update(
                baselines(bundle, d, info["names"], task == "seen", args, run["ece"])
            )
            for name in [m for m in args.methods.split(",") if m]:
                tok = d / ("tok-" + name.replace(" ", "-"))
                if bundle.clip is None and "clip" in name:
                    continue
                if not (tok / "classes.json").is_file():
                    train(
                        TrainArgs(
                            model=args.model,
                            data=str(d / "train"),
                            out=str(tok),
                            shots=args.shots,
                            steps=args.steps,
                            batch_size=args.batch_size,
                            lr=args.lr,
                            gamma=args.gamma,
                            tau=args.tau,
                            draws=args.draws,
                            negatives=args.negatives,
                            seed=seed,
                            quiet=True,
                            device="cpu",
                            save_every=args.steps,
                            fit_folds=args.fit_folds,
                            fused_m=args.fused_m,
                            fused_timesteps=args.fused_timesteps,
                            **METHODS[name],
                        ),
                        bundle=bundle,
                    )
                scorers = args.scorers.split(",")
                if bundle.clip is None:
                    scorers = [x for x in scorers if x == "diffusion"]
                if "fused" in scorers and not (tok / "fused.json").is_file():
                    fill_fused(bundle, tok, d)  # token sets trained before the fused scorer
                for scorer in [x for x in scorers if x != "fused"]:
                    ea = EvalArgs(
                        model=args.model,
                        tokens=str(tok),
                        data=str(d / "test"),
                        scorer=scorer,
                        n_samples=args.n_samples,
                        to_keep=args.to_keep,
                        batch_rows=args.batch_rows,
                        device="cpu",
                    )
                    loaded = load_classifier(ea, bundle)
                    test = scan_folder(d / "test", min_classes=1)
                    r = evaluate(loaded, test, list(range(len(test))), 16, quiet=True)
                    truth = [f.split("/")[0] for f in r["files"]]
                    run["correct"][f"{name} ({scorer})"] = [
                        a == b for a, b in zip(r["predictions"], truth, strict=True)
                    ]
                    if "ece" in r:
                        run["ece"][f"{name} ({scorer})"] = r["ece"]
                if "fused" in scorers:
                    fused_variants(bundle, tok, d, run, name, args)
                if args.gen_n:
                    run["generation"][name] = generation_score(
                        bundle, tok, info["ref_x"], info["ref_y"], args.gen_n
                    )
            results["runs"].append(run)
            print(
                f"[{time.time() - t_start:.0f}s] {task} seed {seed}: "
                + ", ".join(f"{k} {np.mean(v):.2f}" for k, v in run["correct"].items()),
                flush=True,
            )
            (out / "results.json").write_text(json.dumps(results))
    print(report(results))


def openset_task(bundle, args, out: Path) -> None:
    """`--tasks openset`: benchmarks/openset.py's protocol and candidates (the one code path)
    at this run's shots, seeds, per-class, steps and gamma; its table is printed, its
    results go to OUT/openset/results.json."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
    from benchmarks import openset

    argv = ["--shots", str(args.shots), "--seeds", args.seeds, "--out", str(out / "openset")]
    argv += ["--per-class", str(args.per_class), "--steps", str(args.steps)]
    argv += ["--gamma", str(args.gamma)]
    print(openset.report(openset.run_all(bundle, openset.parser().parse_args(argv))), flush=True)


def fill_fused(bundle, tok: Path, d: Path) -> None:
    """The fused state of a token set saved before training wrote one, from its shots."""
    from mcti.core.fused import save_fused

    tokens, table, _, _ = load_tokens(tok, bundle)
    xtr, ytr = load_folder_pixels(d / "train", bundle.resolution)
    save_fused(tok, fit_for_tokens(bundle, tokens, table, xtr, ytr))


def fill_generation(bundle, out: Path) -> None:
    """Generation scores for every saved token set of a finished run that lacks one (the same
    reference images: write_task is deterministic in its seed)."""
    results = json.loads((out / "results.json").read_text())
    a = results["args"]
    n = a["gen_n"] or 4
    for run in results["runs"]:
        d = out / f"{run['task']}-seed{run['seed']}"
        info = write_task(
            run["task"], run["seed"], a["shots"], a["per_class"], bundle.resolution, d
        )
        for name in METHODS:
            tok = d / ("tok-" + name.replace(" ", "-"))
            if name not in run["generation"] and (tok / "classes.json").is_file():
                run["generation"][name] = generation_score(
                    bundle, tok, info["ref_x"], info["ref_y"], n
                )
        (out / "results.json").write_text(json.dumps(results))
    print(report(results))


def report(results: dict) -> str:
    from scipy.stats import ttest_rel

    lines = []
    for task in sorted({r["task"] for r in results["runs"]}, key=lambda t: list(TASKS).index(t)):
        runs = [r for r in results["runs"] if r["task"] == task]
        a = results["args"]
        n_test = len(next(iter(runs[0]["correct"].values())))
        lines += [
            f"\n**{task} concepts** ({runs[0]['classes']} classes, {a['shots']} shots, "
            f"{a['steps']} token steps, {len(runs)} shot seeds, {n_test} test images per seed)\n",
            "| method (scorer) | accuracy mean ± std | ECE (15 bins) | generation score |",
            "|---|---|---|---|",
        ]
        for key in runs[0]["correct"]:
            accs = [float(np.mean(r["correct"][key])) for r in runs]
            gen = [r["generation"].get(key.split(" (")[0]) for r in runs]
            g = (
                f"{np.mean(gen):.1%}"
                if all(x is not None for x in gen) and key.endswith("(diffusion)")
                else ""
            )
            eces = [r.get("ece", {}).get(key) for r in runs]
            e = f"{np.mean(eces):.3f}" if all(x is not None for x in eces) else ""
            lines.append(f"| {key} | {np.mean(accs):.1%} ± {np.std(accs):.1%} | {e} | {g} |")
        fused_keys = [k for k in runs[0]["correct"] if k.endswith("(fused)") or "cache" in k]
        refs = ("linear probe", "nearest class mean", "cache alone (fused without tokens)")
        for fk in fused_keys:
            mine = fk[: -len("(fused)")] if fk.endswith("(fused)") else None
            ablations = [
                mine + x
                for x in (
                    "fused without tokens (cache + diffusion)",
                    "fused without diffusion",
                    "fused before folds (in-sample token weight, shrink 0.5)",
                    "tokens alone (fused without cache)",
                    "diffusion part alone (on the cache's top m)",
                )
                if mine is not None
            ]
            for ref in refs + tuple(ablations):
                rk = next((k for k in runs[0]["correct"] if k.startswith(ref)), None)
                if rk is None or rk == fk or not all(rk in r["correct"] for r in runs):
                    continue
                ta = [float(np.mean(r["correct"][rk])) for r in runs]
                tb = [float(np.mean(r["correct"][fk])) for r in runs]
                pt = ttest_rel(tb, ta).pvalue if len(runs) > 1 else float("nan")
                pa = sum((r["correct"][rk] for r in runs), [])
                pb = sum((r["correct"][fk] for r in runs), [])
                lines.append(
                    f"\n{fk} - {rk}: {np.mean(tb) - np.mean(ta):+.1%} (paired t p = {pt:.3f}; McNemar p = {mcnemar_p(pb, pa):.3f})"
                )
        K = runs[0]["classes"]
        ref_rows = 50 * K + 500 * min(5, K)  # the Diffusion Classifier's 50,500 / 5,1
        for key in runs[0].get("cost", {}):
            rows = np.mean([r["cost"][key]["rows_per_image"] for r in runs])
            sec = [r["cost"][key].get("s_per_image") for r in runs]
            sec = f"{np.mean(sec):.3f} s/image (CPU, 1 thread), " if None not in sec else ""
            lines.append(
                f"\n{key}: {sec}{rows:.1f} UNet rows/image = {rows / ref_rows:.2%} of the "
                f"reference schedule 50,500 / 5,1 ({ref_rows} rows/image at {K} classes)"
            )
        for scorer in ("diffusion", "clip"):
            for mc in ("MC-TI denoise", "MC-TI clip"):
                a, b = f"TI ({scorer})", f"{mc} ({scorer})"
                if a in runs[0]["correct"] and b in runs[0]["correct"]:
                    ta = [float(np.mean(r["correct"][a])) for r in runs]
                    tb = [float(np.mean(r["correct"][b])) for r in runs]
                    pt = ttest_rel(tb, ta).pvalue if len(runs) > 1 else float("nan")
                    pooled_a = sum((r["correct"][a] for r in runs), [])
                    pooled_b = sum((r["correct"][b] for r in runs), [])
                    lines.append(
                        f"\n{b} - {a}: {np.mean(tb) - np.mean(ta):+.1%} (paired t-test over seeds p = {pt:.3f}; McNemar on pooled images p = {mcnemar_p(pooled_b, pooled_a):.3f})"
                    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
