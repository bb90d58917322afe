"""Diffusion-classifier speed: the reference loop vs our scorer, same model, images, grid, seeds.

(a) reference: what the Diffusion Classifier code does — one image at a time, per stage the rows
    (class x new t) in fixed batches of 32, latents repeated per row, unfused MSE;
(b) ours: `mcti.core.scoring.DiffusionScorer` — rows of several images batched together, noise
    indexed (not copied) by the fused error, conditioning computed once.
Checks that (b) predicts the same labels, reports the speed ratio and the time spent outside UNet
forward passes. With --tokens/--data it also reports accuracy, UNet rows and seconds per image for
exhaustive scoring, the reference's elimination schedule, ours and hybrid.

    python benchmarks/classify_speed.py                      # speed, tiny-random, K = 10 and 100
    python benchmarks/classify_speed.py --model embedded --tokens TOK --data DIR   # + accuracy
"""

import argparse
import json
import time

import torch

from mcti.core.diffusion import noised
from mcti.core.model import load_model
from mcti.core.scoring import DiffusionScorer, parse_schedule, timestep_grid
from mcti.core.tokens import TokenSet, TokenTable


class UNetTimer:
    """Wraps unet.forward to add up the seconds spent inside it."""

    def __init__(self, unet):
        self.unet, self.seconds, self.rows = unet, 0.0, 0
        self._forward = unet.forward

        def timed(*a, **k):
            t0 = time.perf_counter()
            out = self._forward(*a, **k)
            self.seconds += time.perf_counter() - t0
            self.rows += len(a[0])
            return out

        unet.forward = timed

    def reset(self):
        self.seconds, self.rows = 0.0, 0


