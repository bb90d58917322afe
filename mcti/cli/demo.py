"""`mcti demo`: the main job, end to end, on this machine in minutes.

1. Writes held-out images of a real offline dataset (mcti.data.offline; never used in pretraining)
   as DIR/data/<opaque key>/<png>: the method sees keys like `c03`, never the class names.
2. Learns one token per class from 5 shots (`mcti.train.train`, MC-TI) on the embedded model.
3. Evaluates on the other held-out images with each scorer (diffusion; clip: the tokens alone;
   fused: the tokens plus a cache of the shots' image features, calibrated) and the cache alone,
   so the table says what each part adds; beside the reference a user would pick instead: a
   linear probe and the nearest class mean on the model's own CLIP image features of the same
   shots (a logistic regression on their raw pixels as an extra line) and, with --reference,
   the model's zero-shot accuracy when it *is* told the true class names (the only place names
   are used).
4. Writes the accuracy table, a confusion-matrix PNG, a grid of generated samples per class and
   summary.json, and says where they are.
"""

import time
from dataclasses import asdict
from pathlib import Path

from mcti.errors import UserError
from mcti.settings import DemoArgs, ObjectiveSettings, ScoreArgs, TrainArgs, part

__all__ = ["DemoArgs", "feature_references", "pixel_baseline", "run", "true_name_baseline"]


def _quick(a: DemoArgs) -> DemoArgs:
    a.eval_per_class, a.steps, a.samples_per_class, a.sample_steps = 4, 3, 2, 3
    a.n_samples, a.to_keep, a.negatives, a.draws = "2,4", "2,1", 1, 1
    return a


def _class_subset(split, quick: bool) -> list[int]:
    if not quick:
        return list(range(len(split.names)))
    return (split.seen[:2] + split.novel[:1]) if split.novel else split.seen[:3]


def pixel_baseline(data, shot_idx: list[int], eval_idx: list[int], size: int) -> float:
    """Logistic regression on raw pixels of the same shots: the simplest few-shot baseline."""
    from sklearn.linear_model import LogisticRegression

    from mcti.data.folders import load_images

    xs, ks = load_images(data, shot_idx, size, quiet=True)
    xe, ke = load_images(data, eval_idx, size, quiet=True)
    clf = LogisticRegression(max_iter=2000, C=1.0)
    clf.fit(xs.flatten(1).numpy(), [data.labels[i] for i in ks])
    pred = clf.predict(xe.flatten(1).numpy())
    return float((pred == [data.labels[i] for i in ke]).mean())


def feature_references(bundle, data, shot_idx: list[int], eval_idx: list[int], tokens) -> dict:
    """Accuracy on the eval images of the classifiers on the model's CLIP image features of the
    same shots: the linear probe and nearest class mean (mcti.eval.baselines, what a user would
    pick instead of tokens) and the fused scorer's cache alone (its tokens weighted 0), when the
    token directory has the fused state."""
    import torch

    from mcti.core.fused import has_fused, load_fused
    from mcti.core.store import read_meta
    from mcti.data.folders import load_images
    from mcti.eval.baselines import linear_probe, nearest_class_mean

    labels = list(read_meta(tokens)["classes"])  # the token set's class order
    xs, ks = load_images(data, shot_idx, bundle.resolution, quiet=True)  # (S, 3, H, W)
    xe, ke = load_images(data, eval_idx, bundle.resolution, quiet=True)  # (N, 3, H, W)
    ys = torch.tensor([labels.index(data.classes[data.labels[i]]) for i in ks])  # (S,)
    ye = torch.tensor([labels.index(data.classes[data.labels[i]]) for i in ke])  # (N,)
    with torch.no_grad():
        fs = bundle.clip_image_features(xs).float().cpu()  # (S, P)
        fe = bundle.clip_image_features(xe).float().cpu()  # (N, P)
    preds = {
        "probe": linear_probe(fs, ys, fe),
        "ncm": nearest_class_mean(fs, ys, fe, len(labels)),
    }
    if has_fused(tokens):
        preds["cache"] = load_fused(tokens, len(labels)).cache_logp(fe).argmax(1)
    return {k: round(float((p == ye).float().mean()), 4) for k, p in preds.items()}


def true_name_baseline(bundle, data, eval_idx, names: dict, a: DemoArgs) -> float:
    """Zero-shot accuracy when the model is given the true names (reference only)."""
    import torch

    from mcti.data.folders import load_images
    from mcti.eval.baselines import true_name_classifier

    clf = true_name_classifier(
        bundle,
        [names[c] for c in data.classes],
        "diffusion",
        n_samples=a.n_samples,
        to_keep=a.to_keep,
        seed=a.seed,
    )
    x, kept = load_images(data, eval_idx, bundle.resolution, quiet=True)
    truth = torch.tensor([data.labels[i] for i in kept])
    from tqdm import tqdm

    preds = [
        clf.score(x[i : i + 16]).ranking()[:, 0]
        for i in tqdm(range(0, len(x), 16), desc="true-name ref", unit="batch", dynamic_ncols=True)
    ]
    return float((torch.cat(preds) == truth).float().mean())


