"""load_model: its specs (tiny-random, embedded, a saved directory), its one-line errors, no
process-wide side effects; the shared CLIP image preprocessing against transformers' own."""

import json
import os
import shutil

import pytest
import torch

from mcti.core.model import clip_image_embeddings, load_model, save_model
from mcti.core.tiny import build_tiny_random
from mcti.errors import UserError


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """tiny-random written as a diffusers directory (+ clip/)."""
    out = tmp_path_factory.mktemp("model") / "tiny"
    save_model(build_tiny_random(), out)
    return out


def _weights_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)


def test_a_saved_directory_loads_as_the_same_model(saved_tiny, tiny_bundle):
    b = load_model(str(saved_tiny), device="cpu")
    assert b.fingerprint == tiny_bundle.fingerprint
    assert b.resolution == tiny_bundle.resolution == 32 and b.hidden_size == 32
    for part in ("unet", "text_encoder", "vae", "clip"):
        _weights_equal(getattr(b, part), getattr(tiny_bundle, part))
    assert not any(p.requires_grad for p in b.unet.parameters())
    assert not b.unet.training and b.spec == str(saved_tiny)


def test_tiny_random_is_the_same_on_every_build(tiny_bundle):
    again = load_model("tiny-random", device="cpu")
    assert again.fingerprint == tiny_bundle.fingerprint
    _weights_equal(again.unet, tiny_bundle.unet)


def test_embedded_model_loads_pixel_space_with_clip():
    b = load_model("embedded", device="cpu")
    assert b.vae is None and b.clip is not None
    assert b.unet.config.in_channels == 3 and b.resolution == b.unet.config.sample_size


def test_loading_sets_no_process_wide_hub_setting(saved_tiny, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    load_model(str(saved_tiny), device="cpu")
    assert "HF_HUB_OFFLINE" not in os.environ


def test_hybrid_clip_path_replaces_the_models_clip(saved_tiny, tmp_path):
    clip_dir = tmp_path / "clip"
    shutil.copytree(saved_tiny / "clip", clip_dir)
    no_clip = tmp_path / "model"
    shutil.copytree(saved_tiny, no_clip)
    shutil.rmtree(no_clip / "clip")
    assert load_model(str(no_clip), device="cpu").clip is None
    b = load_model(str(no_clip), device="cpu", clip_path=str(clip_dir))
    assert b.clip is not None
    with pytest.raises(UserError, match="no CLIP vision tower"):
        load_model(str(no_clip), device="cpu").require_clip()


@pytest.mark.parametrize(
    "spec, kw, message",
    [
        ("no/such/dir", {}, "is not a directory"),
        ("tiny-random", {"precision": "fp8"}, "--precision must be one of"),
        ("tiny-random", {"precision": "bf16"}, "needs a CUDA device"),
        ("tiny-random", {"attention": "flash"}, "--attention must be"),
        ("tiny-random", {"clip_path": "no/such/clip"}, "not a transformers CLIPModel"),
    ],
)
def test_user_mistakes_are_one_line_errors(spec, kw, message):
    if "bf16" in kw.values() and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(UserError, match=message) as e:
        load_model(spec, device="cpu", **kw)
    assert "\n" not in str(e.value)


def test_a_cuda_device_without_cuda_is_refused():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(UserError, match="no CUDA device"):
        load_model("tiny-random", device="cuda")


def test_incomplete_or_corrupt_directories_are_refused(saved_tiny, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(saved_tiny, partial)
    shutil.rmtree(partial / "unet")
    (partial / "model_index.json").unlink()
    with pytest.raises(UserError, match="missing model_index.json, unet"):
        load_model(str(partial), device="cpu")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(saved_tiny, corrupt)
    (corrupt / "unet" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot load model"):
        load_model(str(corrupt), device="cpu")
    shutil.copy(saved_tiny / "unet" / "config.json", corrupt / "unet" / "config.json")
    (corrupt / "tokenizer" / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot load model") as e:
        load_model(str(corrupt), device="cpu")
    assert "\n" not in str(e.value)


def test_a_clip_of_another_width_is_refused(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    text = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64)
    vision.update(num_hidden_layers=1, num_attention_heads=4)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision)).save_pretrained(tmp_path / "c")
    with pytest.raises(UserError, match="does not match the text encoder"):
        load_model("tiny-random", device="cpu", clip_path=str(tmp_path / "c"))


def test_weights_that_do_not_fit_their_config_are_one_line_errors(saved_tiny, tmp_path):
    clip_dir = tmp_path / "clip"
    shutil.copytree(saved_tiny / "clip", clip_dir)
    cfg = json.loads((clip_dir / "config.json").read_text())
    cfg["text_config"]["hidden_size"] = 48
    (clip_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="cannot load --clip") as e:
        load_model("tiny-random", device="cpu", clip_path=str(clip_dir))
    assert "\n" not in str(e.value)
    model = tmp_path / "model"
    shutil.copytree(saved_tiny, model)
    cfg = json.loads((model / "unet" / "config.json").read_text())
    cfg["block_out_channels"] = [16, 32]
    (model / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="cannot load model") as e:
        load_model(str(model), device="cpu")
    assert "\n" not in str(e.value)


def test_clip_image_features_match_transformers_with_clip_preprocessing(tiny_bundle):
    """Reference: transformers' CLIPImageProcessor (resize, CLIP mean/std, no crop at the
    model's size) and CLIPModel.get_image_features, normalised."""
    from transformers import CLIPImageProcessor

    clip = tiny_bundle.clip
    size = clip.config.vision_config.image_size
    pixels = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    proc = CLIPImageProcessor(
        do_resize=False, do_center_crop=False, do_rescale=False, do_convert_rgb=False
    )
    ref_in = proc(list(((pixels + 1) / 2).numpy()), return_tensors="pt").pixel_values
    with torch.no_grad():
        out = clip.get_image_features(pixel_values=ref_in)
        out = out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 5
        ref = torch.nn.functional.normalize(out, dim=-1)
    torch.testing.assert_close(tiny_bundle.clip_image_features(pixels), ref, rtol=1e-4, atol=1e-5)
    # differentiable for pretraining; the same values
    x = pixels.clone().requires_grad_(True)
    emb = clip_image_embeddings(clip, x)
    emb.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    torch.testing.assert_close(emb.detach(), ref, rtol=1e-4, atol=1e-5)
