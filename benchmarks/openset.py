"""Open set on the embedded model: does a rejection score tell known classes from unknown ones?

For each dataset D (animal-mnist, fashion-mnist), shot count and seed: the seen classes of D are
known: `--shots` training images each (from the held-out split, so never pretrained on) and
`--per-class` disjoint test images. Unknown: held-out images of D's novel classes ("near") and
of the other dataset ("far"). MC-TI clip tokens are trained on the shots; every candidate score
of mcti.core.openset (the clip scorer's msp/margin, the CLIP-feature ncm/knn/mahalanobis) and
the linear probe's max softmax are measured: AUROC and FPR at 95% known recall (known vs near
+ far unknowns), and the `auto` threshold's known recall on the test images vs its target.
`ncm` is the nearest-class-mean baseline itself. Writes OUT/results.json and prints a table,
then each candidate's AUROC minus the default's and the best baseline's, paired over runs.

`--extra` adds the second round's candidates, scores carrying what the 64-d CLIP feature may
lack: `combos` (relative Mahalanobis on the vision tower's hidden states and on raw pixels; the
tokens' text cosine; sums and minima of these z-scored on the shots), `augment` (6 views per
shot; flip-averaged features), `diffusion` (the image's denoising error under its top classes'
tokens, z-scored against each class's error on its own shots, raw and relative to the empty
prompt: the Diffusion Classifier's scorer on a fixed grid; `--diffusion-per-class` limits it
to the first N test images of each class, and every score is then also reported on that subset).
`benchmarks/accuracy.py --tasks openset` runs the same protocol (`run_all`).

    nice python benchmarks/openset.py --shots 5 --seeds 0,1,2 --out runs/openset
    nice python benchmarks/openset.py --shots 5 --seeds 0,1 --extra combos,augment,diffusion \
        --diffusion-per-class 20 --out runs/openset

Over 400 lines: the protocol and every candidate measured under it, side by side in one run.
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
    leave_one_out,
    relative_mahalanobis,
)
from mcti.core.scoring import DiffusionScorer, parse_schedule
from mcti.core.store import load_tokens
from mcti.errors import UserError
from mcti.eval.baselines import PROBE_C, split_pixels
from mcti.eval.evaluate import load_classifier, score_all
from mcti.settings import ScoreArgs, TrainArgs
from mcti.train.loop import train

OTHER = {"animal-mnist": "fashion-mnist", "fashion-mnist": "animal-mnist"}
# separation ratio of the embedded model's timestep bands (t in 0-200, ..., 800-1000), measured
# by mcti.core.diffusion.separation_by_t (RESULTS.md, "UNet rows per image"): the fixed grid of
# the diffusion-error scores sits where the classes differ
BAND_WEIGHTS = torch.tensor([0.52, 0.58, 0.31, 0.40, 0.08])


def write_shots(split, idx: np.ndarray, root: Path) -> None:
    for i in idx.tolist():
        d = root / f"k{split.seen.index(int(split.labels[i])):02d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(split.images[i]).convert("RGB").save(d / f"{i:05d}.png")


def probe_msp(train_f, train_y, test_f) -> torch.Tensor:
    from sklearn.linear_model import LogisticRegression

    probe = LogisticRegression(max_iter=2000, C=PROBE_C).fit(train_f.numpy(), train_y.numpy())
    return torch.from_numpy(probe.predict_proba(test_f.numpy()).max(1))


def chunked(fn, x: torch.Tensor, n: int = 64) -> torch.Tensor:
    return torch.cat([fn(x[i : i + n]).cpu() for i in range(0, len(x), n)])


@torch.no_grad()
def hidden_features(bundle, x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, L * D): each vision-tower layer's output, mean-pooled over tokens and
    L2-normalised, concatenated (caught with hooks on the one CLIP path, preprocessing and all)."""
    caught = []
    layers = bundle.clip.vision_model.encoder.layers
    hooks = [
        layer.register_forward_hook(
            lambda m, i, o: caught.append(o[0] if isinstance(o, tuple) else o)
        )
        for layer in layers
    ]
    try:
        bundle.clip_image_features(x)
    finally:
        for h in hooks:
            h.remove()
    parts = [torch.nn.functional.normalize(h.mean(1).float(), dim=-1) for h in caught]
    return torch.nn.functional.normalize(torch.cat(parts, 1), dim=-1).cpu()


