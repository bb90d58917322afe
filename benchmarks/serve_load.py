"""Load test of the Serve application on loopback: latency percentiles and throughput at several
concurrencies, with batching on vs max_batch_size=1, the memory of the Ray processes, p50 at
concurrency 1 against calling the library in-process, and classify latency while generation runs
against idle (p50/p95 ratio; generation has its own bounded queue and yields to classification).

    python benchmarks/serve_load.py                       # tiny-random model, a 3-class token set
    python benchmarks/serve_load.py --tokens DIR --model embedded --json out.json
    python benchmarks/serve_load.py --n-samples 8,16,32 --to-keep 5,2,1 --requests 64  # library default
    python benchmarks/serve_load.py --concurrency 1,8 --requests 32 --seconds 20   # quicker
    python benchmarks/serve_load.py --concurrency "" --requests 24   # only classify vs generation
    python benchmarks/serve_load.py --swap     # only: roll out a token set under load (below)
    python benchmarks/serve_load.py --classes 10,1000 --model embedded  # only: cost against K

Both variants run as two Serve applications (/b batched, /u max_batch_size=1), one classifier
replica each with its own CPU, so that they can be compared under the same background load: at
concurrency 1 every iteration calls the library in-process, then /b, then /u; at higher
concurrency both variants are loaded at the same time.

Bounded: at most max(--requests, 2c) requests and --seconds seconds of new requests per variant
and concurrency c (2x --seconds for the interleaved concurrency 1); in-flight requests then
finish (defaults: about 5 minutes in all here). Classify while generating: --requests sequential
classify requests on the batched app, idle and then while --generate-clients clients keep
generating (--generate-steps DDIM steps, one image each), interleaved in --rounds rounds. Closed loop: each of the c client threads sends its
next request when its previous one returns. Clients run on the same CPUs as the server.
Both sides use the same torch intra-op thread count (--threads): on a small shared CPU,
oversubscribed OpenMP threads make the UNet many times slower, which would swamp the comparison.

--swap measures a roll-out instead, on its own Serve instance deployed as `serve deploy` does
(serving.local_ray.deploy): --swap-clients closed-loop clients classify for the whole run while
the token set is replaced by one with one more class, first as a user_config change (the running
replica reconfigures) and then with an `args` change too (the old path, which a base-model change
takes: Serve starts a new replica and stops the old one). For each: seconds from the update to
the first answer naming the new label, failed requests, the classify p50/p95 before and during
the roll-out (requests in flight between the update and that first answer), and whether the
replica process is the same.

--classes K1,K2,... measures serving cost against the number of classes instead (token-set
load time, replica memory per class, /v1/token-sets and per-scorer /v1/classify latency):
benchmarks/serve_classes.py says how.

(Over 400 lines: one benchmark whose four measurements share one Serve instance; each is a
function of its own, and `main` only sequences them.)
"""

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: `benchmarks.common` and the packages

from benchmarks.common import (  # noqa: E402
    free_port,
    percentiles,
    process_memory,
    random_token_set,
    synthetic_pngs,
    table,
)

MODES = {"batched": "b", "max_batch_size=1": "u"}  # variant -> route prefix


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny-random")
    ap.add_argument("--tokens", default="", help="token dir (default: a random set for --model)")
    ap.add_argument(
        "--classes",
        default="3",
        help="classes of the random token set; several (e.g. 10,1000): only measure serving "
        "cost against K (benchmarks/serve_classes.py)",
    )
    ap.add_argument("--shots", type=int, default=5, help="--classes K,K: cache shots per class")
    ap.add_argument("--device", default="cpu")
    # A light schedule (20 UNet rows an image here) gives enough requests per minute on a small
    # CPU for stable throughput numbers, and is the hard case for the overhead ratio.
    ap.add_argument("--n-samples", default="4,8")
    ap.add_argument("--to-keep", default="2,1")
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated; empty: skip")
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
    ap.add_argument(
        "--generate-clients", type=int, default=2, help="concurrent generators (0: skip)"
    )
    ap.add_argument("--generate-steps", type=int, default=25, help="DDIM steps per generation")
    ap.add_argument("--rounds", type=int, default=2, help="idle/busy rounds, interleaved")
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("--swap", action="store_true", help="only measure token-set roll-outs")
    ap.add_argument("--swap-clients", type=int, default=4, help="clients during a roll-out")
    args = ap.parse_args(argv)
    args.concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    args.class_counts = sorted({int(k) for k in args.classes.split(",") if k.strip()})
    args.classes = args.class_counts[0]
    return args


