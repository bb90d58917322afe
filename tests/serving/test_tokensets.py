"""Token sets as the classifier's user_config, without Ray: loading a new list next to the old
one (reuse, all or nothing), the user_config format, and that a change of token sets alone
keeps Serve's code version (so `serve deploy` reconfigures replicas instead of replacing them).
"""

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

from benchmarks.common import random_token_set
from mcti.errors import UserError
from serving.config import (
    AppConfig,
    application_settings,
    load_config,
    read_config_file,
    serve_application,
)
from serving.tokensets import (
    TokenSets,
    dir_version,
    load_sets,
    parse_user_config,
    requested_version,
    sets_version,
    token_config,
)

REPO = Path(__file__).resolve().parents[2]
SCORERS = ["diffusion", "clip"]


class Turns:
    """Counts how often the model was taken to compute conditioning."""

    def __init__(self):
        self.taken = 0

    @contextmanager
    def __call__(self):
        self.taken += 1
        yield


@pytest.fixture
def sets(tmp_path, tiny_bundle) -> dict[str, Path]:
    return {
        "a": random_token_set(tiny_bundle, tmp_path / "a", ["a0", "a1", "a2"], 0),
        "b": random_token_set(tiny_bundle, tmp_path / "b", ["b0", "b1"], 1),
    }


def _load(user_config: dict, old: TokenSets, bundle, turns: Turns) -> TokenSets:
    cfg = AppConfig(n_samples="2,4", to_keep="2,1")
    return load_sets(user_config, old, bundle, cfg, SCORERS, turns)


def test_a_new_list_reuses_unchanged_sets(sets, tiny_bundle, tmp_path):
    turns = Turns()
    one = _load({"tokens": {"a": str(sets["a"])}}, TokenSets(), tiny_bundle, turns)
    assert one.default == "a" and one.sets["a"]["labels"] == ["a0", "a1", "a2"]
    assert set(one.sets["a"]["scorers"]) == set(SCORERS) and turns.taken == 1
    cfg = {"tokens": {"b": str(sets["b"]), "a": str(sets["a"])}}
    two = _load(cfg, one, tiny_bundle, turns)
    assert two.sets["a"] is one.sets["a"] and turns.taken == 2  # only b's conditioning
    assert two.default == "b" and list(two.sets) == ["b", "a"]
    assert two.version == requested_version(cfg) != one.version
    assert _load(cfg, two, tiny_bundle, turns).version == two.version and turns.taken == 2
    # a version string makes a directory rewritten in place load again
    random_token_set(tiny_bundle, sets["a"], ["a0", "a1", "a2", "a3"], 2)
    assert _load(cfg, two, tiny_bundle, turns).sets["a"]["labels"] == ["a0", "a1", "a2"]
    cfg["versions"] = {"a": dir_version(sets["a"])}
    three = _load(cfg, two, tiny_bundle, turns)
    assert (
        three.sets["a"]["labels"] == ["a0", "a1", "a2", "a3"] and three.sets["b"] is two.sets["b"]
    )
    assert three.version != two.version


def _foreign(src: Path, out: Path) -> Path:
    shutil.copytree(src, out)
    meta = json.loads((out / "classes.json").read_text())
    meta["base_model"]["fingerprint"] = "f" * 16
    (out / "classes.json").write_text(json.dumps(meta))
    return out


def _corrupt(src: Path, out: Path) -> Path:
    shutil.copytree(src, out)
    (out / "learned_embeds.safetensors").write_bytes(b"\x01" * 64)
    return out


@pytest.mark.parametrize(
    "bad,words",
    [
        (lambda tmp, a: tmp / "missing", "not a token directory"),
        (lambda tmp, a: _foreign(a, tmp / "foreign"), "base model"),
        (lambda tmp, a: _corrupt(a, tmp / "corrupt"), "corrupt"),
    ],
    ids=["missing", "foreign", "corrupt"],
)
def test_one_bad_set_fails_the_whole_list(sets, tiny_bundle, tmp_path, bad, words):
    turns = Turns()
    one = _load({"tokens": {"a": str(sets["a"])}}, TokenSets(), tiny_bundle, turns)
    cfg = {"tokens": {"a": str(sets["a"]), "b": str(sets["b"]), "c": str(bad(tmp_path, sets["a"]))}}
    with pytest.raises(UserError) as e:
        _load(cfg, one, tiny_bundle, turns)
    assert "token set 'c'" in str(e.value) and words in str(e.value)
    assert list(one.sets) == ["a"]  # the old list is untouched (it is immutable)