@torch.no_grad()
def reference_classify(bundle, cond, x0, n_samples, to_keep, seed):
    """Port of the Diffusion Classifier's eval_prob_adaptive (one image at a time)."""
    T = bundle.num_train_timesteps
    grid = timestep_grid(n_samples[-1], T)
    N = len(grid)
    noise = torch.randn(N, *x0.shape[1:], generator=torch.Generator().manual_seed(seed))
    preds = []
    for latent in x0:
        remaining = list(range(len(cond)))
        data = {k: [] for k in remaining}
        evaluated: set[int] = set()
        for n, keep in zip(n_samples, to_keep, strict=True):
            ids = [j for j in list(range(N))[N // n // 2 :: N // n][:n] if j not in evaluated]
            evaluated |= set(ids)
            rows = [(k, j) for k in remaining for j in ids]
            errs = []
            for i in range(0, len(rows), 32):
                chunk = rows[i : i + 32]
                t = torch.tensor([grid[j] for _, j in chunk])
                eps = noise[[j for _, j in chunk]]
                x_t, target = noised(bundle, latent.repeat(len(chunk), 1, 1, 1), t, eps)
                c = cond[[k for k, _ in chunk]]
                pred = bundle.unet(x_t, t, encoder_hidden_states=c).sample
                errs.append(
                    torch.nn.functional.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
                )
            errs = torch.cat(errs) if errs else torch.zeros(0)
            for (k, _), e in zip(rows, errs.tolist(), strict=True):
                data[k].append(e)
            means = torch.tensor([sum(data[k]) / len(data[k]) for k in remaining])
            best = means.topk(min(keep, len(remaining)), largest=False).indices.tolist()
            remaining = [remaining[i] for i in best]
        preds.append(remaining[0])
    return torch.tensor(preds)


def speed(args, K: int, n_samples: str, to_keep: str) -> dict:
    bundle = load_model(args.model, device=args.device)
    timer = UNetTimer(bundle.unet)
    tokens = TokenSet(bundle, K)
    table = TokenTable(K, 1, tokens.init_vector("object"))
    with torch.no_grad():
        table.vectors.normal_(std=1.0, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    pixels = torch.rand(args.images, 3, bundle.resolution, bundle.resolution, generator=gen) * 2 - 1
    x0 = bundle.encode_images(pixels)
    ns, tk = parse_schedule(n_samples, to_keep, K)

    cond = tokens.class_conditioning(table)
    timer.reset()
    t0 = time.perf_counter()
    ref = reference_classify(bundle, cond, x0, ns, tk, seed=0)
    ref_s, ref_unet, ref_rows = time.perf_counter() - t0, timer.seconds, timer.rows

    scorer = DiffusionScorer(bundle, tokens, table, ns, tk, batch_rows=args.batch_rows, seed=0)
    timer.reset()
    t0 = time.perf_counter()
    preds = torch.cat(
        [
            scorer.score_latents(x0[i : i + args.batch_images]).ranking()[:, 0]
            for i in range(0, len(x0), args.batch_images)
        ]
    )
    ours_s, ours_unet, ours_rows = time.perf_counter() - t0, timer.seconds, timer.rows
    return {
        "K": K,
        "schedule": f"{n_samples} / {to_keep}",
        "images": args.images,
        "same_labels": bool(torch.equal(preds, ref)),
        "reference_s_per_image": ref_s / args.images,
        "ours_s_per_image": ours_s / args.images,
        "speedup": ref_s / ours_s,
        "rows_per_image": ours_rows / args.images,
        "reference_rows_per_image": ref_rows / args.images,
        "reference_outside_unet": 1 - ref_unet / ref_s,
        "ours_outside_unet": 1 - ours_unet / ours_s,
    }


def accuracy(args) -> list[dict]:
    from mcti.data.folders import scan_folder
    from mcti.eval.evaluate import eval_indices, evaluate, load_classifier
    from mcti.settings import EvalArgs

    rows = []
    data = scan_folder(args.data, min_classes=1)
    settings = [
        ("exhaustive", "diffusion", args.exhaustive, "1"),
        ("reference schedule", "diffusion", args.ref_n_samples, args.ref_to_keep),
        ("ours", "diffusion", args.n_samples, args.to_keep),
        ("hybrid", "hybrid", args.n_samples, args.to_keep),
        ("clip", "clip", "1", "1"),
    ]
    for name, scorer, ns, tk in settings:
        a = EvalArgs(
            model=args.model,
            device=args.device,
            tokens=args.tokens,
            data=args.data,
            scorer=scorer,
            n_samples=ns,
            to_keep=tk,
            batch_rows=args.batch_rows,
            batch_images=args.batch_images,
            limit=args.limit,
            hybrid_m=args.hybrid_m,
        )
        try:
            loaded = load_classifier(a)
        except Exception as e:  # e.g. no CLIP tower for clip/hybrid
            rows.append({"setting": name, "error": str(e)})
            continue
        r = evaluate(
            loaded,
            data,
            eval_indices(data, loaded.meta, False, args.limit),
            args.batch_images,
            quiet=True,
        )
        rows.append(
            {
                "setting": name,
                "schedule": f"{ns} / {tk}" if scorer != "clip" else "-",
                "accuracy": r["accuracy"],
                "rows_per_image": r["unet_rows_per_image"],
                "s_per_image": 1 / r["images_per_s"],
                "n_images": r["n_images"],
            }
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-random")
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=8, help="images per speed run")
    p.add_argument("--batch-images", type=int, default=8)
    p.add_argument("--batch-rows", type=int, default=256)
    p.add_argument("--tokens", help="token dir for the accuracy table")
    p.add_argument("--data", help="labelled image folder for the accuracy table")
    p.add_argument("--limit", type=int, default=20, help="images per class for accuracy")
    p.add_argument("--exhaustive", default="32", help="timesteps for exhaustive scoring")
    p.add_argument("--ref-n-samples", default="8,16,32")
    p.add_argument("--ref-to-keep", default="5,2,1")
    p.add_argument("--n-samples", default="4,8,16")
    p.add_argument("--to-keep", default="3,2,1")
    p.add_argument("--hybrid-m", type=int, default=3)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    out = {"speed": [], "accuracy": []}
    if not args.skip_speed:
        out["speed"] = [speed(args, 10, "4,8,16", "5,2,1"), speed(args, 100, "2,4,8", "20,5,1")]
    if args.tokens and args.data:
        out["accuracy"] = accuracy(args)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for r in out["speed"]:
        print(
            f"K={r['K']:<4} schedule {r['schedule']:<16} same labels: {r['same_labels']}  "
            f"reference {r['reference_s_per_image']:.3f} s/img  ours {r['ours_s_per_image']:.3f} s/img  "
            f"speedup x{r['speedup']:.2f}  rows/img {r['rows_per_image']:.0f}  "
            f"outside UNet: reference {r['reference_outside_unet']:.1%}, ours {r['ours_outside_unet']:.1%}"
        )
    for r in out["accuracy"]:
        if "error" in r:
            print(f"{r['setting']:<20} skipped: {r['error']}")
        else:
            print(
                f"{r['setting']:<20} {r['schedule']:<16} accuracy {r['accuracy']:.1%}  rows/img {r['rows_per_image']:.0f}  {r['s_per_image']:.3f} s/img  (n={r['n_images']})"
            )


if __name__ == "__main__":
    main()
