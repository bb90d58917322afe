"""`mcti serve` end to end in a child process: it answers on loopback, and Ctrl-C (SIGINT)
shuts Serve and Ray down cleanly (exit 0, port released)."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import make_image_folder

requests = pytest.importorskip("requests")
pytest.importorskip("ray")

pytestmark = pytest.mark.slow


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_mcti_serve_runs_and_stops_on_ctrl_c(tmp_path, tiny_bundle):
    from mcti.core.store import save_tokens
    from mcti.core.tokens import TokenTable

    table = TokenTable(3, 1, torch.zeros(tiny_bundle.hidden_size))
    with torch.no_grad():
        table.vectors.normal_(generator=torch.Generator().manual_seed(0))
    save_tokens(tmp_path / "tok", table, ["p", "q", "r"], tiny_bundle)
    image = next((make_image_folder(tmp_path / "data", n_classes=1, per_class=1)).glob("*/*.png"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "mcti", "serve", "--tokens", f"main={tmp_path / 'tok'}"]
    cmd += [
        "--model",
        "tiny-random",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--cpus",
        "2",
        "--n-samples",
        "2,4",
    ]
    cmd += ["--to-keep", "2,1", "--no-generate"]
    out, err = open(tmp_path / "out.txt", "w+b"), open(tmp_path / "err.txt", "w+b")
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "err.txt").read_text()[-3000:]
            assert time.time() < deadline, "mcti serve did not become ready"
            try:
                if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or no app behind it yet
                pass
            time.sleep(1)
        r = requests.post(f"{url}/v1/classify", files={"image": image.open("rb")}, timeout=120)
        assert r.status_code == 200 and r.json()["token_set"] == "main"
        assert set(r.json()["labels"]) <= {"p", "q", "r"}
        r = requests.post(f"{url}/v1/generate", json={"label": "p"}, timeout=60)
        assert r.status_code == 404 and "disabled" in r.json()["error"]
        ray_procs = descendants(proc.pid)  # raylet, GCS, workers, replicas, proxy
        assert len(ray_procs) >= 3
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert proc.wait(timeout=120) == 0, (tmp_path / "err.txt").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()
        err.close()
    log = (tmp_path / "err.txt").read_text()
    assert "main (3 classes)" in log and "shutting down" in log
    deadline = time.time() + 30
    while (left := [p for p in ray_procs if alive(p)]) and time.time() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left running after mcti serve exited: {left}"
    with socket.socket() as s:  # nothing listens on the HTTP port any more
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
