"""Release tooling for the embedded model: measure a pretrained model's true-name accuracy and
ship it (model parts + pretrain.json with the measurements, MODEL_CARD.md, SHA256SUMS).

    python -m mcti.pretrain.release SRC DST [--per-class 20] [--notes TEXT]

SRC is an `mcti pretrain --out` directory; DST is replaced (e.g. mcti/assets/embedded-model).
"""

import argparse
import hashlib
import json
import shutil
from pathlib import Path

from mcti.atomic import atomic_write, atomic_write_json
from mcti.core.model import load_model
from mcti.data.offline import load_split
from mcti.eval.baselines import true_name_accuracy


def measure(
    model_dir: str | Path,
    per_class: int = 20,
    n_samples: str = "8,16,32",
    to_keep: str = "5,2,1",
    seed: int = 0,
    progress=None,
) -> dict:
    """True-name accuracy of a saved model on held-out images: seen classes (the quality bar)
    and, for information, novel classes (names never seen in pretraining)."""
    bundle = load_model(str(model_dir), device="cpu")
    info = json.loads((Path(model_dir) / "pretrain.json").read_text())
    splits = {ds: load_split(ds) for ds in info["args"]["datasets"].split(",")}
    kw = dict(n_samples=n_samples, to_keep=to_keep, seed=seed, progress=progress)
    return {
        "per_class": per_class,
        "schedule": {"n_samples": n_samples, "to_keep": to_keep},
        "seen": {
            "diffusion": true_name_accuracy(bundle, splits, per_class, "diffusion", **kw),
            "clip": true_name_accuracy(bundle, splits, per_class, "clip", progress=progress),
        },
        "novel": {
            "diffusion": true_name_accuracy(
                bundle, splits, per_class, "diffusion", classes="novel", **kw
            ),
            "clip": true_name_accuracy(bundle, splits, per_class, "clip", classes="novel"),
        },
    }


def sha256sums(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root except SHA256SUMS."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "SHA256SUMS"
    }


def write_sums(root: Path) -> None:
    text = "".join(f"{h}  {n}\n" for n, h in sha256sums(root).items())
    atomic_write(root / "SHA256SUMS", lambda tmp: Path(tmp).write_text(text))


MODEL_PARTS = ("model_index.json", "unet", "text_encoder", "tokenizer", "scheduler", "clip")


