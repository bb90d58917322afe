"""The Serve application on loopback: one Ray + Serve instance for the whole module.

Reference for the labels: the library's own `mcti classify` (mcti.cli.main) on the same files
with the same scorer settings. Two token sets are hosted (3 and 4 classes) so that batches mix
sets and a mix-up would show as wrong labels.
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

from mcti.cli.serve import patient_proxy_checks
from tests.conftest import make_image_folder

requests = pytest.importorskip("requests")
ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow

SCHEDULE = ["--n-samples", "2,4", "--to-keep", "2,1"]  # small: ~10 UNet rows per image
LIMIT_BODY, LIMIT_PIXELS = 200_000, 1_000_000
MAX_BATCH, MAX_ONGOING, MAX_QUEUED = 4, 8, 8


def write_token_set(bundle, out: Path, labels: list[str], seed: int) -> Path:
    """A token set as training writes it, with distinct random vectors (no training needed)."""
    from mcti.core.store import save_tokens
    from mcti.core.tokens import TokenSet, TokenTable

    init = TokenSet(bundle, len(labels), 1).init_vector("object")
    table = TokenTable(len(labels), 1, init)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        table.vectors.add_(torch.randn(table.vectors.shape, generator=g) * init.norm())
    save_tokens(out, table, labels, bundle, {"method": "test"})
    return out


def library_classify(paths: list[Path], tokens: Path, scorer: str, top_k: int) -> dict:
    """`mcti classify --json` -> {rel(path): (labels, scores)}."""
    from mcti.cli import main

    buf = io.StringIO()
    args = ["classify", *map(str, paths), "--tokens", str(tokens), "--model", "tiny-random"]
    args += ["--device", "cpu", "--scorer", scorer, "--top-k", str(top_k), "--json", *SCHEDULE]
    with redirect_stdout(buf):
        assert main(args) == 0
    return {rel(Path(r["image"])): (r["labels"], r["scores"]) for r in json.loads(buf.getvalue())}


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_bundle):
    from ray import serve

    from serving.app import build_app

    root = tmp_path_factory.mktemp("serving")
    data = make_image_folder(root / "data", n_classes=3, per_class=2)
    images = sorted(data.glob("*/*.png"))
    sets = {
        "a": write_token_set(tiny_bundle, root / "tok-a", ["sku-0000", "sku-0001", "sku-0002"], 0),
        "b": write_token_set(tiny_bundle, root / "tok-b", ["b0", "b1", "b2", "b3"], 1),
    }
    expected = {
        ("a", "diffusion"): library_classify(images, sets["a"], "diffusion", 3),
        ("b", "diffusion"): library_classify(images, sets["b"], "diffusion", 4),
        ("b", "clip"): library_classify(images, sets["b"], "clip", 4),
    }
    port = _free_port()
    patient_proxy_checks()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
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
