"""Load test of the Serve application on loopback: latency percentiles and throughput at several
concurrencies, with batching on vs max_batch_size=1, the memory of the Ray processes, and p50 at
concurrency 1 against calling the library in-process.

    python benchmarks/serve_load.py                       # tiny-random model, a 3-class token set
    python benchmarks/serve_load.py --tokens DIR --model embedded --json out.json
    python benchmarks/serve_load.py --n-samples 8,16,32 --to-keep 5,2,1 --requests 64  # library default
    python benchmarks/serve_load.py --concurrency 1,8 --requests 32 --seconds 20   # quicker

Both variants run as two Serve applications (/b batched, /u max_batch_size=1), one classifier
replica each with its own CPU, so that they can be compared under the same background load: at
concurrency 1 every iteration calls the library in-process, then /b, then /u; at higher
concurrency both variants are loaded at the same time.

Bounded: at most max(--requests, 2c) requests and --seconds seconds of new requests per variant
and concurrency c (2x --seconds for the interleaved concurrency 1); in-flight requests then
finish (defaults: about 5 minutes in all here). Closed loop: each of the c client threads sends its
next request when its previous one returns. Clients run on the same CPUs as the server.
Both sides use the same torch intra-op thread count (--threads): on a small shared CPU,
oversubscribed OpenMP threads make the UNet many times slower, which would swamp the comparison.
"""

import argparse
import io
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


