"""The Serve application on loopback: one Ray + Serve instance for the whole module.

Reference for the labels: the library's own `mcti classify` (mcti.cli.main) on the same files
with the same scorer settings. Two token sets are hosted (3 and 4 classes) so that batches mix
sets and a mix-up would show as wrong labels.

(Over 400 lines: every test of the live app shares this module's one server, which takes about
30 s to start; the last test restarts its classifier.)
"""

import base64
import io
import json
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from benchmarks.common import free_port, random_token_set
from mcti.cli.serve import patient_proxy_checks
from mcti.data.images import load_image
from serving.local_ray import REQUEST_TIMEOUT_S
from tests.conftest import make_image_folder

requests = pytest.importorskip("requests")
ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow

SCHEDULE = ["--n-samples", "2,4", "--to-keep", "2,1"]  # small: ~10 UNet rows per image
LIMIT_BODY, LIMIT_PIXELS = 200_000, 1_000_000
MAX_BATCH, MAX_ONGOING, MAX_QUEUED = 4, 8, 8
BODY_TIMEOUT_S, MAX_GENERATE_QUEUE = 2.0, 2


def library_json(paths: list[Path], tokens: Path, scorer: str, top_k: int) -> dict:
    """`mcti classify --json` -> {rel(path): its result (labels, scores, probs when any)}."""
    from mcti.cli import main

    buf = io.StringIO()
    args = ["classify", *map(str, paths), "--tokens", str(tokens), "--model", "tiny-random"]
    args += ["--device", "cpu", "--scorer", scorer, "--top-k", str(top_k), "--json", *SCHEDULE]
    with redirect_stdout(buf):
        assert main(args) == 0
    return {rel(Path(r["image"])): r for r in json.loads(buf.getvalue())}


def library_classify(paths: list[Path], tokens: Path, scorer: str, top_k: int) -> dict:
    """`mcti classify --json` -> {rel(path): (labels, scores)}."""
    rows = library_json(paths, tokens, scorer, top_k)
    return {k: (r["labels"], r["scores"]) for k, r in rows.items()}


def rel(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"  # file names repeat across class folders


@dataclass
class Server:
    url: str
    images: list[Path]
    expected: dict  # (token set, scorer) -> {rel(path): (labels, scores)}
    log_dir: Path

    def classify(self, path: Path, timeout: float = 120, **fields) -> requests.Response:
        files = {"image": (path.name, path.read_bytes(), "image/png")}
        data = {k: str(v) for k, v in fields.items()}
        return requests.post(f"{self.url}/v1/classify", files=files, data=data, timeout=timeout)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_bundle):
    from ray import serve

    from serving.app import build_app

    root = tmp_path_factory.mktemp("serving")
    data = make_image_folder(root / "data", n_classes=3, per_class=2)
    images = sorted(data.glob("*/*.png"))
    sets = {
        "a": random_token_set(tiny_bundle, root / "tok-a", ["sku-0000", "sku-0001", "sku-0002"], 0),
        "b": random_token_set(tiny_bundle, root / "tok-b", ["b0", "b1", "b2", "b3"], 1),
    }
    expected = {
        ("a", "diffusion"): library_classify(images, sets["a"], "diffusion", 3),
        ("b", "diffusion"): library_classify(images, sets["b"], "diffusion", 4),
        ("b", "clip"): library_classify(images, sets["b"], "clip", 4),
    }
    port = free_port()
    patient_proxy_checks()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20)
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": REQUEST_TIMEOUT_S}
        )
        cfg = dict(
            tokens={k: str(v) for k, v in sets.items()},
            model="tiny-random",
            device="cpu",
            n_samples="2,4",
            to_keep="2,1",
            max_batch_size=MAX_BATCH,
            batch_wait_timeout_s=0.05,  # wide enough for a thread burst to share batches
            max_ongoing_requests=MAX_ONGOING,
            max_queued_requests=MAX_QUEUED,
            max_body_bytes=LIMIT_BODY,
            max_pixels=LIMIT_PIXELS,
            max_generate_steps=50,
            max_generate_queue=MAX_GENERATE_QUEUE,
            body_timeout_s=BODY_TIMEOUT_S,
        )
        serve.run(build_app(cfg), name="mcti", route_prefix="/")
        log_dir = Path(ray._private.worker._global_node.get_logs_dir_path())
        yield Server(f"http://127.0.0.1:{port}", images, expected, log_dir)
    finally:
        serve.shutdown()
        ray.shutdown()


