"""Rolling out token sets to a live server: one Ray + Serve instance on loopback for the module,
deployed as `mcti serve` and `serve deploy` deploy it (settings as args, token sets as the
classifier's user_config), then updated with new user_configs while requests keep coming.
"""

import json
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks.common import free_port, random_token_set
from mcti.cli.serve import patient_proxy_checks
from serving.local_ray import REQUEST_TIMEOUT_S, deploy, wait_running
from tests.conftest import make_image_folder

requests = pytest.importorskip("requests")
ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow

OLD = ["sku-0", "sku-1", "sku-2"]
NEW = [*OLD, "sku-new"]  # one more class
SWAP_WITHIN_S = 30.0  # "within seconds", with room for a loaded 2-core test machine


@dataclass
class Live:
    url: str
    root: Path
    image: bytes
    settings: dict  # AppConfig keys, tokens aside

    def classify(self, timeout: float = 60) -> requests.Response:
        files = {"image": ("x.png", self.image, "image/png")}
        return requests.post(
            f"{self.url}/v1/classify", files=files, data={"top_k": "10"}, timeout=timeout
        )

    def get(self, path: str) -> requests.Response:
        return requests.get(f"{self.url}{path}", timeout=30)

    def roll_out(self, tokens: dict[str, Path], versions: dict | None = None) -> None:
        """What `serve deploy` of an edited config file does: only the user_config differs."""
        from serving.config import load_config

        cfg = load_config({**self.settings, "tokens": {k: str(v) for k, v in tokens.items()}})
        deploy(cfg, versions or {})


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_bundle):
    from ray import serve

    from serving.config import load_config

    root = tmp_path_factory.mktemp("rollout")
    random_token_set(tiny_bundle, root / "run-001", OLD, 0)
    image = next(make_image_folder(root / "data", n_classes=1, per_class=1).glob("*/*.png"))
    settings = dict(
        model="tiny-random",
        device="cpu",
        scorer="clip",  # cheap requests: the stream is dense
        scorers=["clip"],
        max_batch_size=4,
        batch_wait_timeout_s=0.01,
        max_ongoing_requests=8,
        max_queued_requests=64,
    )
    port = free_port()
    patient_proxy_checks()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20)
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": REQUEST_TIMEOUT_S}
        )
        deploy(load_config({**settings, "tokens": {"default": str(root / "run-001")}}), {})
        wait_running(serve, timeout_s=300)
        yield Live(f"http://127.0.0.1:{port}", root, image.read_bytes(), settings)
    finally:
        serve.shutdown()
        ray.shutdown()


