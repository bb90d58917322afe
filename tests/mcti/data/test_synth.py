"""The synthetic many-class generator: layout, determinism, opaque labels, distinct classes."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from mcti.data.folders import pil_to_tensor, scan_folder
from mcti.data.synth import (
    GLYPHS,
    MAX_CLASSES,
    ClassDesign,
    class_designs,
    class_labels,
    glyph_mask,
    render_class,
    write_synth,
)
from mcti.errors import UserError

K, PER_CLASS, TRAIN = 12, 4, 2


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_synth(root, K, PER_CLASS, TRAIN, seed=0, size=32)
    return root


def test_layout_counts_and_opaque_labels(synth):
    train, test = scan_folder(synth / "train"), scan_folder(synth / "test")
    assert train.classes == test.classes == class_labels(K)
    assert all(re.fullmatch(r"s\d{4}", c) for c in train.classes)
    assert len(train) == K * TRAIN and len(test) == K * (PER_CLASS - TRAIN)
    assert sorted(set(train.labels)) == list(range(K))
    assert {p.name for p in (synth / "train" / "s0000").iterdir()} == {"000.png", "001.png"}
    assert {p.name for p in (synth / "test" / "s0000").iterdir()} == {"002.png", "003.png"}
    with Image.open(synth / "test" / "s0011" / "003.png") as im:
        assert im.mode == "RGB" and im.size == (32, 32)
    # labels are a function of K only: nothing of the glyph or colours leaks into them
    assert class_labels(K) == [f"s{k:04d}" for k in range(K)]


def test_same_seed_same_bytes_other_seed_other_images(synth, tmp_path):
    write_synth(tmp_path / "again", K, PER_CLASS, TRAIN, seed=0, size=32)
    assert files_of(tmp_path / "again") == files_of(synth)
    write_synth(tmp_path / "other", K, PER_CLASS, TRAIN, seed=1, size=32)
    other, first = files_of(tmp_path / "other"), files_of(synth)
    assert other.keys() == first.keys() and all(other[f] != first[f] for f in first)


def test_smaller_k_is_a_prefix_of_larger_k(synth, tmp_path):
    write_synth(tmp_path / "k5", 5, PER_CLASS, TRAIN, seed=0, size=32)
    small, big = files_of(tmp_path / "k5"), files_of(synth)
    assert small and all(big[f] == small[f] for f in small)
    assert class_designs(5, 0) == class_designs(K, 0)[:5]


def test_all_designs_distinct_and_enough_of_them():
    assert MAX_CLASSES >= 2000
    designs = class_designs(MAX_CLASSES, seed=3)
    assert len(set(designs)) == MAX_CLASSES
    assert all(d.fg != d.bg for d in designs)
    # the seed's order spreads glyphs: the first 100 classes use many of them
    assert len({d.glyph for d in designs[:100]}) >= len(GLYPHS) // 2
    for bad in (0, MAX_CLASSES + 1):
        with pytest.raises(UserError, match="--classes"):
            class_designs(bad, 0)


def test_glyphs_fit_the_canvas_and_differ():
    masks = {g: np.asarray(glyph_mask(g, 128)) for g in GLYPHS}
    for g, m in masks.items():
        assert m.max() == 255, g
        border = np.concatenate(
            [m[:8].ravel(), m[-8:].ravel(), m[:, :8].ravel(), m[:, -8:].ravel()]
        )
        assert border.max() == 0, f"glyph {g!r} touches the edge"

    def small(im: Image.Image) -> np.ndarray:
        return np.asarray(im.resize((16, 16), Image.BOX)).astype(int)

    glyphs = np.stack([small(glyph_mask(g, 128)) for g in GLYPHS])  # (G, 16, 16)
    d = np.abs(glyphs[:, None] - glyphs[None]).mean((2, 3))  # (G, G)
    np.fill_diagonal(d, 255)
    assert d.min() > 10, "two glyphs look alike at 16x16"
    # a horizontal flip (mcti train --flip) must not turn one glyph into another (< and >)
    mirrored = np.stack([small(ImageOps.mirror(glyph_mask(g, 128))) for g in GLYPHS])
    d = np.abs(mirrored[:, None] - glyphs[None]).mean((2, 3))  # (G, G)
    np.fill_diagonal(d, 255)
    assert d.min() > 10, "a mirrored glyph looks like another glyph at 16x16"


def test_shots_of_one_class_differ_but_stay_close():
    design = ClassDesign("A", (255, 255, 255), (0, 0, 0))
    ims = render_class(design, 4, 32, np.random.default_rng(0))
    assert all(x.shape == (32, 32, 3) and x.dtype == np.uint8 for x in ims)
    assert len({x.tobytes() for x in ims}) == 4
    assert np.abs(ims[0].astype(int) - ims[1].astype(int)).mean() < 40


def test_classes_are_distinct_at_16x16(synth):
    """Nearest class mean on raw 16x16 pixels (what the embedded model sees) separates the test
    images: the classes are visible at the model's resolution, not only at 32x32."""

    def load(split: str) -> tuple[torch.Tensor, np.ndarray]:
        data = scan_folder(synth / split)
        x = torch.stack([pil_to_tensor(Image.open(data.root / p), 16) for p in data.paths])
        return x.flatten(1), np.array(data.labels)

    xs, ys = load("train")
    xe, ye = load("test")
    means = torch.stack([xs[torch.from_numpy(ys == k)].mean(0) for k in range(K)])  # (K, D)
    gaps = torch.cdist(means, means) + torch.eye(K) * 1e9
    assert gaps.min() > 1.0  # every pair of class means differs
    pred = torch.cdist(xe, means).argmin(1).numpy()
    assert (pred == ye).mean() >= 0.9  # chance is 1/12
