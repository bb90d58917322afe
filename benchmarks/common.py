"""Helpers the benchmarks and tests share: a free loopback port, synthetic images, a random token
set, latency percentiles, a plain-text table and the memory of a process tree. Import as `benchmarks.common` (a benchmark run as a script
puts the repository root on sys.path first)."""

import io
import socket
from pathlib import Path

import numpy as np
from PIL import Image


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def square_on_noise(rng: np.random.Generator, size: int, colour=None) -> np.ndarray:
    """(size, size, 3) uint8: a centre square of `colour` (default: drawn from rng after the
    noise) on dark noise."""
    a = (rng.random((size, size, 3)) * 60).astype(np.uint8)
    a[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = (
        rng.integers(0, 255, 3) if colour is None else colour
    )
    return a


def synthetic_pngs(n: int, size: int, seed: int = 0) -> list[bytes]:
    """n PNG files, each a random colour's square on noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = square_on_noise(rng, size)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def random_token_set(bundle, out: Path, labels: list[str], seed: int = 0, method: str = "test"):
    """A token set as training writes it, with distinct random class vectors (no training:
    speed and serving do not depend on it). Returns `out`."""
    import torch

    from mcti.core.store import save_tokens
    from mcti.core.tokens import TokenSet, TokenTable

    init = TokenSet(bundle, len(labels), 1).init_vector("object")
    table = TokenTable(len(labels), 1, init)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        table.vectors.add_(torch.randn(table.vectors.shape, generator=g) * init.norm())
    save_tokens(out, table, labels, bundle, {"method": method})
    return out


def percentiles(seconds: list[float]) -> dict:
    """p50/p95/p99 in milliseconds (None when there is nothing to measure)."""
    if not seconds:
        return {"p50": None, "p95": None, "p99": None}
    q = np.percentile(np.array(seconds) * 1e3, [50, 95, 99])
    return {"p50": float(q[0]), "p95": float(q[1]), "p99": float(q[2])}


def table(columns: list[tuple[str, int, str]], rows: list[dict]) -> str:
    """A plain-text table: columns are (key, width, format spec); the first is left-aligned."""
    head = "".join(f"{k:<{w}}" if i == 0 else f"{k:>{w}}" for i, (k, w, _) in enumerate(columns))
    lines = [head]
    for row in rows:
        cells = []
        for i, (k, w, spec) in enumerate(columns):
            v = row.get(k)
            text = "-" if v is None else format(v, spec)
            cells.append(f"{text:<{w}}" if i == 0 else f"{text:>{w}}")
        lines.append("".join(cells))
    return "\n".join(lines)


def descendants(root_pid: int) -> list[int]:
    """The pids of every process under root_pid (children, grandchildren, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p.name))
    todo, found = list(children.get(root_pid, [])), []
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def process_memory(root_pid: int) -> dict:
    """PSS (shared pages split fairly) and RSS of the processes under root_pid (e.g. the Ray
    processes a driver started), by role: the command name, or the Ray actor's name."""
    procs = descendants(root_pid)
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
