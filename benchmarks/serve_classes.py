"""Serving cost against the number of classes K (issue 13 item 4): `serve_load.py --classes
10,1000` runs this. For each K, one application (one classifier replica) hosting a random token
set of K classes with a fused state (random unit shot features, --shots per class; its tokens
weighted 1, so both parts are computed): the token-set load time (in-process, the replica's
`load_sets`, and the application's deploy), the replica's resident memory (its growth per class
from the smallest K), GET /v1/token-sets latency, and p50/p95 of POST /v1/classify per scorer
(closed loop of one client; at most --requests requests or --seconds seconds each, at least one:
the diffusion scorer computes K x n_samples UNet rows an image, so at K = 1000 it gets one or
two). Random sets: cost does not depend on what the tokens learned.
"""

import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from benchmarks.common import percentiles, process_memory, random_token_set, table

SCORERS = ("diffusion", "hybrid", "clip", "fused")  # the server's default first


def token_set_with_cache(bundle, out: Path, K: int, shots: int, seed: int = 0) -> Path:
    """A random token set of K classes and a fused state of `shots` random unit features per
    class (the size of a real K-class, `shots`-shot cache)."""
    import torch

    from mcti.core.fused import FusedParams, FusedState, save_fused

    random_token_set(bundle, out, [f"c{k:05d}" for k in range(K)], seed, "bench")
    with torch.no_grad():
        x = torch.zeros(1, 3, bundle.resolution, bundle.resolution)
        dim = bundle.clip_image_features(x).shape[1]
    g = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(K * shots, dim, generator=g), dim=1)
    labels = torch.arange(K).repeat_interleave(shots)
    save_fused(out, FusedState(feats, labels, K, FusedParams(w_tokens=1.0)))
    return out


def load_seconds(bundle, settings: dict, tokens: Path) -> float:
    """The replica's token-set load (serving.tokensets.load_sets, every scorer), in-process."""
    from serving.config import AppConfig
    from serving.tokensets import TokenSets, load_sets, token_config

    cfg = AppConfig(**settings)
    t0 = time.perf_counter()
    load_sets(
        token_config({"k": str(tokens)}), TokenSets(), bundle, cfg, list(SCORERS), nullcontext
    )
    return time.perf_counter() - t0


def timed_requests(send, n_max: int, seconds: float) -> dict:
    """Closed loop of one: `send()` until n_max requests or `seconds` (at least one)."""
    lat, errors = [], 0
    deadline = time.time() + seconds
    while len(lat) + errors < n_max and (not lat or time.time() < deadline):
        t0 = time.perf_counter()
        ok = send()
        if ok:
            lat.append(time.perf_counter() - t0)
        else:
            errors += 1
            if errors > 3:
                break
    return {"n": len(lat), "errors": errors, **percentiles(lat)}


def replica_memory(app: str) -> dict:
    """PSS and RSS (MB) of the classifier replica of application `app`."""
    mem = process_memory(os.getpid())["by_role"]
    role = next(k for k in mem if k.startswith(f"ServeReplica:{app}:MctiClassifier"))
    return {"pss_mb": mem[role]["pss_mb"], "rss_mb": mem[role]["rss_mb"]}


def measure_app(url: str, pngs: list[bytes], args) -> dict:
    """GET /v1/token-sets latency and size, and POST /v1/classify latency per scorer."""
    import requests

    s = requests.Session()
    out = {
        "token_sets": timed_requests(
            lambda: s.get(f"{url}/v1/token-sets", timeout=60).status_code == 200, 20, 30
        ),
        "token_sets_bytes": len(s.get(f"{url}/v1/token-sets", timeout=60).content),
        "classify": {},
    }
    for scorer in SCORERS:
        print(f"  classify, {scorer} scorer ...", file=sys.stderr)
        sent = iter(range(10**9))

        def send(scorer: str = scorer, sent=sent) -> bool:
            png = pngs[next(sent) % len(pngs)]
            files, data = {"image": ("x.png", png)}, {"scorer": scorer}
            r = s.post(f"{url}/v1/classify", files=files, data=data, timeout=900)
            return r.status_code == 200

        if scorer != "diffusion":  # warm-up, not counted (hybrid warms the UNet)
            send()
        out["classify"][scorer] = timed_requests(send, args.requests, args.seconds)
    return out


def measure_classes(args, app_config, local_serve, pngs: list[bytes], tmp: Path) -> dict:
    """{K: figures} for each K of args.class_counts (app_config, local_serve: serve_load's)."""
    from ray import serve

    from mcti.core.model import load_model
    from serving.app import build_app

    bundle = load_model(args.model, device=args.device)
    sets = {
        K: token_set_with_cache(bundle, tmp / f"k{K}", K, args.shots) for K in args.class_counts
    }
    settings = app_config(args, args.max_batch_size, args.batch_wait, generate=False)
    settings.update(scorers=list(SCORERS), num_cpus=1)
    out: dict = {}
    for K, tokens in sets.items():
        print(f"K = {K}: loading in-process ...", file=sys.stderr)
        out[K] = {"load_in_process_s": load_seconds(bundle, settings, tokens)}
    del bundle
    with local_serve(args) as port:
        for K, tokens in sets.items():
            name = f"k{K}"
            url = f"http://127.0.0.1:{port}/{name}"
            print(f"K = {K}: deploying ...", file=sys.stderr)
            t0 = time.perf_counter()
            serve.run(
                build_app({**settings, "tokens": str(tokens)}), name=name, route_prefix=f"/{name}"
            )
            r = out[K]
            r["deploy_s"] = time.perf_counter() - t0
            r["memory"] = replica_memory(name)
            r.update(measure_app(url, pngs, args))
            serve.delete(name)
    k0 = min(out)
    for K, r in out.items():
        grow = r["memory"]["rss_mb"] - out[k0]["memory"]["rss_mb"]
        r["rss_mb_per_class"] = grow / (K - k0) if K != k0 else None
    return out


def report_classes(results: dict) -> None:
    print("\nserving cost against K (one classifier replica, concurrency 1):")
    rows = [
        {
            "K": str(K),
            "load_s": r["load_in_process_s"],
            "deploy_s": r["deploy_s"],
            "rss_mb": r["memory"]["rss_mb"],
            "mb_per_class": r["rss_mb_per_class"],
            "sets_p50": r["token_sets"]["p50"],
            "sets_kb": r["token_sets_bytes"] / 1024,
        }
        for K, r in results.items()
    ]
    columns = [("K", 6, "s"), ("load_s", 8, ".2f"), ("deploy_s", 10, ".1f")]
    columns += [("rss_mb", 8, ".0f"), ("mb_per_class", 13, ".3f")]
    columns += [("sets_p50", 10, ".1f"), ("sets_kb", 9, ".1f")]
    print(table(columns, rows))
    rows = [
        {"scorer": sc, "K": str(K), **c}
        for sc in SCORERS
        for K, r in results.items()
        for c in [r["classify"][sc]]
    ]
    columns = [("scorer", 10, "s"), ("K", 6, "s"), ("n", 4, "d"), ("errors", 7, "d")]
    print(table([*columns, ("p50", 10, ".1f"), ("p95", 10, ".1f")], rows))
