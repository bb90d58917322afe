"""Run Python code in a fresh interpreter where some packages are not installed, as for a user
without an extra ([serve], [distributed], [triton], [plots], [demo]).

A `None` entry in sys.modules is how Python spells "not importable": `import ray` raises
ModuleNotFoundError (so does `import ray.serve`) and `importlib.util.find_spec("ray")` returns None,
which is what transformers, diffusers and torch use to probe optional packages.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PRELUDE = """
import sys
BLOCKED = {blocked!r}
_already = sorted(n for n in BLOCKED if sys.modules.get(n) is not None)
assert not _already, f"imported before the block: {{_already}}"
for _name in BLOCKED:
    sys.modules[_name] = None

def assert_still_blocked():
    leaked = sorted(
        n for n, m in sys.modules.items()
        if m is not None and n.partition(".")[0] in BLOCKED
    )
    assert not leaked, f"blocked packages were imported anyway: {{leaked[:5]}}"
"""


def run_without(
    blocked: list[str], code: str, cwd: Path, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run PRELUDE + code with `python -c` in `cwd`, this checkout first on sys.path."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    script = PRELUDE.format(blocked=sorted(blocked)) + code
    return subprocess.run(
        [sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