def representations(bundle, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The images in three feature spaces: CLIP image feature (64-d), vision-tower hidden
    states, raw pixels at model resolution (L2-normalised)."""
    return {
        "clip": chunked(bundle.clip_image_features, x),
        "hidden": chunked(lambda c: hidden_features(bundle, c), x),
        "pixels": torch.nn.functional.normalize(x.flatten(1), dim=-1),
    }


@torch.no_grad()
def diffusion_errors(bundle, tok: Path, x: torch.Tensor, top: torch.Tensor, n_t: int):
    """(N, K + 1) mean denoising errors of images x under the classes `top` (N, m) and the
    empty prompt (column K; +inf where not run), on one fixed (t, eps) grid of n_t timesteps
    drawn from BAND_WEIGHTS: the Diffusion Classifier's scorer restricted to those candidates.
    Returns the errors and the UNet rows run."""
    tokens, table, _, _ = load_tokens(tok, bundle)
    cond = tokens.class_conditioning(table)  # (K, L, d)
    null = tokens.encode(None, [""])[0]  # (1, L, d)
    K = len(cond)
    scorer = DiffusionScorer.from_conditioning(
        bundle,
        torch.cat([cond, null]),
        parse_schedule([n_t], [1], K + 1),
        batch_rows=256,
        t_weights=BAND_WEIGHTS,
    )
    cand = torch.cat([top, torch.full((len(top), 1), K)], 1)  # (N, m + 1)
    sc = scorer.score_latents(bundle.encode_images(x), candidates=cand)
    return -sc.scores, sc.unet_rows


def diffusion_scores(err: torch.Tensor, top: torch.Tensor, shot_err: torch.Tensor, y_shot):
    """Known-ness from errors: max over the image's top classes of minus the z-score of its
    error relative to that class's typical error on its own shots (log errors; one pooled
    within-class spread). `diff_z`: the raw error; `diff_rel_z`: relative to the empty
    prompt's error (log ratio), which removes how hard the image is to denoise at all."""
    K = err.shape[1] - 1
    out = {}
    for name, e, e_shot in (
        ("diff_z", err[:, :K].log(), shot_err[:, :K].log()),
        ("diff_rel_z", (err[:, :K] / err[:, K:]).log(), (shot_err[:, :K] / shot_err[:, K:]).log()),
    ):
        own = e_shot.gather(1, y_shot.view(-1, 1)).squeeze(1)  # (S,)
        counts = torch.bincount(y_shot, minlength=K).clamp(min=1)
        mu = torch.zeros(K).index_add_(0, y_shot, own) / counts  # (K,)
        sd = (own - mu[y_shot]).std().clamp(min=1e-6)
        z = (e.gather(1, top) - mu[top]) / sd  # (N, m)
        out[name] = -z.min(1).values
    return out


def views(x: torch.Tensor) -> list[torch.Tensor]:
    """x and 5 light augmentations of it: its mirror image, 1-pixel shifts up/down/left/right
    (the border is background, so rolling is a shift)."""
    return [x, x.flip(-1)] + [x.roll(d, dims=a) for a in (-2, -1) for d in (-1, 1)]