def samples_grid(bundle, tokens, table, classes, names, a: DemoArgs, path: Path) -> None:
    """One row per class: its opaque key (and true name for the reader), then samples."""
    import numpy as np
    from PIL import Image, ImageDraw
    from tqdm import tqdm

    from mcti.atomic import atomic_write
    from mcti.core.generate import generate, to_grid

    tile = 64
    rows = []
    for k in tqdm(range(len(classes)), desc="generate", unit="class", dynamic_ncols=True):
        imgs = generate(
            bundle,
            tokens,
            table,
            k,
            a.samples_per_class,
            steps=a.sample_steps,
            guidance=a.guidance,
            seed=a.seed + k,
        )
        g = to_grid(imgs, cols=a.samples_per_class, upscale_to=tile)
        label = Image.new("RGB", (120, g.height), "white")
        ImageDraw.Draw(label).text(
            (4, g.height // 2 - 10), f"{classes[k]}\n({names[classes[k]]})", fill="black"
        )
        row = Image.new("RGB", (label.width + g.width, g.height))
        row.paste(label, (0, 0))
        row.paste(g, (label.width, 0))
        rows.append(np.asarray(row))
    grid = Image.fromarray(np.concatenate(rows, 0))
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))


def run(a: DemoArgs) -> None:
    import shutil

    import torch

    from mcti.atomic import atomic_write_json
    from mcti.core.fused import has_fused
    from mcti.core.model import load_model
    from mcti.core.store import load_tokens
    from mcti.data.folders import scan_folder
    from mcti.data.offline import held_out_sample, load_split, write_folder
    from mcti.eval.evaluate import eval_indices, evaluate, load_classifier, plot_confusion
    from mcti.train.loop import train

    if a.quick:
        a = _quick(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        if not a.force:
            raise UserError(f"'{out}' is not empty: pass --force to overwrite or choose --out")
        for sub in ("data", "tokens"):
            shutil.rmtree(out / sub, ignore_errors=True)
    t0 = time.perf_counter()
    times = {}

    # 1. data: held-out images only, opaque keys
    split = load_split(a.dataset)
    classes = _class_subset(split, a.quick)
    idx = held_out_sample(split, classes, a.shots + a.eval_per_class, seed=a.seed)
    names = write_folder(split, idx, out / "data")
    data = scan_folder(out / "data")
    novel = {k for k, n in names.items() if split.names.index(n) in split.novel}
    print(
        f"[1/4] data: {len(data.classes)} classes of {a.dataset} ({len(novel)} never seen in "
        f"pretraining), {a.shots} shots + {a.eval_per_class} held-out test images each "
        f"-> {out / 'data'}"
    )
    bundle = load_model(a.model, a.device)
    times["data_s"] = time.perf_counter() - t0

    # 2. tokens
    print(
        f"[2/4] learning {len(data.classes)} class tokens ({a.method}, {a.shots} shots, {a.steps} steps)"
    )
    t = time.perf_counter()
    cfg = TrainArgs(
        **asdict(part(ObjectiveSettings, a)),  # method, reg, negatives, draws, gamma, ...
        model=a.model,
        device=a.device,
        data=str(out / "data"),
        out=str(out / "tokens"),
        shots=a.shots,
        steps=a.steps,
        batch_size=a.batch_size,
        lr=a.lr,
        seed=a.seed,
        save_every=a.steps,
    )
    p = train(cfg, bundle)
    times["train_s"] = time.perf_counter() - t

    # 3. evaluation
    print("[3/4] classifying held-out images")
    t = time.perf_counter()
    results = {}
    meta_files = set(p.shot_paths)
    eval_idx = None
    scorers = ["diffusion"]
    if bundle.clip is not None:  # clip: the tokens alone; fused: tokens + the shots' cache
        scorers += ["clip", "fused"] if has_fused(out / "tokens") else ["clip"]
    for scorer in scorers:
        sa = ScoreArgs(
            model=a.model,
            device=a.device,
            tokens=str(out / "tokens"),
            scorer=scorer,
            n_samples=a.n_samples,
            to_keep=a.to_keep,
            seed=a.seed,
        )
        loaded = load_classifier(sa, bundle)
        if eval_idx is None:
            eval_idx = eval_indices(data, loaded.meta, False, 0)
            assert not meta_files & {data.paths[i] for i in eval_idx}
        results[scorer] = evaluate(loaded, data, eval_idx, 16)
    shot_idx = [data.paths.index(s) for s in p.shot_paths]
    results["pixels_logreg"] = pixel_baseline(data, shot_idx, eval_idx, bundle.resolution)
    if bundle.clip is not None:
        results["features"] = feature_references(bundle, data, shot_idx, eval_idx, out / "tokens")
    if a.reference:
        results["true_names_zero_shot"] = true_name_baseline(bundle, data, eval_idx, names, a)
    times["eval_s"] = time.perf_counter() - t
    plot_confusion(
        results["diffusion"],
        out / "confusion.png",
        title=f"{a.dataset}, {a.shots}-shot {a.method}: diffusion scorer "
        f"{results['diffusion']['accuracy']:.1%} (n={results['diffusion']['n_images']})",
    )

    # 4. samples
    print("[4/4] drawing samples of each class with its learned token")
    t = time.perf_counter()
    tokens, table, labels, _ = load_tokens(out / "tokens", bundle)
    samples_grid(bundle, tokens, table, labels, names, a, out / "samples.png")
    times["generate_s"] = time.perf_counter() - t
    times["total_s"] = time.perf_counter() - t0

    _print_table(results, names, novel, a)
    features = results.get("features", {})
    summary = {
        "dataset": a.dataset,
        "model": a.model,
        "classes": names,
        "novel_classes": sorted(novel),
        "accuracy": results["diffusion"]["accuracy"],
        "per_class": results["diffusion"]["per_class"],
        "clip_accuracy": results.get("clip", {}).get("accuracy"),
        # what each part adds: the tokens alone (clip), the shots' cache alone, both (fused)
        "fused_accuracy": results.get("fused", {}).get("accuracy"),
        "fused_ece": results.get("fused", {}).get("ece"),
        "cache_accuracy": features.get("cache"),
        # the reference a user would pick instead: the model's own CLIP image features
        "linear_probe_accuracy": features.get("probe"),
        "nearest_class_mean_accuracy": features.get("ncm"),
        "pixels_logreg_accuracy": results["pixels_logreg"],
        "true_names_zero_shot_accuracy": results.get("true_names_zero_shot"),
        "n_eval_images": results["diffusion"]["n_images"],
        "seen_accuracy": _subset_acc(results["diffusion"], set(names) - novel),
        "novel_accuracy": _subset_acc(results["diffusion"], novel),
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "settings": asdict(a),
        "files": {
            "data": str(out / "data"),
            "tokens": str(out / "tokens"),
            "confusion": str(out / "confusion.png"),
            "samples": str(out / "samples.png"),
            "summary": str(out / "summary.json"),
        },
    }
    atomic_write_json(out / "summary.json", summary)
    print(f"\ndone in {times['total_s'] / 60:.1f} min. Files:")
    for k, v in summary["files"].items():
        print(f"  {k:<10} {v}")


def _subset_acc(result: dict, keys: set) -> float | None:
    hits = n = 0
    for f, pred in zip(result["files"], result["predictions"], strict=True):
        true = Path(f).parts[0]
        if true in keys:
            n += 1
            hits += pred == true
    return hits / n if n else None


def _print_table(results: dict, names: dict, novel: set, a: DemoArgs) -> None:
    d, c = results["diffusion"], results.get("clip")
    print(f"\n{'class':<6} {'(true name, for you)':<22} {'novel':<6} {'diffusion':>9} {'clip':>6}")
    for key in d["labels"]:
        cl = f"{c['per_class'].get(key, 0):>6.0%}" if c else ""
        print(
            f"{key:<6} {names[key]:<22} {'yes' if key in novel else '':<6} "
            f"{d['per_class'].get(key, 0):>9.0%} {cl}"
        )
    seen_acc, novel_acc = _subset_acc(d, set(names) - novel), _subset_acc(d, novel)
    print(f"\n{a.shots}-shot {a.method} tokens, no class names, {d['n_images']} held-out images:")
    print(
        f"  diffusion scorer      {d['accuracy']:.1%}"
        + (f"  (seen classes {seen_acc:.1%}" if seen_acc is not None else "")
        + (
            f", novel {novel_acc:.1%})"
            if novel_acc is not None
            else ")"
            if seen_acc is not None
            else ""
        )
    )
    f, feats = results.get("fused"), results.get("features", {})
    if c:
        print(f"  clip scorer           {c['accuracy']:.1%}  (the tokens alone)")
    if "cache" in feats:
        print(
            f"  cache alone           {feats['cache']:.1%}  (the shots' image features, no tokens)"
        )
    if f:
        adds = [f"ECE {f['ece']:.3f}"] if "ece" in f else []
        if "cache" in feats:
            adds.append(f"the tokens add {100 * (f['accuracy'] - feats['cache']):+.1f} points")
        if c:
            adds.append(f"the cache adds {100 * (f['accuracy'] - c['accuracy']):+.1f}")
        print(
            f"  fused scorer          {f['accuracy']:.1%}  (tokens + cache, calibrated; {', '.join(adds)})"
        )
    if feats:
        print("  reference, on the model's own CLIP image features of the same shots:")
        print(f"    linear probe        {feats['probe']:.1%}")
        print(f"    nearest class mean  {feats['ncm']:.1%}")
    print(
        f"  extra: logistic regression on the raw pixels of the same shots {results['pixels_logreg']:.1%}"
    )
    if "true_names_zero_shot" in results:
        print(
            f"  reference: zero-shot with the true class names {results['true_names_zero_shot']:.1%}"
        )
    print(f"  chance {1 / len(d['labels']):.1%}")
