"""--reg clip's terms, measured side by side on the same shots: the old text->image term alone
(`t2i`), the scorer's decision alone (`i2t`: each image picks its class's text) and both (`both`,
what `mcti train --reg clip` runs now). Clip and fused scorer accuracy on held-out images, beside
nearest class mean and a linear probe on the same model's CLIP image features of the same shots.

Groups: `seen` (animal-mnist's first 6 classes and fashion-mnist's t-shirt, trouser: 8 classes)
and `novel` (giraffe, horse, sheep, zebra, pullover: 5), the 8+5 split of
benchmarks/extend_classes.py, each trained as its own K-class set; or `--synth DIR` (a `mcti
synth` folder: its train/ shots and test/ images; seeds vary the training draws only).
Embedded model, one thread; paired differences over seeds. `--time-texts` times one text encoder pass (forward
and backward) over K prompts, the cost of the decision over all K texts.

    nice python benchmarks/clip_term.py --seeds 0,1,2 --out /tmp/clip2/bench
    nice python benchmarks/clip_term.py --synth /tmp/k1000train/synth100 --seeds 0,1,2 --out ...
    nice python benchmarks/clip_term.py --time-texts 10,100,1000
"""

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from extend_classes import accuracy, features, folders, paired
from sklearn.linear_model import LogisticRegression

from mcti.core.model import load_model
from mcti.core.objectives import Objective
from mcti.core.tokens import TokenSet, TokenTable
from mcti.settings import TrainArgs
from mcti.train.loop import (
    prepare,
    run_fingerprint,
    run_steps,
    save_fused_state,
    settings_of,
)
from mcti.train.runlog import RunLog

VARIANTS = ("t2i", "i2t", "both")
SCORERS = ("clip", "fused")


def variant_of(p, cfg: TrainArgs, variant: str):
    """The prepared run with only the named term(s) (both: as `mcti train` runs it)."""
    if variant == "t2i":
        return replace(p, decision=None)
    if variant == "i2t":  # the objective without its discriminative part (TI only)
        s = replace(settings_of(cfg), method="ti")
        return replace(p, objective=Objective(p.bundle, p.tokens, s))
    return p