def ship(src: str | Path, dst: str | Path, measured: dict, notes: str = "") -> None:
    """Copy a pretrained model (parts + pretrain.json) to dst, with MODEL_CARD.md and
    SHA256SUMS; `measured` is what `measure` returned for it."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for p in MODEL_PARTS:
        (shutil.copytree if (src / p).is_dir() else shutil.copy2)(src / p, dst / p)
    info = json.loads((src / "pretrain.json").read_text())
    info["measured"] = measured
    atomic_write_json(dst / "pretrain.json", info)
    card = model_card(info, notes, sha256sums(dst))
    atomic_write(dst / "MODEL_CARD.md", lambda tmp: Path(tmp).write_text(card))
    write_sums(dst)


def model_card(info: dict, notes: str = "", sums: dict | None = None) -> str:
    a, t, m = info["args"], info["timing"], info["measured"]
    params = info["params"]
    n_total = sum(params.values())
    ds = a["datasets"].split(",")
    lines = [
        "# mcti embedded model",
        "",
        "A small model of the Stable Diffusion architecture, trained from scratch on this",
        "project's CPU by `mcti pretrain` (mcti/pretrain/), shipped so that `mcti demo` and",
        "`--model embedded` work offline. Pixel space (no VAE): "
        f"{a['resolution']}x{a['resolution']} RGB.",
        "",
        "## Parts and parameters",
        "",
        "| part | class | parameters |",
        "|---|---|---|",
        f"| unet/ | diffusers UNet2DConditionModel, channels {a['channels']}, cross-attention at every "
        f"resolution, pooled text added to the time embedding | {params['unet']:,} |",
        f"| text_encoder/ | transformers CLIPTextModel (= clip/'s text tower) | {params['text_encoder']:,} |",
        f"| clip/ | transformers CLIPModel: + ViT vision tower and projections | "
        f"{params['clip_vision+proj']:,} (besides the text tower) |",
        "| tokenizer/ | CLIPTokenizer, byte-level BPE: 256 bytes + caption words | - |",
        "| scheduler/ | DDPMScheduler, 1000 steps, linear betas 1e-4..0.02, epsilon | - |",
        "",
        f"Total distinct parameters: {n_total:,} ({n_total / 1e6:.2f} M).",
        "",
        "## Data (offline, public) and what is held out",
        "",
        f"Datasets: {', '.join(ds)} (see mcti/data/offline.py; split seed `mcti.data.offline.SPLIT_SEED`).",
        f"Concepts in pretraining ({len(info['concepts'])}): {', '.join(info['concepts'])}.",
        "",
        "Novel classes, never in pretraining (not even their names): "
        + "; ".join(f"{d}: {', '.join(v) or '-'}" for d, v in info["novel_classes"].items())
        + ".",
        "",
        "Held-out images of seen classes, never in pretraining: animal-mnist 200 per class "
        "(seeded), Fashion-MNIST its official test split (1000 per class), digits 50 per class "
        "(seeded). Every evaluation and the demo draw only from held-out images.",
        f"Pretraining images: {info['n_pretrain_images']:,}; concepts sampled uniformly.",
        "",
        "Captions name the concept the way web captions do: the 13 `mcti.core.tokens.TEMPLATES` and 5",
        "drawing-style templates ('a silhouette of a {}', ...), e.g. 'a photo of a sneaker'; "
        f"{a['generic_captions']:.0%} of captions use the generic word 'object' instead of the "
        f"name and {a['caption_dropout']:.0%} are empty (for classifier-free guidance).",
        "",
        "## Recipe",
        "",
        f"1. CLIP, contrastive: {a['clip_steps']} steps, batch {a['clip_batch_size']}, AdamW "
        f"lr {a['clip_lr']} cosine, soft targets (all captions of the same concept are positives).",
        f"2. Denoiser, text tower frozen: {info['steps_done']} steps, batch {a['batch_size']}, "
        f"AdamW lr {a['lr']} (200 warm-up steps, then constant), grad-clip 1, EMA "
        f"{a['ema']} (saved weights), uniform timesteps, epsilon loss; random horizontal flips "
        "(not for digits).",
        f"Seed {a['seed']}, torch threads {info['torch_threads']}, CPU.",
        "",
        f"Time: CLIP {t['clip_s'] / 60:.1f} min, denoiser {t['unet_s'] / 60:.1f} min, periodic "
        f"evaluation {t['eval_s'] / 60:.1f} min (one core of a shared 2-core machine).",
        "",
        "Reproduce (same seed and thread count):",
        "",
        "```",
        f"mcti pretrain --out DIR --steps {info['steps_done']} --seed {a['seed']} --threads 1",
        "```",
        "",
        "## Quality: true class names as prompts, held-out images",
        "",
        f"{m['per_class']} held-out images per class; each dataset's classes scored among "
        "themselves. Diffusion classifier: schedule n_samples "
        f"{m['schedule']['n_samples']} / to_keep {m['schedule']['to_keep']}.",
        "",
        "| classes | scorer | " + " | ".join(ds) + " | mean | pooled |",
        "|---|---|" + "---|" * (len(ds) + 2),
    ]
    for group in ("seen", "novel"):
        for scorer in ("diffusion", "clip"):
            r = m[group][scorer]
            cells = [f"{r[d]:.1%}" if d in r else "-" for d in ds]
            lines.append(
                f"| {group} | {scorer} | "
                + " | ".join(cells)
                + f" | {r['mean']:.1%} | {r['pooled']:.1%} |"
            )
    lines += [
        "",
        "Novel classes' names were never seen in pretraining, so their true-name numbers show",
        "what names alone cannot do; the few-shot method learns tokens for them from images.",
        "",
        "## Accuracy against pretraining time (periodic, cheap: 8 timesteps, few images)",
        "",
        "| denoiser step | minutes (CLIP + denoiser) | diffusion (seen, pooled) | clip (seen, pooled) |",
        "|---|---|---|---|",
    ]
    for c in info["curve"]:
        lines.append(
            f"| {c['step']} | {c['train_min']:.1f} | {c['diffusion']['pooled']:.1%} | {c['clip']['pooled']:.1%} |"
        )
    lines += ["", "## Files", "", "SHA256SUMS lists every file (this card included):", ""]
    lines += [f"- `{n}` sha256 `{h}`" for n, h in (sums or {}).items()]
    lines.append("")
    if notes:
        lines += ["## Notes", "", notes, ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m mcti.pretrain.release", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("src", help="a model directory written by `mcti pretrain`")
    p.add_argument("dst", help="where to ship it (replaced)")
    p.add_argument("--per-class", type=int, default=20, help="held-out images per class")
    p.add_argument("--n-samples", default="8,16,32")
    p.add_argument("--to-keep", default="5,2,1")
    p.add_argument("--notes", default="", help="a Notes section for the model card")
    args = p.parse_args(argv)
    if not (Path(args.src) / "pretrain.json").is_file():
        p.error(f"'{args.src}' has no pretrain.json: not a model written by `mcti pretrain`")
    measured = measure(args.src, args.per_class, args.n_samples, args.to_keep)
    ship(args.src, args.dst, measured, args.notes)
    print(f"shipped {args.src} to {args.dst} with MODEL_CARD.md and SHA256SUMS")


if __name__ == "__main__":
    main()
