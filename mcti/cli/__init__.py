"""`mcti` command line: train, eval, classify, generate (and demo/pretrain/serve when present).

User mistakes print one line `mcti: error: ...` and exit 2; nothing is left half-written.
"""

import argparse
import json
import os
import sys
import warnings

from mcti.cli.args import add_dataclass_args, to_dataclass
from mcti.errors import UserError
from mcti.settings import ClassifyArgs, EvalArgs, GenerateArgs, TrainArgs


def cmd_train(a: TrainArgs) -> None:
    if a.nproc > 1:  # one-machine shortcut for the DeepSpeed data-parallel trainer
        from training.launch import launch_local

        launch_local(a)
        return
    from mcti.train.loop import train

    p = train(a)
    print(
        f"wrote {len(p.data.classes)} class tokens to {a.out}/learned_embeds.safetensors and {a.out}/classes.json"
    )


def cmd_eval(a: EvalArgs) -> None:
    from mcti.data.coop import open_dataset
    from mcti.eval.evaluate import eval_indices, evaluate, load_classifier, plot_confusion

    data = open_dataset(a.data, "test", min_classes=1)
    loaded = load_classifier(a)
    idx = eval_indices(data, loaded.meta, a.include_train, a.limit)
    r = evaluate(loaded, data, idx, a.batch_images, quiet=a.json)
    if a.plot:
        plot_confusion(r, a.plot)
    if a.json:
        print(json.dumps({k: v for k, v in r.items() if k not in ("files", "predictions")}))
        return
    print(f"\n{'label':<24} {'accuracy':>9} {'n':>5}")
    for label, acc in r["per_class"].items():
        print(f"{label:<24} {acc:>9.1%} {r['per_class_n'][label]:>5}")
    line = f"\naccuracy {r['accuracy']:.1%} on {r['n_images']} images ({r['scorer']} scorer)"
    if "top5" in r:
        line += f", top-5 {r['top5']:.1%}"
    print(
        line + f"; {r['images_per_s']:.2f} images/s, {r['unet_rows_per_image']:.0f} UNet rows/image"
    )
    if r["n_skipped"]:
        print(f"skipped {r['n_skipped']} unreadable file(s)")
    if a.plot:
        print(f"confusion matrix: {a.plot}")


def cmd_classify(a: ClassifyArgs) -> None:
    import torch

    from mcti.data.images import load_image
    from mcti.eval.evaluate import load_classifier, score_all

    if a.top_k < 1:
        raise UserError("--top-k must be >= 1")
    loaded = load_classifier(a)
    pixels = []
    for path in a.images:
        try:
            pixels.append(load_image(path, loaded.bundle.resolution))
        except FileNotFoundError as e:
            raise UserError(f"no such image file: {path}") from e
        except Exception as e:
            raise UserError(f"cannot read image '{path}': {e}") from e
    s = score_all(loaded, torch.stack(pixels), a.batch_images, desc="classify", quiet=True)
    idx, scores = s.topk(a.top_k)
    results = [
        {
            "image": path,
            "labels": [loaded.labels[j] for j in idx[i].tolist()],
            "scores": [round(float(x), 6) for x in scores[i]],
        }
        for i, path in enumerate(a.images)
    ]
    if a.json:
        print(json.dumps(results))
        return
    for r in results:
        best = ", ".join(
            f"{lab} ({sc:.4g})" for lab, sc in zip(r["labels"], r["scores"], strict=True)
        )
        print(f"{r['image']}: {best}")


def cmd_generate(a: GenerateArgs) -> None:
    from tqdm import tqdm

    from mcti.atomic import atomic_write
    from mcti.core.generate import generate, to_grid
    from mcti.core.model import load_model
    from mcti.core.store import label_index, load_tokens, read_meta

    if a.n < 1 or a.steps < 1:
        raise UserError("--n and --steps must be >= 1")
    if "{}" not in a.prompt:
        raise UserError("--prompt must contain {} where the class token goes")
    spec = a.model or read_meta(a.tokens)["base_model"]["spec"]
    bundle = load_model(spec, a.device, a.precision, a.attention, a.clip)
    tokens, table, labels, _ = load_tokens(a.tokens, bundle)
    k = label_index(labels, a.label)
    images = generate(
        bundle,
        tokens,
        table,
        k,
        a.n,
        a.prompt,
        a.steps,
        a.guidance,
        a.seed,
        progress=lambda it: tqdm(it, desc="sample", unit="step"),
    )
    grid = to_grid(images, upscale_to=128)
    atomic_write(a.out, lambda tmp: grid.save(tmp, format="PNG"))
    print(f"wrote {a.n} images of '{a.label}' to {a.out}")


COMMANDS = {
    "train": (TrainArgs, cmd_train, "learn one token per class from DATA/<label>/<image>"),
    "eval": (EvalArgs, cmd_eval, "accuracy of a token set on a labelled image folder"),
    "classify": (ClassifyArgs, cmd_classify, "best labels for image files"),
    "generate": (GenerateArgs, cmd_generate, "draw images of one class"),
}
# Commands that live in their own modules: (module, Args dataclass, run function, help).
# Each module keeps its top-level imports light (torch etc. inside functions).
PLUGINS = {
    "demo": (
        "mcti.cli.demo",
        "DemoArgs",
        "run",
        "the main job: few-shot tokens on real data with the embedded model",
    ),
    "pretrain": (
        "mcti.pretrain",
        "PretrainArgs",
        "run",
        "train the embedded base model from scratch",
    ),
    "serve": ("mcti.cli.serve", "ServeArgs", "run", "serve classification over HTTP (Ray Serve)"),
    "synth": (
        "mcti.cli.synth",
        "SynthArgs",
        "run",
        "write a many-class synthetic image set (glyphs x colours), regenerable by seed",
    ),
}


def _commands() -> dict:
    import importlib

    cmds = dict(COMMANDS)
    for name, (module, args_cls, fn, help_) in PLUGINS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and module.startswith(e.name):  # the command is not built (yet)
                continue
            raise
        cmds[name] = (getattr(mod, args_cls), getattr(mod, fn), help_)
    return dict(
        sorted(
            cmds.items(), key=lambda kv: list(COMMANDS).index(kv[0]) if kv[0] in COMMANDS else 99
        )
    )


def build_parser(commands: dict | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcti",
        description="Multi-class textual inversion: learn a token per class without class names; classify and generate.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (cls, _, help_) in (commands or _commands()).items():
        p = sub.add_parser(name, help=help_, description=help_)
        add_dataclass_args(p, cls)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", message=".*should be kept in float32.*")
    commands = _commands()
    args = build_parser(commands).parse_args(argv)
    cls, fn, _ = commands[args.command]
    try:
        fn(to_dataclass(cls, args))
    except UserError as e:
        print(f"mcti {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mcti {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
