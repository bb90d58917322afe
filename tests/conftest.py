"""Shared fixtures: a synthetic labelled image folder and the tiny-random model (CPU, fp32).

Skips: locally a test may skip when something optional is missing (a dataset, an extra), and its
reason shows in the `-ra` summary. Under CI=true (.ci/run), where every extra and dataset is
installed, a skip means something is missing: it fails instead, unless the test is marked `gpu`.
"""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
CI_SKIP = "skipped under CI=true, where every extra and dataset is installed: "


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if CI and report.skipped and not hasattr(report, "wasxfail"):
        if item.get_closest_marker("gpu") is None:
            report.outcome = "failed"
            report.longrepr = CI_SKIP + _skip_reason(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """Module-level skips (pytest.importorskip at the top of a file) under CI=true fail too."""
    outcome = yield
    report = outcome.get_result()
    if CI and report.skipped:
        report.outcome = "failed"
        report.longrepr = CI_SKIP + _skip_reason(report)


COLORS = [(220, 40, 40), (40, 40, 220), (40, 200, 40), (200, 200, 40)]


def make_image_folder(
    root: Path, n_classes: int = 3, per_class: int = 6, size: int = 32, seed: int = 0
) -> Path:
    """root/sku-XXXX/imgN.png: a coloured square per class on noise (opaque labels)."""
    rng = np.random.default_rng(seed)
    for k in range(n_classes):
        d = root / f"sku-{k:04d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = (rng.random((size, size, 3)) * 60).astype(np.uint8)
            lo, hi = size // 4, 3 * size // 4
            a[lo:hi, lo:hi] = COLORS[k % len(COLORS)]
            Image.fromarray(a).save(d / f"img{i}.png")
    return root


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Commands such as `mcti demo --threads 1` set torch's process-wide thread count; a test
    that runs one in-process must not change the arithmetic (reduction order) of later tests."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data")


@pytest.fixture(scope="session")
def tiny_bundle():
    from mcti.core.model import load_model

    return load_model("tiny-random", device="cpu")
