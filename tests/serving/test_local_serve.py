"""`mcti serve` as a process manager runs it: a subprocess in its own session, SIGINT ignored as
a background job inherits it. Every listening socket of the whole session is on loopback, Ray's
token auth is on with a token file only its owner can read, SIGHUP makes it read its token
directory again (same replica process), and SIGINT or SIGTERM to the server alone stops
everything."""

import io
import ipaddress
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from benchmarks.common import free_port, random_token_set

requests = pytest.importorskip("requests")
pytest.importorskip("ray")

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def session_pids(sid: int) -> set[int]:
    pids = set()
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if os.getsid(int(p)) == sid:
                    pids.add(int(p))
            except OSError:
                pass
    return pids


def listening(pids: set[int]) -> list[tuple[str, str]]:
    """(local address, process name) of every listening TCP socket held by one of `pids`."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        if {int(p) for p in re.findall(r"pid=(\d+)", line)} & pids:
            names = re.findall(r'\("([^"]+)"', line)
            found.append((line.split()[3], names[0] if names else "?"))
    return found


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]").split("%")[0]
    if host == "*":
        return False
    ip = ipaddress.ip_address(host)
    return ip.is_loopback or bool(ip.version == 6 and ip.ipv4_mapped and ip.ipv4_mapped.is_loopback)


def _classify(port: int) -> dict:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, format="PNG")
    files = {"image": ("x.png", buf.getvalue(), "image/png")}
    r = requests.post(
        f"http://127.0.0.1:{port}/v1/classify", files=files, data={"top_k": "9"}, timeout=120
    )
    assert r.status_code == 200, r.text
    return r.json()


def _wait_line(lines: list[str], words: str, after: int, proc, deadline_s: float = 120) -> str:
    end = time.time() + deadline_s
    while True:
        found = [x for x in lines[after:] if words in x]
        if found:
            return found[0]
        assert proc.poll() is None, "".join(lines[-20:])
        assert time.time() < end, "".join(lines[-20:])
        time.sleep(0.2)


def check_sighup_rereads_the_token_dir(proc, lines: list[str], port: int, tokens: Path, bundle):
    """The directory is rewritten with one more class, then moved away: SIGHUP applies the
    first in the running replica and reports the second, which leaves the first serving."""
    pid = requests.get(f"http://127.0.0.1:{port}/v1/stats", timeout=30).json()["pid"]
    assert sorted(_classify(port)["labels"]) == ["a0", "a1", "a2"]
    random_token_set(bundle, tokens, ["a0", "a1", "a2", "a3"], seed=5)
    n = len(lines)
    os.kill(proc.pid, signal.SIGHUP)
    assert "default (4 classes)" in _wait_line(lines, "token sets applied", n, proc)
    assert sorted(_classify(port)["labels"]) == ["a0", "a1", "a2", "a3"]
    tokens.rename(tokens.with_name("moved-away"))
    n = len(lines)
    os.kill(proc.pid, signal.SIGHUP)
    assert "not a token directory" in _wait_line(lines, "not applied", n, proc)
    assert sorted(_classify(port)["labels"]) == ["a0", "a1", "a2", "a3"]
    health = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=30).json()
    assert health["status"] == "degraded" and "not a token directory" in health["token_sets_error"]
    assert requests.get(f"http://127.0.0.1:{port}/v1/stats", timeout=30).json()["pid"] == pid


def test_is_loopback_reads_ss_addresses():
    assert is_loopback("127.0.0.1:80") and is_loopback("[::ffff:127.0.0.1]:80")
    assert is_loopback("[::1]:80") and is_loopback("127.0.0.53%lo:53")
    for outside in ("*:80", "0.0.0.0:80", "[::]:80", "192.0.2.2:80", "[::ffff:10.0.0.1]:80"):
        assert not is_loopback(outside)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_binds_loopback_only_with_token_auth_and_stops_cleanly(tmp_path, tiny_bundle, stop):
    if not Path("/proc/self/stat").exists() or not shutil.which("ss"):
        pytest.skip("needs Linux /proc and ss (iproute2)")
    tokens = random_token_set(tiny_bundle, tmp_path / "tok", ["a0", "a1", "a2"])
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    token = home / ".ray" / "auth_token"
    token.write_text("0123456789abcdef" * 4)
    token.chmod(0o644)  # as Ray writes it: every local user can read it
    port = free_port()
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(REPO)}
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "mcti", "serve", "--tokens", str(tokens), "--model"]
    cmd += ["tiny-random", "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--cpus", "1", "--n-samples", "2,4", "--to-keep", "2,1"]
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own session: every Ray process it starts stays in it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # as `cmd &` gets it
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 240
        while not any("Ray listens on" in x for x in lines):
            assert proc.poll() is None, "".join(lines[-20:])
            assert time.time() < deadline, "".join(lines[-20:])
            time.sleep(0.5)
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=30).status_code == 200

        pids = session_pids(proc.pid)
        sockets = listening(pids)
        names = {name for _, name in sockets}
        # the whole instance is seen: the server, GCS, raylet, and Serve's actors
        assert {"gcs_server", "raylet", "ray::ProxyActor"} <= names, sockets
        assert sum(name.startswith("ray::ServeRepli") for _, name in sockets) >= 2, sockets
        assert f"127.0.0.1:{port}" in {a for a, _ in sockets}
        outside = [(a, n) for a, n in sockets if not is_loopback(a)]
        assert not outside, f"listening beyond loopback: {outside}"

        assert stat.S_IMODE(token.stat().st_mode) == 0o600
        # The Ray processes run with it (the server's own /proc environ is that of its exec)
        ray_pids = [
            p
            for p in pids
            if re.search(r"gcs_server|raylet", Path(f"/proc/{p}/cmdline").read_text())
        ]
        assert len(ray_pids) >= 2
        for p in ray_pids:
            environ = Path(f"/proc/{p}/environ").read_bytes().split(b"\0")
            assert b"RAY_AUTH_MODE=token" in environ, p
        assert any("token auth on" in x and "0600" in x for x in lines)
        if stop == signal.SIGTERM:  # one of the two runs: each start costs half a minute
            check_sighup_rereads_the_token_dir(proc, lines, port, tokens, tiny_bundle)

        os.kill(proc.pid, stop)  # to the server alone, as a process manager sends it
        assert proc.wait(timeout=120) == 0, "".join(lines[-20:])
        reader.join(10)
        assert any("shutting down" in x for x in lines)
        assert not any("Traceback" in x for x in lines), "".join(lines)
        deadline = time.time() + 30
        while left := session_pids(proc.pid):
            assert time.time() < deadline, f"still running after the server exited: {left}"
            time.sleep(0.5)
    finally:
        if proc.poll() is None:  # a failed check: stop what this test started
            for p in session_pids(proc.pid):
                os.kill(p, signal.SIGKILL)
            proc.wait()