def augmented_candidates(bundle, ref: Reference, xs) -> dict:
    """Relative Mahalanobis and knn with 6 views per shot (more samples for the class means and
    the shared covariance than 5 shots give), and with flip test-time averaging."""
    x_shot, x_known, x_unknown = xs
    clip = bundle.clip_image_features
    vs = views(x_shot)
    aref = Reference(
        torch.cat([chunked(clip, v) for v in vs]), ref.labels.repeat(len(vs)), ref.num_classes
    )
    f_k, f_u = chunked(clip, x_known), chunked(clip, x_unknown)

    def tta(x):
        return torch.nn.functional.normalize(chunked(clip, x) + chunked(clip, x.flip(-1)), dim=-1)

    tref = Reference(tta(x_shot), ref.labels, ref.num_classes)
    return {
        "rel. maha, 6 views per shot": tuple(
            relative_mahalanobis(Evidence(features=f), aref) for f in (f_k, f_u)
        ),
        "knn, 6 views per shot": tuple(
            REJECT_SCORES["knn"](Evidence(features=f), aref) for f in (f_k, f_u)
        ),
        "rel. maha, flip-averaged": tuple(
            relative_mahalanobis(Evidence(features=tta(x)), tref) for x in (x_known, x_unknown)
        ),
    }