class Stream:
    """Classify requests back to back from `n` threads; every answer or failure is kept."""

    def __init__(self, live: Live, n: int = 2):
        self.live, self.stop = live, threading.Event()
        self.answers: list[tuple[float, float, list[str]]] = []  # (sent, answered, labels)
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]

    def _run(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                r = self.live.classify()
            except Exception as e:
                self.failures.append(f"{type(e).__name__}: {e}")
                continue
            if r.status_code != 200:
                self.failures.append(f"{r.status_code}: {r.text[:200]}")
            else:
                self.answers.append((t0, time.monotonic(), r.json()["labels"]))

    def __enter__(self) -> "Stream":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(90)

    def first_with(self, label: str, deadline_s: float) -> float | None:
        """When the first answer naming `label` arrived (waits up to deadline_s)."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            hits = [done for _, done, labels in list(self.answers) if label in labels]
            if hits:
                return min(hits)
            time.sleep(0.05)
        return None


def _pid(live: Live) -> int:
    return live.get("/v1/stats").json()["pid"]


def _wait_health(live: Live, want: str | dict, deadline_s: float = 60) -> dict:
    """/healthz once its status is `want` (a str) or its body is `want` (a dict), or at the
    deadline."""
    end = time.monotonic() + deadline_s
    while True:
        body = live.get("/healthz").json()
        if (body if isinstance(want, dict) else body.get("status")) == want:
            return body
        if time.monotonic() > end:
            return body
        time.sleep(0.2)


def test_swap_under_load_fails_no_request_and_keeps_the_replica(live, tiny_bundle):
    """A steady stream of requests across the swap to a set with one more class: none fails,
    every answer is wholly the old set or wholly the new one, the new label is answered within
    seconds, and the same replica process answers throughout."""
    pid = _pid(live)
    new_dir = random_token_set(tiny_bundle, live.root / "run-002", NEW, 1)
    with Stream(live) as stream:
        end = time.monotonic() + 60
        while len(stream.answers) < 10 and time.monotonic() < end:  # answers before the swap
            time.sleep(0.1)
        t_update = time.monotonic()
        live.roll_out({"default": new_dir})
        first = stream.first_with("sku-new", SWAP_WITHIN_S)
        time.sleep(1.0)  # answers after the swap too
    assert not stream.failures, stream.failures[:5]
    assert first is not None, f"no answer named the new label within {SWAP_WITHIN_S} s"
    assert first - t_update < SWAP_WITHIN_S
    before = [a for a in stream.answers if a[1] < t_update]
    after = [a for a in stream.answers if a[0] > first]
    assert before and after, (len(before), len(after))
    for _, _, labels in stream.answers:  # never a mix: one list of sets per batch
        assert sorted(labels) in (sorted(OLD), sorted(NEW)), labels
    assert all(sorted(labels) == sorted(NEW) for _, _, labels in after)
    assert _pid(live) == pid, "the classifier replica was replaced"
    sets = live.get("/v1/token-sets").json()
    assert sets["default"] == "default" and sets["token_sets"][0]["labels"] == NEW
    assert live.get("/healthz").json() == {"status": "ok", "token_sets": 1}


def _foreign(src: Path, out: Path) -> Path:
    """The same set, as if trained on another base model."""
    shutil.copytree(src, out)
    meta = json.loads((out / "classes.json").read_text())
    meta["base_model"]["fingerprint"] = "0" * len(meta["base_model"]["fingerprint"])
    meta["base_model"]["spec"] = "some/other-model"
    (out / "classes.json").write_text(json.dumps(meta))
    return out


def _corrupt(src: Path, out: Path) -> Path:
    shutil.copytree(src, out)
    (out / "learned_embeds.safetensors").write_bytes(b"\x00not safetensors" * 8)
    return out


def test_a_failed_swap_keeps_the_old_sets_and_healthz_says_why(live, tiny_bundle):
    """A missing directory, tokens of another base model, a corrupt file: each leaves the sets
    being served answering (same replica), and /healthz reports it (200, "degraded"); a good
    set then clears it. A second set is added in the same update as a bad one: all or nothing."""
    good = random_token_set(tiny_bundle, live.root / "run-003", NEW, 2)
    live.roll_out({"default": good})
    pid = _pid(live)
    extra = random_token_set(tiny_bundle, live.root / "extra", ["e0", "e1"], 3)
    bad = {
        "not a token directory": live.root / "missing",
        "base model": _foreign(good, live.root / "foreign"),
        "corrupt": _corrupt(good, live.root / "corrupt"),
    }
    for words, path in bad.items():
        live.roll_out({"default": good, "extra": extra, "new": path})
        body = _wait_health(live, "degraded")
        assert body["status"] == "degraded" and body["token_sets"] == 1, body
        assert words in body["token_sets_error"].lower() and "'new'" in body["token_sets_error"]
        r = live.classify()
        assert r.status_code == 200 and sorted(r.json()["labels"]) == sorted(NEW)
        assert [s["id"] for s in live.get("/v1/token-sets").json()["token_sets"]] == ["default"]
        assert _pid(live) == pid
        live.roll_out({"default": good})  # back to the served list: clears the report
        assert _wait_health(live, want := {"status": "ok", "token_sets": 1}) == want
    live.roll_out({"default": good, "extra": extra})
    assert _wait_health(live, want := {"status": "ok", "token_sets": 2}) == want
    r = requests.post(
        f"{live.url}/v1/classify",
        files={"image": ("x.png", live.image, "image/png")},
        data={"token_set": "extra"},
        timeout=60,
    )
    assert r.status_code == 200 and sorted(r.json()["labels"]) == ["e0", "e1"], r.text
    assert _pid(live) == pid