def synthetic_pngs(n: int, size: int, seed: int = 0) -> list[bytes]:
    """n PNG files: a coloured square on noise (like tests/conftest.make_image_folder)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = (rng.random((size, size, 3)) * 60).astype(np.uint8)
        a[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = rng.integers(0, 255, 3)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def make_token_set(bundle, out: Path, classes: int, seed: int = 0) -> Path:
    """Random, distinct class vectors (speed does not depend on training)."""
    import torch

    from mcti.core.store import save_tokens
    from mcti.core.tokens import TokenSet, TokenTable

    init = TokenSet(bundle, classes, 1).init_vector("object")
    table = TokenTable(classes, 1, init)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        table.vectors.add_(torch.randn(table.vectors.shape, generator=g) * init.norm())
    save_tokens(out, table, [f"c{k:03d}" for k in range(classes)], bundle, {"method": "bench"})
    return out


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"p50": None, "p95": None, "p99": None}
    q = np.percentile(np.array(xs) * 1e3, [50, 95, 99])
    return {"p50": float(q[0]), "p95": float(q[1]), "p99": float(q[2])}


def library_caller(args):
    """The library called directly: decode (pil_to_tensor) + Classifier.score, one image a call."""
    import torch

    from mcti.data.folders import pil_to_tensor
    from mcti.eval.evaluate import load_classifier
    from mcti.settings import ScoreArgs

    torch.set_num_threads(args.threads)
    loaded = load_classifier(
        ScoreArgs(
            model=args.model,
            tokens=args.tokens,
            device=args.device,
            n_samples=args.n_samples,
            to_keep=args.to_keep,
        )
    )
    size = loaded.bundle.resolution

    def call(png: bytes) -> None:
        with Image.open(io.BytesIO(png)) as im:
            im.load()
            x = pil_to_tensor(im, size)[None]
        loaded.classifier.score(x)

    return call


def concurrency_one(call, urls: dict, pngs: list[bytes], n_max: int, seconds: float) -> dict:
    """Interleaved single requests: in-process, then each served mode, repeated; so that load
    from other processes on the machine hits every variant alike."""
    import requests

    s = requests.Session()
    lat: dict[str, list[float]] = {"in_process": [], **{m: [] for m in urls}}
    errors = dict.fromkeys(urls, 0)
    sizes: dict[str, list[int]] = {m: [] for m in urls}
    deadline = time.time() + 2 * seconds
    for k in range(n_max):
        if time.time() >= deadline:
            break
        png = pngs[k % len(pngs)]
        t0 = time.perf_counter()
        call(png)
        lat["in_process"].append(time.perf_counter() - t0)
        for mode, url in urls.items():
            t0 = time.perf_counter()
            r = s.post(f"{url}/v1/classify", files={"image": ("x.png", png)}, timeout=300)
            dt = time.perf_counter() - t0
            if r.status_code == 200:
                lat[mode].append(dt)
                sizes[mode].append(r.json()["batch_size"])
            else:
                errors[mode] += 1
    out = {"in_process": {"n": len(lat["in_process"]), **percentiles(lat["in_process"])}}
    for mode in urls:
        xs = lat[mode]
        out[mode] = {
            "concurrency": 1,
            "n": len(xs),
            "errors": errors[mode],
            **percentiles(xs),
            "rps": len(xs) / sum(xs) if xs else 0.0,  # closed loop of one: 1 / mean latency
            "mean_batch": statistics.mean(sizes[mode]) if xs else None,
            "max_batch": max(sizes[mode]) if xs else None,
        }
    out["in_process"]["rps"] = len(lat["in_process"]) / sum(lat["in_process"])
    return out


def load(url: str, pngs: list[bytes], c: int, n_max: int, seconds: float) -> dict:
    """Closed-loop load with c client threads; stops issuing at n_max requests or `seconds`."""
    import requests

    lock = threading.Lock()
    state = {"issued": 0}
    lat, codes, batch_sizes = [], {}, []
    deadline = time.time() + seconds

    def client(i: int) -> None:
        s = requests.Session()
        while True:
            with lock:
                if state["issued"] >= n_max or time.time() >= deadline:
                    return
                k = state["issued"]
                state["issued"] += 1
            png = pngs[(k + i) % len(pngs)]
            t0 = time.perf_counter()
            try:
                r = s.post(f"{url}/v1/classify", files={"image": ("x.png", png)}, timeout=300)
                code = r.status_code
                bs = r.json().get("batch_size") if code == 200 else None
            except requests.RequestException:
                code, bs = "conn", None
            dt = time.perf_counter() - t0
            with lock:
                codes[code] = codes.get(code, 0) + 1
                if code == 200:
                    lat.append(dt)
                    batch_sizes.append(bs)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "lat": lat,
        "wall": wall,
        "sizes": batch_sizes,
        "concurrency": c,
        "n": len(lat),
        "errors": sum(v for k, v in codes.items() if k != 200),
        "codes": {str(k): v for k, v in codes.items()},
        **percentiles(lat),
        "rps": len(lat) / wall,
        "mean_batch": statistics.mean(batch_sizes) if batch_sizes else None,
        "max_batch": max(batch_sizes) if batch_sizes else None,
    }


def merge_rounds(rounds: list[dict]) -> dict:
    lat = [x for r in rounds for x in r["lat"]]
    sizes = [x for r in rounds for x in r["sizes"]]
    codes: dict = {}
    for r in rounds:
        for k, v in r["codes"].items():
            codes[k] = codes.get(k, 0) + v
    return {
        "concurrency": rounds[0]["concurrency"],
        "n": len(lat),
        "errors": sum(r["errors"] for r in rounds),
        "codes": codes,
        **percentiles(lat),
        "rps": len(lat) / sum(r["wall"] for r in rounds),
        "mean_batch": statistics.mean(sizes) if sizes else None,
        "max_batch": max(sizes) if sizes else None,
    }


def ray_memory(root_pid: int) -> dict:
    """PSS (shared pages split fairly) and RSS of the Ray processes this driver started, by role."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p.name))
    todo, procs = list(children.get(root_pid, [])), []
    while todo:
        pid = todo.pop()
        procs.append(pid)
        todo += children.get(pid, [])
    roles: dict[str, dict] = {}
    for pid in procs:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            mem = {}
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.split(":")[0] in ("Rss", "Pss"):
                    mem[line.split(":")[0].lower()] = int(line.split()[1]) / 1024
        except OSError:
            continue
        role = cmd.removeprefix("ray::") if cmd.startswith("ray::") else Path(cmd.split()[0]).name
        r = roles.setdefault(role, {"n": 0, "pss_mb": 0.0, "rss_mb": 0.0})
        r["n"] += 1
        r["pss_mb"] += mem.get("pss", 0)
        r["rss_mb"] += mem.get("rss", 0)
    return {
        "processes": sum(r["n"] for r in roles.values()),
        "pss_mb": sum(r["pss_mb"] for r in roles.values()),
        "rss_mb": sum(r["rss_mb"] for r in roles.values()),
        "by_role": dict(sorted(roles.items(), key=lambda kv: -kv[1]["pss_mb"])),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny-random")
    ap.add_argument("--tokens", default="", help="token dir (default: a random set for --model)")
    ap.add_argument("--classes", type=int, default=3, help="classes of the random token set")
    ap.add_argument("--device", default="cpu")
    # A light schedule (20 UNet rows an image here) gives enough requests per minute on a small
    # CPU for stable throughput numbers, and is the hard case for the overhead ratio.
    ap.add_argument("--n-samples", default="4,8")
    ap.add_argument("--to-keep", default="2,1")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument(
        "--requests", type=int, default=128, help="max requests per variant and concurrency"
    )
    ap.add_argument(
        "--seconds",
        type=float,
        default=60,
        help="max seconds of new requests per variant and concurrency",
    )
    ap.add_argument("--max-batch-size", type=int, default=8, help="the batching-on setting")
    ap.add_argument(
        "--batch-wait", type=float, default=0.0, help="batch_wait_timeout_s when batching"
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads, in-process and per replica"
    )
    ap.add_argument(
        "--cpus", type=int, default=2, help="CPUs of the local Ray instance (half per app)"
    )
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    concurrencies = [int(c) for c in args.concurrency.split(",")]

    from mcti.core.model import load_model

    tmp = tempfile.TemporaryDirectory(prefix="serve_load_")
    bundle = load_model(args.model, device=args.device)
    if not args.tokens:
        args.tokens = str(make_token_set(bundle, Path(tmp.name) / "tokens", args.classes))
    pngs = synthetic_pngs(8, bundle.resolution)
    del bundle

    call = library_caller(args)
    for png in pngs[:2]:
        call(png)  # warm-up
    results: dict = {"settings": vars(args)}

    import ray
    from ray import serve

    from serving.app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    modes = {"batched": (args.max_batch_size, args.batch_wait), "max_batch_size=1": (1, 0.0)}
    urls = {m: f"{url}/{p}" for m, p in zip(modes, ("b", "u"), strict=True)}
    # One classifier replica per mode, both up at once, so that rounds can alternate.
    cpus = args.cpus or 2
    ray.init(
        num_cpus=cpus,
        include_dashboard=False,
        object_store_memory=100 * 2**20,
        log_to_driver=False,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for (mode, (bs, wait)), prefix in zip(modes.items(), ("b", "u"), strict=True):
            cfg = dict(
                model=args.model,
                tokens=args.tokens,
                device=args.device,
                n_samples=args.n_samples,
                to_keep=args.to_keep,
                max_batch_size=bs,
                batch_wait_timeout_s=wait,
                max_ongoing_requests=max(16, 2 * bs),
                max_queued_requests=max(64, 2 * max(concurrencies)),
                num_cpus=cpus / 2,
                torch_threads=args.threads,
                enable_generate=False,
            )
            print(f"deploying {mode} at /{prefix} ...", file=sys.stderr)
            serve.run(build_app(cfg), name=f"mcti-{prefix}", route_prefix=f"/{prefix}")
        for u in urls.values():
            load(u, pngs, 1, 2, 60)  # warm-up
        results["memory"] = ray_memory(os.getpid())
        rows: dict[str, list] = {m: [] for m in modes}
        if 1 in concurrencies:
            print("concurrency 1 (interleaved with the in-process call) ...", file=sys.stderr)
            one = concurrency_one(call, urls, pngs, args.requests, args.seconds)
            results["in_process"] = one.pop("in_process")
            for m in modes:
                rows[m].append(one[m])
        for c in [c for c in concurrencies if c != 1]:
            # Both variants under load at the same time, one replica (one core) each: drifting
            # background load on a shared machine then hits both alike.
            print(f"concurrency {c}: both variants at once ...", file=sys.stderr)
            n = max(args.requests, 2 * c)
            with ThreadPoolExecutor(len(urls)) as ex:
                futures = {m: ex.submit(load, u, pngs, c, n, args.seconds) for m, u in urls.items()}
                out = {m: f.result() for m, f in futures.items()}
            for m in modes:
                rows[m].append(merge_rounds([out[m]]))
        results["serve"] = rows
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()

    ip = results.get("in_process")
    if ip:
        print(f"\nin-process library call: p50 {ip['p50']:.1f} ms (n={ip['n']})")
    head = f"{'mode':<18}{'c':>4}{'n':>5}{'err':>5}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
    print(head + f"{'req/s':>8}{'batch':>7}")
    for m, rs in rows.items():
        for row in rs:
            print(
                f"{m:<18}{row['concurrency']:>4}{row['n']:>5}{row['errors']:>5}"
                f"{row['p50']:>9.1f}{row['p95']:>9.1f}{row['p99']:>9.1f}{row['rps']:>8.2f}"
                f"{row['mean_batch']:>7.2f}"
            )
    mem = results["memory"]
    other = sum(
        r["pss_mb"] for k, r in mem["by_role"].items() if k.startswith("ServeReplica:mcti-u:")
    )
    mem["one_app_pss_mb"] = mem["pss_mb"] - other
    print(
        f"Ray processes (both apps): {mem['processes']}, PSS {mem['pss_mb']:.0f} MB, "
        f"RSS {mem['rss_mb']:.0f} MB; one app alone (without /u's replicas): PSS "
        f"{mem['one_app_pss_mb']:.0f} MB"
    )
    for role, r in mem["by_role"].items():
        print(f"  {role[:60]:<60} x{r['n']:<3} PSS {r['pss_mb']:7.0f} MB")
    b, u = rows["batched"], rows["max_batch_size=1"]
    summary = {
        "p50_c1_vs_in_process": b[0]["p50"] / ip["p50"] if ip else None,
        "batching_gain": {
            str(x["concurrency"]): x["rps"] / y["rps"] for x, y in zip(b, u, strict=True)
        },
    }
    results["summary"] = summary
    if ip:
        print(
            f"\np50 at concurrency 1 (batched app) / in-process: {summary['p50_c1_vs_in_process']:.2f}x"
        )
    print(
        "throughput batched / max_batch_size=1: "
        + ", ".join(f"c={k}: {v:.2f}x" for k, v in summary["batching_gain"].items())
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
