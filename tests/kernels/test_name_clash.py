"""Name clash to guard (see kernels/__init__.py): our top-level `kernels` has the import name of
Hugging Face's `kernels` library, which transformers and diffusers probe when they are imported.
This test keeps the promise that, with this project installed, both libraries answer False to
`is_kernels_available()` and importing them does not import our `kernels`.

How they probe (transformers 5.24.0, diffusers 0.42.1):
- transformers.utils.import_utils.is_kernels_available(): importlib.util.find_spec("kernels") (finds
  ours), then the version of the distribution providing it: "kernels" (none), else the names from
  importlib.metadata.packages_distributions() -> "mcti" (from its top_level.txt) -> our version,
  which must fall outside [KERNELS_MIN_VERSION, KERNELS_MAX_VERSION) = [0.18.2, 0.19.0) or it would
  `from kernels import get_kernel`. Only when no distribution claims `kernels` (source tree on
  sys.path, project not installed) does it import the module and read `__version__` (ours has none,
  so the answer is still False, at the price of importing torch, and triton if installed).
- diffusers.utils.import_utils: at import, find_spec("kernels") then
  importlib_metadata.version("kernels") -> PackageNotFoundError -> False; never imports it.
Each probe runs in a fresh interpreter: both libraries cache the answer at first use.
"""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = str(ROOT / "kernels")

PROBE = r"""
import json, sys
import transformers, diffusers
from transformers import CLIPTextModel  # what loading SD's text encoder imports
from diffusers import UNet2DConditionModel
from transformers.utils import import_utils as tf
from diffusers.utils import import_utils as df

def ours():
    mod = sys.modules.get("kernels")
    return getattr(mod, "__file__", None) if mod else None

out = {"after_import": ours()}
out["tf"] = tf.is_kernels_available()
out["df"] = df.is_kernels_available()
out["tf_version"] = tf._is_package_available("kernels", return_version=True)[1]
out["tf_range"] = [tf.KERNELS_MIN_VERSION, tf.KERNELS_MAX_VERSION]
out["after_probe"] = ours()
print(json.dumps(out))
"""


def _installed() -> bool:
    try:
        importlib.metadata.distribution("mcti")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _probe(tmp_path: Path, on_path: bool) -> dict:
    """Run PROBE from a neutral cwd; `on_path` also puts the source tree on PYTHONPATH."""
    env = dict(os.environ)
    if on_path:
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        )
    run = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _is_ours(path: str | None) -> bool:
    return path is not None and str(Path(path).resolve()).startswith(OURS)


def test_our_kernels_is_not_taken_for_hf_kernels(tmp_path):
    """Installed: neither library sees HF kernels nor imports ours. Merely on sys.path (CI without
    install): both answers are still False, though transformers' last-resort probe imports ours."""
    installed = _installed()
    res = _probe(tmp_path, on_path=not installed)
    assert res["tf"] is False and res["df"] is False, res
    assert not _is_ours(res["after_import"]), f"importing transformers/diffusers imported {res}"
    if not installed:
        pytest.skip("project not installed (pip install -e . --no-deps): import checks skipped")
    assert not _is_ours(res["after_probe"]), f"is_kernels_available() imported our kernels: {res}"
    # transformers resolved `kernels` to our distribution's version: keep it out of HF's range.
    ours = importlib.metadata.version("mcti")
    assert res["tf_version"] == ours, res
    lo, hi = (tuple(int(p) for p in v.split(".")[:3]) for v in res["tf_range"])
    mine = tuple(int(p) for p in ours.split("+")[0].split(".")[:3])
    assert not lo <= mine < hi, f"mcti {ours} falls in HF kernels' range {res['tf_range']}"