@pytest.mark.parametrize(
    "user_config,words",
    [
        ([], "mapping"),
        ({}, "tokens must be a non-empty mapping"),
        ({"tokens": {}}, "tokens must be a non-empty mapping"),
        ({"tokens": "/t/a"}, "tokens must be a non-empty mapping"),
        ({"tokens": {"a": ""}}, "tokens must map ids"),
        ({"tokens": {"a": "/t"}, "versions": {"a": 3}}, "versions must map ids"),
        ({"tokens": {"a": "/t"}, "colour": "red"}, "unknown keys ['colour']"),
    ],
)
def test_user_config_mistakes_are_named(user_config, words):
    with pytest.raises(UserError, match="user_config") as e:
        parse_user_config(user_config)
    assert words in str(e.value)
    assert requested_version(user_config) == "invalid"


def test_user_config_format():
    assert token_config({"a": "/t/a"}) == {"tokens": {"a": "/t/a"}}
    cfg = token_config({"a": "/t/a"}, {"a": "v2"})
    assert parse_user_config(cfg) == ({"a": "/t/a"}, {"a": "v2"})
    assert sets_version({"a": "/t/a"}, {}) != sets_version({"a": "/t/a"}, {"a": "v2"})
    assert sets_version({"a": "/t/a", "b": "/t/b"}, {}) != sets_version(
        {"b": "/t/b", "a": "/t/a"}, {}
    )  # the order names the default set


def test_dir_version_follows_the_files(sets, tiny_bundle, tmp_path):
    v = dir_version(sets["a"])
    assert dir_version(sets["a"]) == v and dir_version(sets["b"]) != v
    random_token_set(tiny_bundle, sets["a"], ["a0", "a1", "a2", "a3"], 0)
    assert dir_version(sets["a"]) != v
    assert dir_version(tmp_path / "missing") == "missing"


def test_a_token_change_alone_keeps_serves_code_version():
    """Serve rebuilds an application, replacing every replica, when its code version (import
    path, args, runtime env) changes; a user_config change alone goes to `reconfigure`."""
    from ray.serve._private.deploy_utils import get_app_code_version
    from ray.serve.schema import ServeApplicationSchema

    def code_version(app: dict) -> str:
        return get_app_code_version(ServeApplicationSchema.model_validate(app))

    cfg = load_config({"tokens": "a=/tokens/run-001", "model": "/models/base"})
    new_cfg = cfg.model_copy(update={"tokens": {"a": "/tokens/run-002"}})
    old, new = serve_application(cfg), serve_application(new_cfg)
    assert "tokens" not in old["args"]
    assert old["deployments"] == [
        {"name": "MctiClassifier", "user_config": {"tokens": {"a": "/tokens/run-001"}}}
    ]
    assert code_version(old) == code_version(new)
    assert code_version(old) == code_version(serve_application(cfg, {"a": "v2"}))
    moved = cfg.model_copy(update={"model": "/models/other"})
    assert code_version(serve_application(moved)) != code_version(old)
    # tokens in args (the layout before token sets were user_config) would rebuild
    in_args = [{**old, "args": {**old["args"], "tokens": {"a": d}}} for d in ("/t/1", "/t/2")]
    assert code_version(in_args[0]) != code_version(in_args[1])
    # the settings of the application entry are the config again
    assert load_config(application_settings(new)) == new_cfg


def test_serve_config_file_keeps_tokens_in_the_user_config():
    import yaml

    path = REPO / "serving" / "serve_config.yaml"
    (app,) = yaml.safe_load(path.read_text())["applications"]
    assert "tokens" not in app["args"]
    assert read_config_file(path)["tokens"] == {"default": "/tokens/run-001"}
    with pytest.raises(UserError, match="tokens"):
        load_config(app["args"])  # `mcti serve` needs token sets
    assert load_config(app["args"], need_tokens=False).tokens is None  # the builder does not