def train_variant(bundle, cfg: TrainArgs, variant: str) -> dict:
    """Train (or reuse) one variant's token directory; its CPU seconds."""
    record = Path(cfg.out) / "bench_time.json"
    if record.is_file():
        return json.loads(record.read_text())
    cpu = time.process_time()
    p = variant_of(prepare(cfg, bundle, quiet=True), cfg, variant)
    opt = torch.optim.AdamW([p.table.vectors], lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    log = RunLog(Path(cfg.out) / "metrics.jsonl")
    run_steps(cfg, p, opt, gen, run_fingerprint(cfg, p), 0, log)
    save_fused_state(cfg, p)
    times = {"cpu_s": time.process_time() - cpu}
    record.write_text(json.dumps(times))
    return times


def baselines(bundle, train: Path, test: Path) -> dict[str, float]:
    """Nearest class mean and a linear probe on the shots' CLIP image features."""
    x_tr, y_tr, classes = features(bundle, train)
    x_te, y_te, _ = features(bundle, test)
    means = torch.nn.functional.normalize(
        torch.stack([x_tr[torch.from_numpy(y_tr == k)].mean(0) for k in classes]), dim=1
    )
    ncm = np.array(classes)[(x_te @ means.T).argmax(1).numpy()]
    probe = LogisticRegression(C=10.0, max_iter=2000).fit(x_tr, y_tr).predict(x_te)
    return {"ncm": float((ncm == y_te).mean()), "probe": float((probe == y_te).mean())}


def time_texts(bundle, ks: list[int]) -> None:
    """Seconds of one text encoder forward + backward over K class prompts (the decision's
    extra work per step with all K texts)."""
    for K in ks:
        tokens = TokenSet(bundle, K, 1)
        table = TokenTable(K, 1, tokens.init_vector("object"))
        prompts = [tokens.prompt(k) for k in range(K)]
        t = time.perf_counter()
        tokens.clip_text_features(table, prompts).sum().backward()
        print(json.dumps({"K": K, "text_fwd_bwd_s": round(time.perf_counter() - t, 3)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--per-class", type=int, default=30, help="test images per class")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--synth", help="a `mcti synth` folder instead of the seen/novel groups")
    ap.add_argument("--time-texts", help="K values: time the text encoder over K prompts, exit")
    ap.add_argument("--out", default="runs/clip_term")
    a = ap.parse_args()
    torch.set_num_threads(1)
    bundle = load_model("embedded", "cpu")
    if a.time_texts:
        time_texts(bundle, [int(k) for k in a.time_texts.split(",")])
        return
    out, variants = Path(a.out), a.variants.split(",")
    rows = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        root = out / f"seed{seed}"
        if a.synth:
            groups = {"synth": {"train": Path(a.synth, "train"), "test": Path(a.synth, "test")}}
        else:
            f = folders(root, seed, a.shots, a.per_class, "8+5")
            groups = {g: {"train": f[part], "test": f["test"]} for g, part in
                      (("seen", "old"), ("novel", "new"))}  # fmt: skip
        for g, d in groups.items():
            labels = {p.name for p in d["train"].iterdir()}
            row = {"seed": seed, "group": g, **baselines_of(bundle, d, labels, root / g)}
            for v in variants:
                cfg = TrainArgs(data=str(d["train"]), out=str(root / g / f"tok-{v}"), steps=a.steps,
                                save_every=a.steps, model="embedded", device="cpu", reg="clip",
                                shots=a.shots, seed=seed, quiet=True)  # fmt: skip
                row[v] = {"train": train_variant(bundle, cfg, v)}
                for s in SCORERS:
                    row[v][s] = accuracy(bundle, Path(cfg.out), d["test"], labels, s)["accuracy"]
            rows.append(row)
            print(json.dumps({k: row[k] for k in row if k not in variants}
                             | {v: {s: row[v][s] for s in SCORERS} for v in variants}),
                  flush=True)  # fmt: skip
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    summary(rows, variants)


def baselines_of(bundle, d: dict, labels: set[str], cache: Path) -> dict:
    """`baselines` of a group, cached in its folder; test images of the group's classes only."""
    f = cache / "baselines.json"
    if f.is_file():
        return json.loads(f.read_text())
    test = cache / "test-group"
    if not test.is_dir():
        for label in labels:
            shutil.copytree(d["test"] / label, test / label, symlinks=True)
    r = baselines(bundle, d["train"], test)
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(r))
    return r


def summary(rows: list[dict], variants: list[str]) -> None:
    for g in dict.fromkeys(r["group"] for r in rows):
        rs = [r for r in rows if r["group"] == g]
        print(f"{g}: accuracy % over {len(rs)} seeds (mean +- std, per seed)")
        for v in variants:
            for s in SCORERS:
                x = 100 * np.array([r[v][s] for r in rs])
                print(f"  {v:5s} {s:6s} {x.mean():5.1f} +- {x.std():4.1f}  {np.round(x, 1).tolist()}")  # fmt: skip
        for k in ("ncm", "probe"):
            x = 100 * np.array([r[k] for r in rs])
            print(f"  {k:12s} {x.mean():5.1f} +- {x.std():4.1f}  {np.round(x, 1).tolist()}")
        for v in variants:
            if v != "t2i" and "t2i" in variants:
                for s in SCORERS:
                    col = [r[v][s] for r in rs], [r["t2i"][s] for r in rs]
                    print(f"  {v} - t2i {s:6s} {paired(*col)}")
        if {"both", "i2t"} <= set(variants):
            for s in SCORERS:
                print(f"  both - i2t {s:6s} {paired([r['both'][s] for r in rs], [r['i2t'][s] for r in rs])}")  # fmt: skip
        cpu = {v: np.mean([r[v]["train"]["cpu_s"] for r in rs]) for v in variants}
        print("  train CPU s per run: " + ", ".join(f"{v} {c:.1f}" for v, c in cpu.items()))


if __name__ == "__main__":
    main()
