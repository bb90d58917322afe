"""The fused scorer's honest weights and diffusion part: out-of-fold evidence (`--fit-folds`),
the diffusion part's scale, the Classifier running it on the cache's top m, and the files."""

import dataclasses
import json

import pytest
import torch

from mcti.cli import main
from mcti.core.fused import (
    FUSED_JSON,
    FusedParts,
    diffusion_part,
    fit_fused,
    load_fused,
    save_fused,
)
from mcti.core.fused_folds import shot_folds
from mcti.core.scoring import Classifier, DiffusionScorer
from mcti.core.tokens import TokenSet, TokenTable
from mcti.errors import UserError
from mcti.settings import TrainArgs
from mcti.train.loop import fold_tables, prepare
from tests.conftest import make_image_folder
from tests.mcti.cli.test_cli import TRAIN, run_err
from tests.mcti.core.test_fused import clusters


def candidate_errors(y: torch.Tensor, K: int, informative: bool, seed: int) -> torch.Tensor:
    """(N, K) -errors of 3 candidates per shot (the true class and 2 others), -inf elsewhere:
    the true class clearly lowest when informative, else all alike."""
    g = torch.Generator().manual_seed(seed)
    out = torch.full((len(y), K), -torch.inf)
    for i, c in enumerate(y.tolist()):
        others = [k for k in torch.randperm(K, generator=g).tolist() if k != c][:2]
        err = 0.05 + 1e-3 * torch.rand(3, generator=g)
        if informative:
            err[0] -= 2e-3
        out[i, [c, *others]] = -err
    return out


def test_diffusion_part_scales_candidates_and_fills_the_others():
    neg = torch.tensor([[-0.10, -0.12, -torch.inf, -0.16], [-torch.inf, -0.3, -0.2, -torch.inf]])
    g = diffusion_part(neg, "global", scale=0.02)
    torch.testing.assert_close(g[0], torch.tensor([0.0, -1.0, -3.0, -3.0]))  # best at 0
    torch.testing.assert_close(g[1], torch.tensor([-5.0, -5.0, 0.0, -5.0]))
    z = diffusion_part(neg, "zscore")
    cand = torch.isfinite(neg)
    assert z[0][cand[0]].mean().abs() < 1e-5 and z[0][cand[0]].std().sub(1).abs() < 1e-5
    assert z[0, 2] == z[0][cand[0]].min() and z.argmax(1).tolist() == [0, 2]


def test_shot_folds_split_every_class():
    y = torch.tensor([0, 1, 0, 1, 0, 1, 0, 2, 2])
    f = shot_folds(y, 3)
    for c in range(3):  # each class's shots spread over the folds, at most one apart
        counts = torch.bincount(f[y == c], minlength=3)
        assert counts.max() - counts.min() <= 1
    assert f[y == 0].tolist() == [0, 1, 2, 0]


def test_out_of_fold_weights_follow_the_evidence_and_need_folds():
    """The diffusion part's weight is large when its out-of-fold errors pick the class and
    small when they are noise; without folds the part is never used, and the token weight fitted
    on out-of-fold scores is not shrunk."""
    K = 5
    f, y = clusters(K, 6, 1.4, 3)  # a weak cache
    g = torch.Generator().manual_seed(0)
    cos = 0.1 * torch.randn(len(y), K, generator=g)
    good = fit_fused(f, y, K, cos, diffusion=candidate_errors(y, K, True, 1), folds=3).params
    noise = fit_fused(f, y, K, cos, diffusion=candidate_errors(y, K, False, 1), folds=3).params
    assert good.w_diffusion > 3 * noise.w_diffusion and good.w_diffusion > good.w_cache
    assert good.evidence["diffusion_oof_acc"] == 1.0 and good.folds == 3
    assert good.token_shrink == 1.0 and "tokens_oof_acc" in good.evidence
    in_sample = fit_fused(f, y, K, cos, diffusion=candidate_errors(y, K, True, 1)).params
    assert in_sample.w_diffusion == 0.0 and in_sample.token_shrink == 0.5


def test_out_of_fold_state_round_trip_and_older_states_load(tmp_path):
    K = 4
    f, y = clusters(K, 4, 0.6, 2)
    tc, df = torch.randn(len(y), K), candidate_errors(y, K, True, 2)
    state = fit_fused(f, y, K, tc, diffusion=df, folds=2, diffusion_timesteps=6)
    save_fused(tmp_path, state)
    back = load_fused(tmp_path, K)
    assert back.params == state.params and back.params.diffusion_timesteps == 6
    torch.testing.assert_close(back.oof["diffusion"], df)
    torch.testing.assert_close(back.oof["token_cos"], tc)
    # a state written before folds existed: no diffusion fields, loads with the part off
    meta = json.loads((tmp_path / FUSED_JSON).read_text())
    for k in ("w_diffusion", "diffusion_m", "diffusion_form", "diffusion_scale", "folds"):
        del meta[k]
    (tmp_path / FUSED_JSON).write_text(json.dumps(meta))
    old = load_fused(tmp_path, K)
    assert old.params.w_diffusion == 0.0 and old.params.folds == 0


