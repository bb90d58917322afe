"""Serving pieces that need no Ray: image decoding, settings, `mcti serve` argument handling."""

import io
import socket
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mcti.cli.serve import ServeArgs, app_settings
from mcti.data.folders import load_image
from mcti.errors import UserError
from mcti.settings import DEFAULT_MODEL
from serving.config import AppConfig, load_config, parse_tokens, read_config_file
from serving.images import BadImage, decode_image, to_pixels

REPO = Path(__file__).resolve().parents[2]


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@pytest.mark.parametrize(
    "mode,fmt,size",
    [
        ("RGB", "PNG", (40, 30)),
        ("RGBA", "PNG", (32, 32)),
        ("P", "GIF", (20, 50)),
        ("I;16", "PNG", (33, 33)),
        ("RGB", "JPEG", (64, 48)),
        ("L", "BMP", (31, 17)),
        ("RGB", "WEBP", (36, 36)),
    ],
)
def test_decode_gives_exactly_the_library_pixels(tmp_path, mode, fmt, size):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    im = (
        im.convert(mode) if mode != "I;16" else Image.fromarray(arr[..., 0].astype(np.uint16) * 200)
    )
    data = _save(im, fmt)
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(data)
    got = decode_image(data, 32, 10_000)
    assert got.dtype == np.uint8 and got.shape == (32, 32, 3)
    assert torch.equal(to_pixels([got])[0], load_image(path, 32))  # bit for bit


