"""Shared by the CLI tests: the tiny training settings and one trained token set per module."""

import pytest

from mcti.cli import main
from tests.conftest import make_image_folder

TRAIN = [
    "--model",
    "tiny-random",
    "--steps",
    "4",
    "--batch-size",
    "4",
    "--shots",
    "3",
    "--quiet",
    "--device",
    "cpu",
    "--draws",
    "1",
    "--negatives",
    "1",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(data folder, token dir): 3 classes x 5 images of tiny-random, trained with TRAIN."""
    root = tmp_path_factory.mktemp("cli")
    data = make_image_folder(root / "data", n_classes=3, per_class=5)
    assert main(["train", "--data", str(data), "--out", str(root / "tok"), *TRAIN]) == 0
    return data, root / "tok"