def test_classifier_runs_the_diffusion_part_on_the_cache_top_m(tiny_bundle):
    K, size = 4, tiny_bundle.resolution
    tokens = TokenSet(tiny_bundle, K, 1)
    table = TokenTable(K, 1, tokens.init_vector("object"))
    with torch.no_grad():
        table.vectors.normal_(std=2.0, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(4)
    shots = torch.rand(8, 3, size, size, generator=g) * 2 - 1
    y = torch.arange(K).repeat(2)
    feats = tiny_bundle.clip_image_features_cpu(shots)
    df = candidate_errors(y, K, True, 3)
    state = fit_fused(feats, y, K, torch.randn(8, K), diffusion=df, folds=2)
    state = dataclasses.replace(
        state, params=dataclasses.replace(state.params, diffusion_m=2, diffusion_timesteps=5)
    )
    assert state.params.w_diffusion > 0
    clf = Classifier(tiny_bundle, tokens, table, scorer="fused", fused=state)
    test = torch.rand(3, 3, size, size, generator=g) * 2 - 1
    s = clf.score(test)
    assert s.unet_rows == 3 * 2 * 5  # images x m x timesteps: flat in K
    parts = clf.fused_parts(test)
    torch.testing.assert_close(s.probs, state.combine(parts).softmax(1))
    # the part's errors are the diffusion scorer's, on the cache's top m classes only
    cand = state.candidates(parts.cache)
    assert torch.isfinite(parts.diffusion).sum(1).tolist() == [2, 2, 2]
    assert torch.isfinite(parts.diffusion.gather(1, cand)).all()
    cond = tokens.class_conditioning(table)
    every = DiffusionScorer.for_fused(tiny_bundle, cond, state.params).score_latents(
        tiny_bundle.encode_images(test), candidates=torch.arange(K).repeat(3, 1)
    )
    torch.testing.assert_close(parts.diffusion.gather(1, cand), every.scores.gather(1, cand))


def test_fold_tables_never_see_their_held_out_shots(tmp_path):
    """Changing a shot of fold 0 changes every fold table that trained on it, and not table 0."""
    data = make_image_folder(tmp_path / "data", n_classes=3, per_class=4)
    cfg = TrainArgs(
        model="tiny-random", data=str(data), out=str(tmp_path / "tok"), shots=4, steps=3,
        batch_size=4, reg="clip", negatives=2, fit_folds=2, quiet=True, device="cpu",
    )  # fmt: skip
    p = prepare(cfg)
    folds, tables = fold_tables(cfg, p)
    i = int((folds == 0).nonzero()[0])  # a held-out shot of fold 0
    latents, embeds = p.latents.clone(), p.image_embeds.clone()
    latents[:, i] = torch.randn_like(latents[:, i])
    embeds[i] = torch.nn.functional.normalize(torch.randn_like(embeds[i]), dim=0)
    changed = dataclasses.replace(p, latents=latents, image_embeds=embeds)
    _, again = fold_tables(cfg, changed)
    torch.testing.assert_close(again[0].vectors, tables[0].vectors)
    assert not torch.allclose(again[1].vectors, tables[1].vectors)


def test_train_with_fit_folds_end_to_end(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", n_classes=3, per_class=5)
    tok = tmp_path / "tok"
    argv = ["train", "--data", str(data), "--out", str(tok), *TRAIN, "--reg", "clip"]
    assert main([*argv, "--fit-folds", "3", "--fused-timesteps", "4"]) == 0
    state = json.loads((tok / "fused.json").read_text())
    assert state["folds"] == 3 and state["token_shrink"] == 1.0
    assert state["evidence"]["fit_unet_rows"] == 9 * 3 * 4  # shots x m x timesteps
    back = load_fused(tok, 3)
    assert set(back.oof) == {"token_cos", "diffusion"}
    assert torch.isfinite(back.oof["diffusion"]).sum(1).tolist() == [3] * 9
    capsys.readouterr()
    ev = ["eval", "--tokens", str(tok), "--data", str(data), "--scorer", "fused"]
    assert main([*ev, "--device", "cpu", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    want = 3 * 4 if back.params.w_diffusion > 0 else 0
    assert r["unet_rows_per_image"] == want and 0 <= r["ece"] <= 1
    bad = ["train", "--data", str(data), "--out", str(tmp_path / "x"), *TRAIN]
    assert "--fit-folds" in run_err(capsys, [*bad, "--fit-folds", "1"])
    assert "--fit-folds" in run_err(capsys, [*bad, "--fit-folds", "4"])  # > --shots 3
    assert "--nproc" in run_err(capsys, [*bad, "--fit-folds", "2", "--nproc", "2"])


def test_parts_without_diffusion_fuse_like_before():
    K = 3
    f, y = clusters(K, 3, 0.5, 4)
    cos = torch.randn(len(y), K)
    state = fit_fused(f, y, K, cos, token_shrink=0.5)
    q = torch.nn.functional.normalize(torch.randn(5, 16), dim=1)
    qcos = torch.randn(5, K)
    parts = FusedParts(state.cache_logp(q), qcos)
    torch.testing.assert_close(state.combine(parts), state.logits(q, qcos))


def test_an_unknown_diffusion_form_is_refused(tmp_path):
    K = 3
    f, y = clusters(K, 3, 0.5, 5)
    df = candidate_errors(y, K, True, 5)
    save_fused(tmp_path, fit_fused(f, y, K, torch.randn(len(y), K), diffusion=df, folds=3))
    meta = json.loads((tmp_path / FUSED_JSON).read_text())
    meta["diffusion_form"] = "cubic"
    (tmp_path / FUSED_JSON).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="does not match"):
        load_fused(tmp_path, K)