def zscore_on(shots: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x standardised by the mean and spread of the same score on the shots."""
    return (x - shots.mean()) / shots.std().clamp(min=1e-12)


def first_per_class(labels: np.ndarray, n: int) -> torch.Tensor:
    """(N,) bool: the first n images of each label."""
    seen: dict = {}
    keep = []
    for y in labels.tolist():
        seen[y] = seen.get(y, 0) + 1
        keep.append(seen[y] <= n)
    return torch.tensor(keep)


def extra_candidates(bundle, tok, loaded, extra, args, ref, xs, sub, run) -> dict:
    """The second round's candidates (name -> (known, unknown) scores; NaN where not run):
    relative Mahalanobis on other representations, the tokens' text-side cosine, the
    diffusion-error scores, and sums / minima of them z-scored on the shots (leave-one-out
    for the feature scores; in-sample for the tokens' scores, which were fit on the shots)."""
    x_shot, x_known, x_unknown = xs
    y, K = ref.labels, ref.num_classes
    parts = {}  # name -> (shot scores for the z-scoring, known, unknown)
    out = {}
    if "combos" in extra:
        reps = [representations(bundle, x) for x in xs]
        for r in ("clip", "hidden", "pixels"):
            rref = Reference(reps[0][r], y, K)
            k, u = (relative_mahalanobis(Evidence(features=f[r]), rref) for f in reps[1:])
            parts[r] = (leave_one_out("relative_mahalanobis", rref), k, u)
        sc = [score_all(loaded, x, 64, quiet=True).scores.max(1).values for x in xs]
        parts["text"] = tuple(sc)  # the tokens' CLIP text cosine of the best class
        out |= {"rel. maha hidden": parts["hidden"][1:], "rel. maha pixels": parts["pixels"][1:]}
        out["text cosine"] = parts["text"][1:]
    if "augment" in extra:
        out |= augmented_candidates(bundle, ref, xs)
    if "diffusion" in extra:
        nan_k, nan_u = (
            torch.full((len(x_known),), torch.nan),
            torch.full((len(x_unknown),), torch.nan),
        )
        x_sub = torch.cat([x_known[sub[0]], x_unknown[sub[1]]])
        f_sub = bundle.clip_image_features(x_sub).cpu()
        top = (f_sub @ ref.means().T).topk(min(args.diffusion_top, K), dim=1).indices  # (n, m)
        t0 = time.time()
        shot_err, shot_rows = diffusion_errors(bundle, tok, x_shot, y.view(-1, 1), args.diffusion_t)
        t1 = time.time()
        err, rows = diffusion_errors(bundle, tok, x_sub, top, args.diffusion_t)
        run["diffusion"] = {
            "rows_per_image": rows / len(x_sub),
            "s_per_image": (time.time() - t1) / len(x_sub),
            "shot_rows": shot_rows,
            "shot_seconds": round(t1 - t0, 1),
            "timesteps": args.diffusion_t,
            "top": args.diffusion_top,
        }
        on_shots = diffusion_scores(shot_err, y.view(-1, 1), shot_err, y)
        n_k = int(sub[0].sum())
        for name, v in diffusion_scores(err, top, shot_err, y).items():
            k, u = nan_k.clone(), nan_u.clone()
            k[sub[0]], u[sub[1]] = v[:n_k], v[n_k:]
            parts[name] = (on_shots[name], k, u)
            out[name] = (k, u)
    if "clip" not in parts:  # the default's own leave-one-out scores
        parts["clip"] = (
            leave_one_out("relative_mahalanobis", ref),
            *default_scores(ref, xs, bundle),
        )
    z = {n: (zscore_on(p[0], p[1]), zscore_on(p[0], p[2])) for n, p in parts.items()}
    combos = [
        ("clip", "hidden"),
        ("clip", "pixels"),
        ("clip", "hidden", "pixels"),
        ("clip", "text"),
    ]
    combos += [("clip", "diff_z"), ("clip", "diff_rel_z"), ("clip", "hidden", "diff_rel_z")]
    for c in combos:
        if all(n in z for n in c):
            out["z sum " + "+".join(c)] = tuple(sum(z[n][i] for n in c) for i in (0, 1))
            out["z min " + "+".join(c)] = tuple(
                torch.stack([z[n][i] for n in c]).min(0).values for i in (0, 1)
            )
    return out


def default_scores(ref, xs, bundle) -> tuple[torch.Tensor, ...]:
    """The default score (relative Mahalanobis on CLIP features) of the known and unknown images."""
    feats = (bundle.clip_image_features(x).cpu() for x in xs[1:])
    return tuple(relative_mahalanobis(Evidence(features=f), ref) for f in feats)


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
    extra = [e for e in args.extra.split(",") if e]
    sub = None  # (known, unknown) masks of the images the diffusion scores ran on
    if extra:
        t0 = time.time()
        n_sub = args.diffusion_per_class or args.per_class
        sub = (
            first_per_class(s.labels[test_idx], n_sub),
            torch.cat(
                [
                    first_per_class(s.labels[near], n_sub),
                    torch.arange(len(far)) < n_sub * len(s.novel),
                ]
            ),
        )
        xs = (x_shot, x_known, x_unknown)
        more = extra_candidates(bundle, tok, loaded, extra, args, ref, xs, sub, run)
        candidates.update(more)
        run["extra_seconds"] = round(time.time() - t0, 1)
    for name, (k, u) in candidates.items():
        m = run["scores"][name] = {}
        if not (k.isnan().any() or u.isnan().any()):  # the diffusion scores: the subset only
            m["auroc"], m["fpr_at_95"] = auroc(k, u), fpr_at_recall(k, u, 0.95)
            m["auroc_near"], m["auroc_far"] = auroc(k, u[:n_near]), auroc(k, u[n_near:])
        if sub is not None:  # every score on the diffusion subset too: paired with it
            ks, us = k[sub[0]], u[sub[1]]
            m["auroc_sub"] = auroc(ks, us)
            m["auroc_sub_near"] = auroc(ks, u[:n_near][sub[1][:n_near]])
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


def paired(results: dict, key: str = "auroc") -> list[str]:
    """Per shot count: each candidate's AUROC minus the default's and minus the best baseline's
    (nearest class mean, probe max softmax), paired over the runs (dataset x seed): mean, min and
    max. The subset AUROC (`auroc_sub`) where a candidate ran on the diffusion subset only."""
    base = ("ncm", "probe msp (baseline)")
    lines = [
        "| shots | score | runs | vs default: mean (min, max) | vs best baseline: mean (min, max) |"
    ]
    lines.append("|---|---|---|---|---|")
    by_shots: dict = {}
    for r in results["runs"]:
        by_shots.setdefault(r["shots"], []).append(r["scores"])
    for shots, runs in sorted(by_shots.items()):
        for name in dict.fromkeys(n for sc in runs for n in sc):
            runs_n = [sc for sc in runs if name in sc]
            k = key if all(key in sc[name] for sc in runs_n) else "auroc_sub"
            if any(k not in sc[name] or k not in sc[DEFAULT_SCORE] for sc in runs_n):
                continue
            d = np.array([sc[name][k] - sc[DEFAULT_SCORE][k] for sc in runs_n])
            b = np.array([sc[name][k] - max(sc[x][k] for x in base) for sc in runs_n])
            lines.append(
                f"| {shots} | {name}{' (subset)' if k != key else ''} | {len(runs_n)} | "
                f"{d.mean():+.3f} ({d.min():+.3f}, {d.max():+.3f}) | "
                f"{b.mean():+.3f} ({b.min():+.3f}, {b.max():+.3f}) |"
            )
    return lines


def report(results: dict) -> str:
    rows = {}
    for r in results["runs"]:
        for name, m in r["scores"].items():
            rows.setdefault((r["dataset"], r["shots"], name), []).append(m)
    lines = [
        "| dataset | shots | score | AUROC | near | far | FPR@95 | auto known recall "
        "| AUROC (diffusion subset) | near (subset) |",
        "|---|---|---|---|---|---|---|---|---|---|",
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
            f"{ms_('auroc_far')} | {ms_('fpr_at_95')} | {ms_('auto_known_recall')} | "
            f"{ms_('auroc_sub')} | {ms_('auroc_sub_near')} |"
        )
    lines += ["", *paired(results)]
    for r in results["runs"]:
        if "diffusion" in r:
            d = r["diffusion"]
            lines.append(
                f"diffusion {r['dataset']} {r['shots']} shots seed {r['seed']}: "
                f"{d['rows_per_image']:.1f} UNet rows/image, {d['s_per_image']:.3f} s/image, "
                f"shots {d['shot_rows']} rows / {d['shot_seconds']} s"
            )
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="animal-mnist,fashion-mnist")
    p.add_argument("--shots", default="5")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--per-class", type=int, default=40)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--gamma", type=float, default=0.1)
    p.add_argument("--known-recall", type=float, default=0.95)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--extra",
        default="",
        help="more candidates (comma-separated): combos (other representations, the tokens' "
        "text cosine, z-scored sums), augment (augmented shots, flip averaging), diffusion "
        "(diffusion-error z-scores)",
    )
    p.add_argument("--diffusion-t", type=int, default=8, help="timesteps of the fixed grid")
    p.add_argument("--diffusion-top", type=int, default=2, help="classes scored per image")
    p.add_argument(
        "--diffusion-per-class",
        type=int,
        default=0,
        help="score diffusion on the first N test images of each class only (0: all)",
    )
    p.add_argument("--out", default="runs/openset")
    p.add_argument("--report-only", action="store_true")
    return p