def _assert_error(r: requests.Response, status: int, contains: str = "") -> str:
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json")
    msg = r.json()["error"]
    assert isinstance(msg, str) and msg
    assert contains.lower() in msg.lower(), msg
    return msg


# ---------------------------------------------------------------------------------------------


def test_labels_equal_library_classify(server):
    """Sequential requests (batches of one) give the labels and scores of `mcti classify`."""
    for (key, scorer), want in server.expected.items():
        for path in server.images:
            r = server.classify(path, token_set=key, scorer=scorer, top_k=len(want[rel(path)][0]))
            assert r.status_code == 200, r.text
            body = r.json()
            labels, scores = want[rel(path)]
            assert body["labels"] == labels, (key, scorer, path.name)
            assert body["scores"] == pytest.approx(scores, abs=2e-6, rel=1e-5)
            assert body["token_set"] == key and body["scorer"] == scorer
            assert set(body["timings_ms"]) >= {"decode", "queue", "score", "total"}


def test_json_body_and_defaults(server):
    """image_b64 works like the multipart field; defaults: first token set, diffusion, top_k 5
    clipped to the 3 classes."""
    path = server.images[0]
    b64 = base64.b64encode(path.read_bytes()).decode()
    r = requests.post(f"{server.url}/v1/classify", json={"image_b64": b64}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_set"] == "a" and body["scorer"] == "diffusion"
    assert body["labels"] == server.expected[("a", "diffusion")][rel(path)][0]
    r = requests.post(
        f"{server.url}/v1/classify",
        json={"image_b64": "data:image/png;base64," + b64, "top_k": 1, "token_set": "b"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert r.json()["labels"] == server.expected[("b", "diffusion")][rel(path)][0][:1]


def test_token_sets_and_health(server):
    r = requests.get(f"{server.url}/v1/token-sets", timeout=30)
    assert r.status_code == 200
    body = r.json()
    assert body["default"] == "a"
    sets = {s["id"]: s for s in body["token_sets"]}
    assert sets["a"]["labels"] == ["sku-0000", "sku-0001", "sku-0002"] and sets["a"]["default"]
    assert sets["b"]["n_classes"] == 4 and not sets["b"]["default"]
    assert sets["b"]["base_model"] == "tiny-random"
    assert set(body["scorers"]) == {"diffusion", "clip", "hybrid"}  # tiny-random has a CLIP tower
    r = requests.get(f"{server.url}/healthz", timeout=30)
    assert r.status_code == 200 and r.json() == {"status": "ok", "token_sets": 2}


def test_openapi_documents_both_bodies(server):
    spec = requests.get(f"{server.url}/openapi.json", timeout=30).json()
    body = spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    assert "image" in body["multipart/form-data"]["schema"]["properties"]
    assert "image_b64" in body["application/json"]["schema"]["properties"]
    assert {"/v1/token-sets", "/healthz", "/v1/generate"} <= set(spec["paths"])
    assert requests.get(f"{server.url}/docs", timeout=30).status_code == 200


def _png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_inputs_get_4xx_json_and_server_keeps_answering(server):
    url = f"{server.url}/v1/classify"
    png = server.images[0].read_bytes()

    def post(**kw):
        return requests.post(url, timeout=60, **kw)

    _assert_error(post(files={"image": ("x.png", b"this is not an image")}), 400, "not an image")
    _assert_error(post(files={"image": ("x.png", png[: len(png) // 2])}), 400, "truncated")
    _assert_error(post(files={"image": ("x.png", b"")}), 400, "empty")
    # a real, small file that inflates to 4 M pixels: refused from its header, never decoded
    bomb = _png((2000, 2000), "1")
    assert len(bomb) < LIMIT_BODY
    _assert_error(post(files={"image": ("x.png", bomb)}), 413, "pixels")
    # body over max_body_bytes: with Content-Length, and streamed (chunked, no length)
    big = b"x" * (LIMIT_BODY + 1)
    _assert_error(post(data=big, headers={"content-type": "application/json"}), 413, "limit")
    _assert_error(
        post(
            data=iter([big[:100_000], big[100_000:]]), headers={"content-type": "application/json"}
        ),
        413,
        "limit",
    )
    b64 = base64.b64encode(png).decode()
    _assert_error(post(json={"image_b64": b64, "token_set": "nope"}), 404, "unknown token set")
    _assert_error(post(json={"image_b64": b64, "top_k": 0}), 422, "top_k")
    _assert_error(post(json={"image_b64": b64, "scorer": "bogus"}), 422, "scorer")
    _assert_error(post(json={"image_b64": b64, "colour": "red"}), 422, "colour")
    _assert_error(post(json={"top_k": 2}), 422, "image_b64")
    _assert_error(post(json=[1, 2]), 422)
    _assert_error(post(json={"image_b64": "%%% not base64 %%%"}), 400, "base64")
    _assert_error(
        post(data=b"{not json", headers={"content-type": "application/json"}), 400, "JSON"
    )
    _assert_error(post(data=b"raw", headers={"content-type": "text/plain"}), 415)
    _assert_error(post(files={"image": ("x.png", png)}, data={"top_k": "three"}), 422, "top_k")
    _assert_error(post(files={"picture": ("x.png", png)}), 422, "image")
    _assert_error(requests.get(f"{server.url}/v1/nothing-here", timeout=30), 404)
    g = f"{server.url}/v1/generate"
    _assert_error(requests.post(g, json={"label": "b9"}, timeout=30), 404, "label")
    _assert_error(requests.post(g, json={"label": "b0", "token_set": "zz"}, timeout=30), 404)
    _assert_error(requests.post(g, json={"label": "b0", "steps": 51}, timeout=30), 422, "steps")
    _assert_error(requests.post(g, json={"label": "b0", "n": 0}, timeout=30), 422, "n")
    # still answering, with the right labels
    r = server.classify(server.images[1])
    assert r.status_code == 200
    assert r.json()["labels"] == server.expected[("a", "diffusion")][rel(server.images[1])][0]


def test_generate_returns_png(server):
    r = requests.post(
        f"{server.url}/v1/generate", json={"label": "b2", "token_set": "b", "steps": 3}, timeout=120
    )
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    im = Image.open(io.BytesIO(r.content))
    assert im.format == "PNG" and im.size == (128, 128)  # one 32 px tile, enlarged like the CLI


def test_concurrent_burst_is_batched_without_errors(server):
    """12 requests at once over two token sets: all succeed, each with its own image's and
    set's labels, and the classifier scored batches of more than one request."""
    before = requests.get(f"{server.url}/v1/stats", timeout=30).json()
    jobs = [(server.images[i % len(server.images)], "ab"[i % 2]) for i in range(12)]
    with ThreadPoolExecutor(len(jobs)) as ex:
        results = list(ex.map(lambda j: server.classify(j[0], token_set=j[1], top_k=3), jobs))
    assert [r.status_code for r in results] == [200] * len(jobs), [r.text for r in results]
    for (path, key), r in zip(jobs, results, strict=True):
        assert r.json()["labels"] == server.expected[(key, "diffusion")][rel(path)][0][:3]
    sizes = [r.json()["batch_size"] for r in results]
    assert max(sizes) > 1 and max(sizes) <= MAX_BATCH
    after = requests.get(f"{server.url}/v1/stats", timeout=30).json()
    assert after["requests"] - before["requests"] == len(jobs)
    grown = {int(n) for n, c in after["batch_sizes"].items() if c > before["batch_sizes"].get(n, 0)}
    assert max(grown) > 1


def test_over_capacity_is_a_fast_503_then_recovers(server):
    """While a long generation holds the classifier, a burst larger than
    max_ongoing_requests + max_queued_requests gets 503s (JSON, Retry-After) at once, not a
    hang; everything admitted still succeeds, and the server answers afterwards."""
    blocker: list = []
    t = threading.Thread(
        target=lambda: blocker.append(
            requests.post(
                f"{server.url}/v1/generate",
                json={"label": "b0", "token_set": "b", "n": 4, "steps": 50},
                timeout=300,
            )
        )
    )
    t.start()
    deadline = time.time() + 60  # wait until the generation holds the classifier
    while not requests.get(f"{server.url}/v1/stats", timeout=30).json()["ongoing"].get("generate"):
        assert time.time() < deadline and t.is_alive(), "the generation never started"
        time.sleep(0.05)
    n = 3 * (MAX_ONGOING + MAX_QUEUED)
    with ThreadPoolExecutor(n) as ex:
        results = list(
            ex.map(lambda i: server.classify(server.images[i % 2], timeout=300), range(n))
        )
    t.join()
    assert blocker and blocker[0].status_code == 200
    codes = [r.status_code for r in results]
    assert set(codes) <= {200, 503}, codes
    rejected = [r for r in results if r.status_code == 503]
    # all of the capacity was usable (the generation holds one slot), and the rest was refused
    assert len(results) - len(rejected) >= MAX_ONGOING + MAX_QUEUED - 1, codes
    assert rejected, codes
    for r in rejected:
        _assert_error(r, 503, "capacity")
        assert r.headers.get("retry-after") == "1"
    for r in results:
        if r.status_code == 200:
            assert r.json()["labels"] in [
                server.expected[("a", "diffusion")][rel(p)][0] for p in server.images[:2]
            ]
    assert requests.get(f"{server.url}/healthz", timeout=30).status_code == 200
    assert server.classify(server.images[0]).status_code == 200


def test_no_request_payload_in_logs(server):
    """Bodies carrying a marker (bad image, bad JSON, good PNG with a text chunk) never reach
    the Ray/Serve logs, while those logs do record the requests themselves."""
    from PIL.PngImagePlugin import PngInfo

    marker = f"PAYLOAD-{uuid.uuid4().hex}"
    rid = f"mcti-test-{uuid.uuid4().hex}"
    info = PngInfo()
    info.add_text("comment", marker)
    buf = io.BytesIO()
    Image.open(server.images[0]).save(buf, format="PNG", pnginfo=info)
    headers = {"X-Request-ID": rid}
    url = f"{server.url}/v1/classify"
    assert (
        requests.post(
            url, files={"image": ("x.png", buf.getvalue())}, headers=headers, timeout=60
        ).status_code
        == 200
    )
    r = requests.post(url, files={"image": ("x.png", marker.encode())}, headers=headers, timeout=60)
    assert r.status_code == 400
    r = requests.post(url, json={"image_b64": marker}, headers=headers, timeout=60)
    assert r.status_code == 400 and marker not in r.text  # not echoed to the client either
    r = requests.post(url, json={"image_b64": "aGk=", "top_k": marker}, headers=headers, timeout=60)
    assert r.status_code == 422 and marker not in r.text
    needles = [marker.encode(), base64.b64encode(marker.encode())[:24]]

    def logs() -> bytes:
        return b"".join(p.read_bytes() for p in server.log_dir.rglob("*") if p.is_file())

    deadline = time.time() + 20
    while rid.encode() not in (text := logs()) and time.time() < deadline:
        time.sleep(0.5)
    assert rid.encode() in text, "the Serve access log never recorded the requests"
    for needle in needles:
        assert needle not in text


def test_deeply_nested_json_is_a_400(server):
    """JSON nested past the parser's recursion limit is the client's mistake (400), not a 500."""
    deep = b"[" * 50_000  # within max_body_bytes; the parser gives up near 1000 levels
    for path in ("/v1/classify", "/v1/generate"):
        r = requests.post(
            f"{server.url}{path}",
            data=deep,
            headers={"content-type": "application/json"},
            timeout=30,
        )
        _assert_error(r, 400, "nested too deeply")
    inner = b'{"image_b64": "aGk=", "top_k": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    r = requests.post(
        f"{server.url}/v1/classify",
        data=inner,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    _assert_error(r, 400, "nested too deeply")
    assert server.classify(server.images[0]).status_code == 200


def _slow_post(url: str, path: str, body: bytes, seconds_per_byte: float) -> tuple[bytes, float]:
    """POST `body` a byte at a time; the server's answer and when it came (s after the start)."""
    host, port = url.removeprefix("http://").split(":")
    t0 = time.perf_counter()
    with socket.create_connection((host, int(port)), timeout=60) as s:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        s.sendall(head.encode())
        s.setblocking(False)
        answer = b""
        for byte in body:
            try:
                s.sendall(bytes([byte]))
            except OSError:
                break  # the server closed the connection
            deadline = time.perf_counter() + seconds_per_byte
            while time.perf_counter() < deadline:
                try:
                    chunk = s.recv(65536)
                except BlockingIOError:
                    time.sleep(0.05)
                    continue
                answer += chunk
                if not chunk or b"\r\n\r\n" in answer:
                    break
            if answer:
                break
        s.setblocking(True)
        s.settimeout(30)
        try:
            while chunk := s.recv(65536):
                answer += chunk
                if b"}" in answer.partition(b"\r\n\r\n")[2]:
                    break
        except OSError:
            pass
    return answer, time.perf_counter() - t0


def test_a_body_sent_at_one_byte_a_second_gets_408(server):
    """A slow client does not hold the connection: after body_timeout_s it gets a JSON 408."""
    body = json.dumps({"image_b64": "aGk=" * 10}).encode()
    for path in ("/v1/classify", "/v1/generate"):
        answer, took = _slow_post(server.url, path, body, seconds_per_byte=1.0)
        status_line, _, rest = answer.partition(b"\r\n")
        assert status_line.split()[1:2] == [b"408"], answer[:300]
        assert b"did not arrive within" in rest
        assert BODY_TIMEOUT_S <= took < BODY_TIMEOUT_S + 10, took  # not the whole body's 50 s
    assert server.classify(server.images[0]).status_code == 200


def _generate(server: Server, results: list, steps: int = 50) -> None:
    r = requests.post(
        f"{server.url}/v1/generate",
        json={"label": "b1", "token_set": "b", "n": 4, "steps": steps},
        timeout=300,
    )
    results.append((r, time.perf_counter()))


def test_generation_queue_is_bounded_and_classify_goes_first(server):
    """While max_generate_queue generations are in the classifier, another generate gets a fast
    503, and a classify is answered between generation steps, long before they finish."""
    results: list = []
    threads = [
        threading.Thread(target=_generate, args=(server, results))
        for _ in range(MAX_GENERATE_QUEUE)
    ]
    for t in threads:
        t.start()
    deadline = time.time() + 60
    while (
        requests.get(f"{server.url}/v1/stats", timeout=30).json()["ongoing"].get("generate", 0)
        < MAX_GENERATE_QUEUE
    ):
        assert time.time() < deadline, "the generations never started"
        time.sleep(0.02)
    t0 = time.perf_counter()
    over = requests.post(
        f"{server.url}/v1/generate", json={"label": "b1", "token_set": "b"}, timeout=60
    )
    fast = time.perf_counter() - t0
    r = server.classify(server.images[0])
    classified = time.perf_counter()
    for t in threads:
        t.join()
    _assert_error(over, 503, "generation queue")
    assert over.headers.get("retry-after") == "1" and fast < 5, fast
    assert r.status_code == 200
    assert r.json()["labels"] == server.expected[("a", "diffusion")][rel(server.images[0])][0]
    assert [g.status_code for g, _ in results] == [200] * MAX_GENERATE_QUEUE
    assert classified < min(done for _, done in results)  # not queued behind the generations


def test_reject_labels_unknown_and_stats_count_it(server, tiny_bundle):
    """`reject`: "label" is the best label or "unknown" (labels and scores unchanged), a bad
    value is a 422, a set whose open-set state cannot be fit is a 422, /v1/stats counts."""
    from mcti.core import openset

    root = server.images[0].parents[2]
    pixels = torch.stack([load_image(p, tiny_bundle.resolution) for p in server.images])
    labels = torch.tensor([int(p.parent.name[-1]) for p in server.images])
    ref = openset.Reference(tiny_bundle.clip_image_features(pixels).cpu(), labels, 3)
    openset.fit(ref).save(root / "tok-a")  # read by the replica on first use
    before = requests.get(f"{server.url}/v1/stats", timeout=30).json()["open_set"]
    path = server.images[0]
    want = server.expected[("a", "diffusion")][rel(path)][0]
    kept = server.classify(path, token_set="a", top_k=3, reject="-1e9").json()
    assert kept["label"] == kept["labels"][0] and kept["labels"] == want
    dropped = server.classify(path, token_set="a", top_k=3, reject=1e9).json()
    assert dropped["label"] == "unknown" and dropped["labels"] == want
    assert dropped["rejection_score"] == pytest.approx(kept["rejection_score"])
    auto = server.classify(path, token_set="a", reject="auto").json()
    assert auto["label"] in ("unknown", want[0])
    assert server.classify(path, token_set="a").json()["label"] is None  # off by default
    _assert_error(server.classify(path, reject="maybe"), 422, "reject")
    _assert_error(server.classify(path, token_set="b", reject="auto"), 422, "training images")
    after = requests.get(f"{server.url}/v1/stats", timeout=30).json()["open_set"]
    assert after["checked"] - before["checked"] == 3
    assert after["rejected"] - before["rejected"] == 1 + (auto["label"] == "unknown")


class TestFusedAndThousandsOfLabels:
    """A second application on the same Serve instance (route /f): a token set trained on
    tiny-random, with the fused scorer's state, and a random one of K = 1500 classes. Deleted
    after these tests (the test below counts classifier replicas)."""

    @pytest.fixture(scope="class")
    @classmethod
    def app(cls, server, tiny_bundle, tmp_path_factory):
        from ray import serve

        from mcti.cli import main
        from mcti.core.fused import FusedParams, FusedState, save_fused
        from serving.app import build_app
        from tests.mcti.cli.test_cli import TRAIN

        root = tmp_path_factory.mktemp("fused-app")
        data = make_image_folder(root / "data", n_classes=3, per_class=5, seed=1)
        fused = root / "tok-fused"
        assert main(["train", "--data", str(data), "--out", str(fused), *TRAIN]) == 0
        big = random_token_set(
            tiny_bundle, root / "tok-big", [f"item-{k:05d}" for k in range(1500)]
        )
        # its fused state: random shot features, one per class (the fused scorer is enabled
        # on this app, so every set needs one; its values do not matter here)
        res = tiny_bundle.resolution
        with torch.no_grad():
            dim = tiny_bundle.clip_image_features(torch.zeros(1, 3, res, res)).shape[1]
        g = torch.Generator().manual_seed(0)
        feats = torch.nn.functional.normalize(torch.randn(1500, dim, generator=g), dim=1)
        save_fused(big, FusedState(feats, torch.arange(1500), 1500, FusedParams()))
        images = sorted(data.glob("*/img4.png"))
        expected = {s: library_json(images, fused, s, 3) for s in ("fused", "clip")}
        cfg = dict(
            tokens={"fused": str(fused), "big": str(big)},
            model="tiny-random",
            device="cpu",
            scorer="fused",
            scorers=["fused", "clip"],
            num_cpus=0,  # beside the module's classifier on the 2-CPU Ray instance
            enable_generate=False,
        )
        serve.run(build_app(cfg), name="fused", route_prefix="/f")
        try:
            yield Server(f"{server.url}/f", images, expected, server.log_dir)
        finally:
            serve.delete("fused")

    def test_probs_equal_library_classify(self, app):
        """The fused scorer's calibrated probabilities: those of `mcti classify --json`, per
        label; null for the clip scorer, which has none."""
        for path in app.images:
            want = app.expected["fused"][rel(path)]
            r = app.classify(path, token_set="fused", top_k=3)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["scorer"] == "fused" and body["labels"] == want["labels"]
            assert body["scores"] == pytest.approx(want["scores"], abs=2e-6, rel=1e-5)
            assert body["probs"] == pytest.approx(want["probs"], abs=2e-6, rel=1e-5)
            assert sum(body["probs"]) == pytest.approx(1, abs=1e-5)  # all 3 classes listed
            assert body["probs"] == sorted(body["probs"], reverse=True)
            clip = app.classify(path, token_set="fused", scorer="clip", top_k=3).json()
            assert "probs" not in app.expected["clip"][rel(path)]
            assert (
                clip["probs"] is None
                and clip["labels"] == app.expected["clip"][rel(path)]["labels"]
            )
        spec = requests.get(f"{app.url}/openapi.json", timeout=30).json()
        assert "probs" in spec["components"]["schemas"]["ClassifyResponse"]["properties"]

    def test_token_sets_page_through_thousands_of_labels(self, app):
        """K = 1500: one page of labels per set (default 1000) with the total and the next
        offset; the pages put together are the labels in order; a bad page is a 422."""
        url = f"{app.url}/v1/token-sets"
        t0 = time.perf_counter()
        body = requests.get(url, timeout=30).json()
        first_s = time.perf_counter() - t0
        sets = {s["id"]: s for s in body["token_sets"]}
        small, big = sets["fused"], sets["big"]
        assert small["labels"] == ["sku-0000", "sku-0001", "sku-0002"]
        assert small["next_offset"] is None and small["labels_offset"] == 0
        assert big["n_classes"] == 1500 and len(big["labels"]) == 1000
        assert big["next_offset"] == 1000
        labels, offset, times = [], 0, []
        while offset is not None:
            t0 = time.perf_counter()
            r = requests.get(url, params={"offset": offset, "limit": 400}, timeout=30)
            times.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
            page = {s["id"]: s for s in r.json()["token_sets"]}["big"]
            assert page["labels_offset"] == offset and len(page["labels"]) <= 400
            labels += page["labels"]
            offset = page["next_offset"]
        assert labels == [f"item-{k:05d}" for k in range(1500)] and len(times) == 4
        assert max(first_s, *times) < 5.0, (first_s, times)  # quick, even on a busy CPU
        for bad in ({"limit": 0}, {"limit": 10_001}, {"offset": -1}, {"limit": "all"}):
            _assert_error(requests.get(url, params=bad, timeout=30), 422, next(iter(bad)))
        spec = requests.get(f"{app.url}/openapi.json", timeout=30).json()
        names = {p["name"] for p in spec["paths"]["/v1/token-sets"]["get"]["parameters"]}
        assert names == {"offset", "limit"}

    def test_classify_among_thousands_of_classes(self, app):
        """The 1500-class set answers with the fused and clip scorers: top_k of its labels,
        probabilities with fused."""
        for scorer in ("fused", "clip"):
            r = app.classify(app.images[0], token_set="big", scorer=scorer, top_k=5)
            assert r.status_code == 200, r.text
            body = r.json()
            assert len(body["labels"]) == 5 and all(x.startswith("item-") for x in body["labels"])
            assert (body["probs"] is None) == (scorer == "clip")
            if scorer == "fused":
                assert 0 < sum(body["probs"]) <= 1 + 1e-6


def test_healthz_asks_the_classifier_every_time(server):
    """Kill the classifier replica: /healthz says 503 at once (it is not a cached first answer),
    and 200 again once Serve has replaced the replica. Runs last: it restarts the classifier."""
    assert requests.get(f"{server.url}/healthz", timeout=30).status_code == 200
    names = [
        a for a in ray.util.list_named_actors(all_namespaces=True) if "MctiClassifier" in a["name"]
    ]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=True)
    t0 = time.perf_counter()
    r = requests.get(f"{server.url}/healthz", timeout=30)
    _assert_error(r, 503, "classifier")
    assert time.perf_counter() - t0 < 10
    deadline = time.time() + 180
    while requests.get(f"{server.url}/healthz", timeout=30).status_code != 200:
        assert time.time() < deadline, "the classifier never came back"
        time.sleep(1)
    assert server.classify(server.images[1]).status_code == 200
