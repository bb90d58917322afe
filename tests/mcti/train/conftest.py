"""The token set that the extension tests extend (trained once for the package)."""

import shutil

import pytest

from mcti.cli import main
from tests.conftest import make_image_folder
from tests.mcti.train.test_resume_interop import ARGS, train_argv

SMALL = ["--steps", "3", *ARGS[2:]]  # 3 steps, checkpoint every 2


def split_folder(root, n_old: int, n_new: int):
    """root/all with n_old + n_new classes, and root/old, root/new holding the first n_old and
    the last n_new of them."""
    full = make_image_folder(root / "all", n_classes=n_old + n_new, per_class=3)
    for k, cls in enumerate(sorted(p.name for p in full.iterdir())):
        shutil.copytree(full / cls, root / ("old" if k < n_old else "new") / cls)
    return root / "old", root / "new"


@pytest.fixture(scope="package")
def old_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("extend")
    old, new = split_folder(root, 3, 2)
    assert main(train_argv(old, root / "old-tok", *SMALL)) == 0
    return old, new, root / "old-tok"