def run_all(bundle, args: argparse.Namespace) -> dict:
    """Every (shots, dataset, seed) run of `args` (parser()'s options); OUT/results.json is
    rewritten after each. `benchmarks/accuracy.py --tasks openset` runs this too."""
    from mcti.data.offline import load_split

    out = Path(args.out)
    splits = {d: load_split(d) for d in OTHER}
    results = {"args": vars(args), "runs": []}
    t0 = time.time()
    for shots in [int(x) for x in str(args.shots).split(",")]:
        for ds in args.datasets.split(","):
            for seed in [int(x) for x in str(args.seeds).split(",")]:
                results["runs"].append(one_run(bundle, splits, ds, shots, seed, args, out))
                results["seconds"] = round(time.time() - t0, 1)
                out.mkdir(parents=True, exist_ok=True)
                (out / "results.json").write_text(json.dumps(results, indent=1))
                print(f"done {ds} {shots} shots seed {seed} ({results['seconds']} s)", flush=True)
    return results


def main() -> None:
    args = parser().parse_args()
    if args.report_only:  # --out A,B: the runs of several results together
        runs = [json.loads((Path(o) / "results.json").read_text()) for o in args.out.split(",")]
        print(report({"runs": [r for res in runs for r in res["runs"]]}))
        return
    torch.set_num_threads(args.threads)
    print(report(run_all(load_model("embedded", device="cpu"), args)))


if __name__ == "__main__":
    main()
