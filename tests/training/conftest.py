"""Small, fast settings for real data-parallel runs on the tiny model (gloo, CPU)."""

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import make_image_folder
from training.cli import DistTrainArgs

# Few rows per step (4 images x (1 + 1 negative) x 1 draw): launches dominate, not steps.
SMALL = dict(
    model="tiny-random",
    shots=2,
    batch_size=4,
    steps=8,
    save_every=2,
    negatives=1,
    draws=1,
    seed=3,
    quiet=True,
    device="cpu",
    timeout_s=60.0,
)


def small_args(data: Path, out: Path, **kw) -> DistTrainArgs:
    return DistTrainArgs(data=str(data), out=str(out), **{**SMALL, **kw})


def cli_flags(data: Path, out: Path, **kw) -> list[str]:
    from training.launch import flags_of

    return flags_of(small_args(data, out, **kw))


def token_matrix(out: Path) -> torch.Tensor:
    """(K, d) tokens of a token directory, in class order."""
    sd = load_file(str(Path(out) / "learned_embeds.safetensors"))
    return torch.stack([sd[f"<mcti-{k}>"][0] for k in range(len(sd))])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("training") / "data", n_classes=3, per_class=4)


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs use one thread, as each torchrun rank does (OMP_NUM_THREADS=1): on a
    small shared machine two threads per process only fight over the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="package", autouse=True)
def clean_process_state():
    """In-process runs start a one-process group and set RANK, WORLD_SIZE, DS_ACCELERATOR ...:
    undo that after this package, so the rest of a test session sees a plain process."""
    env = dict(os.environ)
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(env)