def app_config(args, max_batch_size: int, batch_wait: float, generate: bool) -> dict:
    return dict(
        model=args.model,
        tokens=args.tokens,
        device=args.device,
        n_samples=args.n_samples,
        to_keep=args.to_keep,
        max_batch_size=max_batch_size,
        batch_wait_timeout_s=batch_wait,
        max_ongoing_requests=max(16, 2 * max_batch_size),
        max_queued_requests=max([64, *(2 * c for c in args.concurrencies)]),
        num_cpus=(args.cpus or 2) / 2,
        torch_threads=args.threads,
        enable_generate=generate,
    )


@contextmanager
def local_serve(args):
    """A local Ray instance with Serve's HTTP proxy on a free loopback port: yields the port."""
    import ray
    from ray import serve

    port = free_port()
    ray.init(
        num_cpus=args.cpus or 2,
        include_dashboard=False,
        object_store_memory=100 * 2**20,
        log_to_driver=False,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


@contextmanager
def served(args):
    """Both variants on one local Ray instance, one classifier replica each (so rounds can
    alternate): yields {variant: url}; generation is enabled on the batched app only."""
    from ray import serve

    from serving.app import build_app

    with local_serve(args) as port:
        batching = {"batched": (args.max_batch_size, args.batch_wait), "max_batch_size=1": (1, 0.0)}
        for mode, prefix in MODES.items():
            cfg = app_config(args, *batching[mode], generate=mode == "batched")
            print(f"deploying {mode} at /{prefix} ...", file=sys.stderr)
            serve.run(build_app(cfg), name=f"mcti-{prefix}", route_prefix=f"/{prefix}")
        yield {m: f"http://127.0.0.1:{port}/{p}" for m, p in MODES.items()}


def measure_concurrency(args, call, urls: dict, pngs: list[bytes]) -> tuple[dict, dict | None]:
    """Rows per variant (one per concurrency), and the in-process figures at concurrency 1."""
    rows: dict[str, list] = {m: [] for m in urls}
    in_process = None
    if 1 in args.concurrencies:
        print("concurrency 1 (interleaved with the in-process call) ...", file=sys.stderr)
        one = concurrency_one(call, urls, pngs, args.requests, args.seconds)
        in_process = one.pop("in_process")
        for m in urls:
            rows[m].append(one[m])
    for c in [c for c in args.concurrencies if c != 1]:
        # Both variants under load at the same time, one replica (one core) each: drifting
        # background load on a shared machine then hits both alike.
        print(f"concurrency {c}: both variants at once ...", file=sys.stderr)
        n = max(args.requests, 2 * c)
        with ThreadPoolExecutor(len(urls)) as ex:
            futures = {m: ex.submit(load, u, pngs, c, n, args.seconds) for m, u in urls.items()}
            out = {m: f.result() for m, f in futures.items()}
        for m in urls:
            rows[m].append(merge_rounds([out[m]]))
    return rows, in_process


def generate_loop(url: str, label: str, steps: int, stop: threading.Event, codes: dict) -> None:
    """One client generating back to back until `stop`; counts the answers by status."""
    import requests

    s = requests.Session()
    body = {"label": label, "n": 1, "steps": steps}
    while not stop.is_set():
        try:
            code = s.post(f"{url}/v1/generate", json=body, timeout=600).status_code
        except requests.RequestException:
            code = "conn"
        codes[code] = codes.get(code, 0) + 1
        if code == 503:
            time.sleep(0.2)  # the queue is full: the client backs off, as Retry-After asks


def classify_while_generating(args, url: str, pngs: list[bytes]) -> dict:
    """Sequential classify latency on `url`, idle and while generate clients run, interleaved."""
    from mcti.core.store import read_meta

    label = next(iter(read_meta(args.tokens)["classes"]))
    per_round = max(1, args.requests // max(1, args.rounds))
    idle, busy, codes = [], [], {}
    for r in range(args.rounds):
        print(f"classify idle / while generating, round {r + 1} ...", file=sys.stderr)
        idle += load(url, pngs, 1, per_round, args.seconds)["lat"]
        stop = threading.Event()
        gens = [
            threading.Thread(
                target=generate_loop, args=(url, label, args.generate_steps, stop, codes)
            )
            for _ in range(args.generate_clients)
        ]
        for t in gens:
            t.start()
        time.sleep(1.0)  # the generations are under way
        busy += load(url, pngs, 1, per_round, args.seconds)["lat"]
        stop.set()
        for t in gens:
            t.join()
    a, b = percentiles(idle), percentiles(busy)
    return {
        "idle": {"n": len(idle), **a},
        "generating": {"n": len(busy), **b},
        "generate_codes": {str(k): v for k, v in codes.items()},
        "p50_ratio": b["p50"] / a["p50"] if idle and busy else None,
        "p95_ratio": b["p95"] / a["p95"] if idle and busy else None,
    }


def roll_out(url: str, pngs: list[bytes], clients: int, update, new_label: str) -> dict:
    """Classify from `clients` threads, call `update()`, and time the first answer naming
    `new_label`; latencies before and during, failures, and the replica pid before and after."""
    import requests

    answers: list[tuple[float, float, bool, list]] = []  # (sent, answered, ok, labels)
    stop = threading.Event()

    def client(i: int) -> None:
        s = requests.Session()
        while not stop.is_set():
            png = pngs[i % len(pngs)]
            i += clients
            t0 = time.monotonic()
            try:
                r = s.post(
                    f"{url}/v1/classify",
                    files={"image": ("x.png", png)},
                    data={"top_k": "10000"},
                    timeout=300,
                )
                ok, labels = r.status_code == 200, r.json().get("labels", [])
            except Exception:
                ok, labels = False, []
            answers.append((t0, time.monotonic(), ok, labels))

    pid = requests.get(f"{url}/v1/stats", timeout=60).json()["pid"]
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(5.0)
    t_update = time.monotonic()
    update()
    t_new = None
    while t_new is None and time.monotonic() - t_update < 600:
        hits = [done for _, done, ok, labels in list(answers) if new_label in labels]
        t_new = min(hits) if hits else None
        time.sleep(0.05)
    time.sleep(3.0)
    stop.set()
    for t in threads:
        t.join()
    t_new = t_new or time.monotonic()
    lat = lambda sel: [done - sent for sent, done, ok, _ in sel if ok]  # noqa: E731
    before = [a for a in answers if a[1] < t_update]
    during = [a for a in answers if a[1] >= t_update and a[0] <= t_new]
    return {
        "swap_s": t_new - t_update,
        "failed": sum(not a[2] for a in answers),
        "requests": len(answers),
        "before": {"n": len(before), **percentiles(lat(before))},
        "during": {"n": len(during), **percentiles(lat(during))},
        "same_replica": requests.get(f"{url}/v1/stats", timeout=60).json()["pid"] == pid,
    }


def measure_swap(args, pngs: list[bytes], tmp: Path) -> dict:
    """A user_config roll-out, then one with an args change (a new replica), under load."""
    from ray import serve

    from mcti.core.model import load_model
    from mcti.core.store import read_meta
    from serving.config import load_config
    from serving.local_ray import deploy, wait_running

    labels = list(read_meta(args.tokens)["classes"])
    bundle = load_model(args.model, device=args.device)
    new_sets = [
        random_token_set(bundle, tmp / f"swap-{i}", [*labels, *extra], 1 + i, "bench")
        for i, extra in enumerate((["new-0"], ["new-0", "new-1"]))
    ]
    del bundle
    with local_serve(args) as port:
        settings = app_config(args, args.max_batch_size, args.batch_wait, generate=False)
        settings["num_cpus"] = 1  # a new replica (the args roll-out) fits next to the old one
        deploy(load_config(settings), {})
        wait_running(serve, 600)
        url = f"http://127.0.0.1:{port}"
        load(url, pngs, 1, 2, 60)  # warm-up
        out = {}
        print("roll-out as a user_config change ...", file=sys.stderr)
        cfg = load_config({**settings, "tokens": {"default": str(new_sets[0])}})
        out["user_config"] = roll_out(
            url, pngs, args.swap_clients, lambda: deploy(cfg, {}), "new-0"
        )
        print("roll-out with an args change (new replica) ...", file=sys.stderr)
        cfg = load_config({**settings, "seed": 1, "tokens": {"default": str(new_sets[1])}})
        out["new_replica"] = roll_out(
            url, pngs, args.swap_clients, lambda: deploy(cfg, {}), "new-1"
        )
        return out


def report_swap(swap: dict) -> None:
    print("\ntoken-set roll-out under load (closed-loop clients):")
    rows = [
        {
            "how": how,
            "swap_s": r["swap_s"],
            "failed": r["failed"],
            "n": r["requests"],
            "p50_before": r["before"]["p50"],
            "p95_before": r["before"]["p95"],
            "p50_during": r["during"]["p50"],
            "p95_during": r["during"]["p95"],
            "same_pid": str(r["same_replica"]),
        }
        for how, r in swap.items()
    ]
    columns = [("how", 12, "s"), ("swap_s", 8, ".2f"), ("failed", 7, "d"), ("n", 6, "d")]
    columns += [(k, 11, ".1f") for k in ("p50_before", "p95_before", "p50_during", "p95_during")]
    print(table([*columns, ("same_pid", 9, "s")], rows))


def report(results: dict) -> None:
    ip = results.get("in_process")
    if ip:
        print(f"\nin-process library call: p50 {ip['p50']:.1f} ms (n={ip['n']})")
    rows = results.get("serve", {})
    if any(rows.values()):
        columns = [("mode", 18, "s"), ("c", 4, "d"), ("n", 5, "d"), ("errors", 7, "d")]
        columns += [("p50", 9, ".1f"), ("p95", 9, ".1f"), ("p99", 9, ".1f")]
        columns += [("rps", 8, ".2f"), ("mean_batch", 11, ".2f")]
        flat = [{"mode": m, "c": r["concurrency"], **r} for m, rs in rows.items() for r in rs]
        print(table(columns, flat))
    mem = results["memory"]
    print(
        f"Ray processes (both apps): {mem['processes']}, PSS {mem['pss_mb']:.0f} MB, "
        f"RSS {mem['rss_mb']:.0f} MB; one app alone (without /u's replicas): PSS "
        f"{mem['one_app_pss_mb']:.0f} MB"
    )
    for role, r in mem["by_role"].items():
        print(f"  {role[:60]:<60} x{r['n']:<3} PSS {r['pss_mb']:7.0f} MB")
    summary = results["summary"]
    if summary.get("p50_c1_vs_in_process"):
        print(
            f"\np50 at concurrency 1 (batched app) / in-process: {summary['p50_c1_vs_in_process']:.2f}x"
        )
    if summary.get("batching_gain"):
        print(
            "throughput batched / max_batch_size=1: "
            + ", ".join(f"c={k}: {v:.2f}x" for k, v in summary["batching_gain"].items())
        )
    g = results.get("generation")
    if g:
        print("\nclassify at concurrency 1, idle vs while generating (batched app):")
        print(
            table(
                [("", 12, "s"), ("n", 5, "d"), ("p50", 9, ".1f"), ("p95", 9, ".1f")],
                [{"": k, **g[k]} for k in ("idle", "generating")],
            )
        )
        print(
            f"ratio while generating / idle: p50 {g['p50_ratio']:.2f}x, p95 {g['p95_ratio']:.2f}x; "
            f"generate answers {g['generate_codes']}"
        )


def summarize(results: dict) -> dict:
    rows, ip = results.get("serve", {}), results.get("in_process")
    b, u = rows.get("batched", []), rows.get("max_batch_size=1", [])
    mem = results["memory"]
    mem["one_app_pss_mb"] = mem["pss_mb"] - sum(
        r["pss_mb"] for k, r in mem["by_role"].items() if k.startswith("ServeReplica:mcti-u:")
    )
    return {
        "p50_c1_vs_in_process": b[0]["p50"] / ip["p50"] if ip and b else None,
        "batching_gain": {
            str(x["concurrency"]): x["rps"] / y["rps"] for x, y in zip(b, u, strict=True)
        },
        "classify_p50_generating_vs_idle": (results.get("generation") or {}).get("p50_ratio"),
        "classify_p95_generating_vs_idle": (results.get("generation") or {}).get("p95_ratio"),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mcti.core.model import load_model

    tmp = tempfile.TemporaryDirectory(prefix="serve_load_")
    bundle = load_model(args.model, device=args.device)
    if not args.tokens:
        labels = [f"c{k:03d}" for k in range(args.classes)]
        args.tokens = str(random_token_set(bundle, Path(tmp.name) / "tokens", labels, 0, "bench"))
    pngs = synthetic_pngs(8, bundle.resolution)
    del bundle

    if len(args.class_counts) > 1:
        from benchmarks.serve_classes import measure_classes, report_classes

        settings = {k: v for k, v in vars(args).items() if k != "concurrencies"}
        try:
            results = {"settings": settings}
            results["classes"] = measure_classes(
                args, app_config, local_serve, pngs, Path(tmp.name)
            )
        finally:
            tmp.cleanup()
        report_classes(results["classes"])
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        return 0
    if args.swap:
        try:
            results = {"settings": {k: v for k, v in vars(args).items() if k != "concurrencies"}}
            results["swap"] = measure_swap(args, pngs, Path(tmp.name))
        finally:
            tmp.cleanup()
        report_swap(results["swap"])
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        return 0
    call = library_caller(args)
    for png in pngs[:2]:
        call(png)  # warm-up
    results: dict = {"settings": {k: v for k, v in vars(args).items() if k != "concurrencies"}}
    try:
        with served(args) as urls:
            for u in urls.values():
                load(u, pngs, 1, 2, 60)  # warm-up
            results["memory"] = process_memory(os.getpid())
            results["serve"], results["in_process"] = measure_concurrency(args, call, urls, pngs)
            if args.generate_clients:
                results["generation"] = classify_while_generating(args, urls["batched"], pngs)
    finally:
        tmp.cleanup()
    results["summary"] = summarize(results)
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