def test_refuses_non_images_and_broken_files():
    png = _save(Image.new("RGB", (16, 16), (200, 10, 10)), "PNG")
    for data, status, words in [
        (b"", 400, "empty"),
        (b"GIF89a but not really", 400, "image"),
        (b"plain text, not an image", 400, "not an image"),
        (png[: len(png) // 2], 400, "truncated"),
        (_save(Image.new("RGB", (8, 8)), "TIFF"), 400, "supported format"),  # decoder not allowed
    ]:
        with pytest.raises(BadImage) as e:
            decode_image(data, 32, 10_000)
        assert e.value.status == status and words in e.value.message, e.value.message
    # a flipped byte inside the compressed data: its CRC no longer matches
    i = png.index(b"IDAT") + 6
    bad = png[:i] + bytes([png[i] ^ 0xFF]) + png[i + 1 :]
    with pytest.raises(BadImage) as e:
        decode_image(bad, 32, 10_000)
    assert e.value.status == 400


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_limit_is_checked_from_the_header():
    """A header claiming 100k x 100k pixels with almost no data: refused as too large (413),
    which shows the size is checked before any decoding (decoding would fail as truncated)."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
    with pytest.raises(BadImage) as e:
        decode_image(data, 32, 25_000_000)
    assert e.value.status == 413 and "25000000 pixels" in e.value.message
    small_but_many = _save(Image.new("1", (2000, 2000)), "PNG")  # 4 M pixels in a few KB
    with pytest.raises(BadImage) as e:
        decode_image(small_but_many, 32, 3_000_000)  # under PIL's own 2x bomb limit: our check
    assert e.value.status == 413 and "2000x2000 = 4000000 pixels" in e.value.message
    assert decode_image(small_but_many, 32, 4_000_000).shape == (32, 32, 3)  # at the limit: fine


def test_parse_tokens():
    assert parse_tokens("/t/run") == {"default": "/t/run"}
    assert parse_tokens("a=/t/x, b=/t/y") == {"a": "/t/x", "b": "/t/y"}
    assert parse_tokens("/t/x,/t/y") == {"x": "/t/x", "y": "/t/y"}
    for bad in ["", " , ", "a=", "=dir", "a=/x,a=/y"]:
        with pytest.raises(UserError):
            parse_tokens(bad)


def test_config_validation_messages():
    cfg = load_config({"tokens": "/t/a"})
    assert cfg.tokens == {"default": "/t/a"} and cfg.default_token_set == "default"
    assert cfg.model == DEFAULT_MODEL
    for args, words in [
        ({}, "tokens"),
        ({"tokens": {}}, "tokens"),
        (
            {"tokens": "/t", "max_batch_size": 32, "max_ongoing_requests": 16},
            "max_ongoing_requests",
        ),
        ({"tokens": "/t", "min_replicas": 1}, "both"),
        ({"tokens": "/t", "min_replicas": 3, "max_replicas": 2}, "min_replicas"),
        ({"tokens": "/t", "scorer": "knn"}, "scorer"),
        ({"tokens": "/t", "scorers": ["clip"]}, "default scorer"),
        ({"tokens": "/t", "max_batch_size": 0}, "max_batch_size"),
        ({"tokens": "/t", "colour": "red"}, "colour"),
    ]:
        with pytest.raises(UserError) as e:
            load_config(args)
        assert words in str(e.value), str(e.value)


def test_check_paths_reads_labels(tmp_path, tiny_bundle):
    from mcti.core.store import save_tokens
    from mcti.core.tokens import TokenTable

    save_tokens(
        tmp_path / "t",
        TokenTable(2, 1, torch.zeros(tiny_bundle.hidden_size)),
        ["x", "y"],
        tiny_bundle,
    )
    assert load_config({"tokens": f"s={tmp_path / 't'}"}).check_paths() == {"s": ["x", "y"]}
    with pytest.raises(UserError, match="not a token directory"):
        load_config({"tokens": str(tmp_path / "missing")}).check_paths()


def test_serve_config_file_is_a_valid_application():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    path = REPO / "serving" / "serve_config.yaml"

    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    assert schema.applications[0].import_path == "serving.app:build_app"
    args = read_config_file(path)
    assert isinstance(load_config(args), AppConfig)


def test_cli_settings_flags_override_the_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tokens: {a: /t/a}\nmax_batch_size: 4\nmax_ongoing_requests: 8\nscorer: clip\n")
    s = app_settings(ServeArgs(tokens="/t/b", config=str(cfg)))
    assert s["tokens"] == "/t/b" and s["max_batch_size"] == 4 and s["scorer"] == "clip"
    s = app_settings(
        ServeArgs(
            tokens="/t/b",
            config=str(cfg),
            max_batch_size=2,
            num_replicas=3,  # the flag --replicas
            enable_generate=False,  # the flag --no-generate
        )
    )
    assert s["max_batch_size"] == 2 and s["num_replicas"] == 3 and s["enable_generate"] is False
    assert "host" not in s and "port" not in s and "config" not in s
    with pytest.raises(UserError, match="no such file"):
        app_settings(ServeArgs(tokens="/t", config=str(tmp_path / "none.yaml")))
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(UserError, match="mapping"):
        app_settings(ServeArgs(tokens="/t", config=str(tmp_path / "list.yaml")))


def test_a_flag_given_on_the_command_line_beats_the_file_even_at_its_default(tmp_path):
    """`--scorer diffusion` is the default value, yet given explicitly it overrides the file's
    `scorer: clip`; flags not given leave the file's values alone."""
    from mcti.cli import build_parser
    from mcti.flags import to_dataclass

    cfg = tmp_path / "c.yaml"
    cfg.write_text("tokens: {a: /t/a}\nscorer: clip\nmax_batch_size: 4\nnum_replicas: 2\n")

    def settings(*flags: str) -> dict:
        ns = build_parser().parse_args(["serve", "--tokens", "/t/b", "--config", str(cfg), *flags])
        return app_settings(to_dataclass(ServeArgs, ns))

    s = settings()
    assert (s["scorer"], s["max_batch_size"], s["num_replicas"]) == ("clip", 4, 2)
    assert s["tokens"] == "/t/b" and "host" not in s and "config" not in s
    s = settings("--scorer", "diffusion", "--max-batch-size", "8", "--replicas", "1")
    assert (s["scorer"], s["max_batch_size"], s["num_replicas"]) == ("diffusion", 8, 1)
    assert load_config(s).scorer == "diffusion"
    s = settings("--no-generate", "--template", "a drawing of {}")
    assert s["enable_generate"] is False and s["template"] == "a drawing of {}"
    assert s["scorer"] == "clip"


def test_app_config_is_built_from_the_settings_schema():
    """Every ServeSettings field is an AppConfig key with the same default and description,
    and every AppConfig key is a `mcti serve` flag."""
    import dataclasses

    from mcti.cli import build_parser
    from mcti.settings import ServeSettings, field_docs

    docs = field_docs(ServeSettings)
    fields = {f.name: f for f in dataclasses.fields(ServeSettings)}
    assert set(AppConfig.model_fields) == set(fields)
    for name, info in AppConfig.model_fields.items():
        assert info.description == docs[name], name
        if name != "tokens":  # required here, a mapping or a string
            assert info.default == fields[name].default, name
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    assert set(AppConfig.model_fields) <= {a.dest for a in serve._actions}


@pytest.mark.parametrize(
    "key,value,words",
    [
        ("template", "a photo", "exactly one {}"),
        ("template", "a {x}", "exactly one {}"),
        ("template", "{} and {}", "exactly one {}"),
        ("n_samples", "8,x", "comma-separated"),
        ("precision", "fp8", "precision"),
        ("scorers", ["clip", "knn"], "scorers.1"),
        ("hybrid_m", 0, "hybrid_m"),
    ],
)
def test_config_refuses_what_the_cli_refuses(key, value, words):
    with pytest.raises(UserError) as e:
        load_config({"tokens": "/t", key: value})
    assert words in str(e.value) and key in str(e.value)


def test_mcti_serve_refuses_bad_settings_before_starting_ray(tmp_path, capsys, tiny_bundle):
    from mcti.cli import main
    from mcti.core.store import save_tokens
    from mcti.core.tokens import TokenTable

    assert main(["serve", "--tokens", str(tmp_path / "nope")]) == 2
    assert "not a token directory" in capsys.readouterr().err
    assert main(["serve", "--tokens", str(tmp_path), "--max-batch-size", "64"]) == 2
    assert "max_ongoing_requests" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        table = TokenTable(2, 1, torch.zeros(tiny_bundle.hidden_size))
        save_tokens(tmp_path / "t", table, ["x", "y"], tiny_bundle)
        assert main(["serve", "--tokens", str(tmp_path / "t"), "--port", str(port)]) == 2
    assert "cannot listen" in capsys.readouterr().err
