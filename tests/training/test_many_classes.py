"""What breaks when K grows to thousands, caught at a small K (benchmarks/train_k.py runs the
real K = 1000 job): memory that grows as images x shots x classes, and the flags that reach the
DeepSpeed ranks of `mcti train --nproc N`."""

import json
import subprocess
import sys
import textwrap

import torch

from mcti.cli import main as mcti_main
from mcti.core.fused import cache_logp
from mcti.settings import TrainArgs
from training.cli import build_parser
from training.launch import flags_of, torchrun_command


def reference_cache_logp(f, feats, labels, K, beta, leave_out=False):
    """cache_logp written out class by class (what it must equal)."""
    aff = beta * (f @ feats.T - 1)  # (B, N)
    if leave_out:
        aff = aff.masked_fill(torch.eye(len(f), dtype=torch.bool), -torch.inf)
    out = torch.full((len(f), K), -1e4)
    for k in range(K):
        a = aff[:, labels == k]  # (B, n_k)
        n = (a > -torch.inf).sum(1)  # (B,) members left
        lme = a.logsumexp(1) - n.clamp(min=1).float().log()
        out[:, k] = torch.where(n > 0, lme, out[:, k])
    return out.log_softmax(1)


def test_cache_log_probabilities_equal_the_class_by_class_definition():
    g = torch.Generator().manual_seed(0)
    f = torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=1)
    y = torch.arange(30) % 6
    y[y == 5] = 4  # class 5 has no shot; class 4 has ten
    y[0] = 5  # ... now one: empty once that shot is left out
    for beta, leave in [(3.0, False), (30.0, True), (80.0, True)]:
        got = cache_logp(f, f, y, 7, beta, leave)
        torch.testing.assert_close(got, reference_cache_logp(f, f, y, 7, beta, leave))


def test_cache_memory_does_not_grow_as_images_x_shots_x_classes():
    """The fused scorer's fit scores all N shots against all N (leave-one-out) over K classes:
    at K = 1000 and 5 shots a (B, N, K) tensor is 100 GB. Here B = N = 1000, K = 500: such a
    tensor is 2 GB; the per-class reduction must stay within a few MB of (B, N)."""
    code = textwrap.dedent(
        """
        import resource, torch
        from mcti.core.fused import cache_logp
        torch.set_num_threads(1)
        f = torch.nn.functional.normalize(torch.randn(1000, 16), dim=1)
        y = torch.arange(1000) % 500
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = cache_logp(f, f, y, 500, 10.0, leave_out=True)
        assert out.shape == (1000, 500) and bool(out.isfinite().all())
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
        """
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    grew_mb = float(run.stdout.strip().splitlines()[-1])
    assert grew_mb < 200, f"cache_logp grew the resident set by {grew_mb:.0f} MB"


def test_mcti_train_passes_hard_negatives_to_the_ranks():
    args = TrainArgs(data="d", out="o", nproc=2, hard_negatives=True)
    cmd = torchrun_command(args, 2)
    assert "--hard-negatives" in cmd
    ranks = build_parser().parse_args(flags_of(args))
    assert ranks.hard_negatives is True and ranks.nproc == 1


def test_hard_negatives_in_one_process_is_one_line(tmp_path, capsys):
    data = tmp_path / "data"
    for k in range(2):
        (data / f"c{k}").mkdir(parents=True)
    code = mcti_main(["train", "--data", str(data), "--out", str(tmp_path / "o"), "--hard-negatives"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("mcti train: error: --hard-negatives needs the DeepSpeed trainer")
    assert not (tmp_path / "o").exists()


def test_the_flag_leaves_the_fingerprint_of_older_checkpoints_alone():
    """Runs without hard negatives keep the checkpoint fingerprint they had before the flag
    moved into TrainArgs (a checkpoint written then still resumes)."""
    from types import SimpleNamespace

    from mcti.train.loop import run_fingerprint

    p = SimpleNamespace(bundle=SimpleNamespace(fingerprint="m"), shot_paths=[], extension=None)
    config = json.loads(run_fingerprint(TrainArgs(data="d", out="o"), p)["config"])
    assert "hard_negatives" not in config and "nproc" in config


def test_the_clip_term_encodes_one_prompt_per_image_whatever_the_negatives(tiny_bundle, tmp_path):
    """More negatives are how the clip term keeps up with K; they are images, so the text
    encoder must not encode a prompt per negative (it did: 1 + M prompts per image). The
    scorer's decision (mcti.core.objectives.ScorerDecision) encodes each class's prompt once:
    all K = 6 here."""
    from mcti.train.loop import batch_loss, global_batch, prepare
    from tests.conftest import make_image_folder

    data = make_image_folder(tmp_path / "data", n_classes=6, per_class=2)
    cfg = TrainArgs(data=str(data), out=str(tmp_path / "o"), model="tiny-random", device="cpu",
                    reg="clip", negatives=5, shots=2, batch_size=4)  # fmt: skip
    p = prepare(cfg, bundle=tiny_bundle, quiet=True)
    encoded: list[int] = []  # prompts per text-encoder call

    def count(module, args, kwargs, out):
        encoded.append(len(kwargs["input_ids"]))

    hook = p.bundle.text_encoder.register_forward_hook(count, with_kwargs=True)
    try:
        loss, metrics = batch_loss(p, global_batch(p, 4, torch.Generator().manual_seed(0)))
    finally:
        hook.remove()
    loss.backward()
    assert encoded == [4, 6] and 0 < metrics["ce"] and p.table.vectors.grad.abs().sum() > 0


def test_the_shots_clip_features_are_computed_in_chunks(tiny_bundle, tmp_path):
    """`prepare` embedded every shot in one CLIP vision pass: 740 MB per rank for the 5000 shots
    of K = 1000 (benchmarks/train_k.py), growing with K x shots. It must go in chunks."""
    from mcti.core.model import CLIP_CHUNK
    from mcti.train.loop import prepare
    from tests.conftest import make_image_folder

    n_classes = CLIP_CHUNK // 2 + 1  # 2 shots each: one chunk and a bit
    data = make_image_folder(tmp_path / "data", n_classes=n_classes, per_class=2, size=8)
    cfg = TrainArgs(data=str(data), out=str(tmp_path / "o"), model="tiny-random", device="cpu",
                    reg="clip", shots=2, quiet=True)  # fmt: skip
    batches: list[int] = []  # images per CLIP vision pass

    def count(module, args, kwargs, out):
        batches.append(len(kwargs["pixel_values"]))

    hook = tiny_bundle.clip.vision_model.register_forward_hook(count, with_kwargs=True)
    try:
        p = prepare(cfg, bundle=tiny_bundle, quiet=True)
    finally:
        hook.remove()
    assert sum(batches) == 2 * n_classes and max(batches) <= CLIP_CHUNK
    assert p.image_embeds.shape[0] == 2 * n_classes
