"""deploy/Dockerfile and .dockerignore: CUDA runtime base matching the torch wheel, versions pinned
as in pyproject.toml, the package installed with the gpu extra, a non-root user, and no model
weights in the build context or the image. (The image is never built in CI: these read files.)"""

import os
import re
from pathlib import Path

import pytest

from tests.deploy.helpers import (
    REPO,
    dockerfile_instructions,
    dockerignore_rules,
    excluded,
    pins,
    pyproject,
)

DOCKERFILE = REPO / "deploy" / "Dockerfile"
CONSTRAINTS = REPO / "deploy" / "constraints.txt"
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".ckpt",
    ".pt",
    ".pth",
    ".onnx",
    ".gguf",
    ".h5",
    ".msgpack",
)


def instructions() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE)


def arg_defaults() -> dict[str, str]:
    out = {}
    for ins, args in instructions():
        if ins == "ARG" and "=" in args:
            k, _, v = args.partition("=")
            out[k.strip()] = v.strip().strip('"')
    return out


def runs() -> str:
    return "\n".join(args for ins, args in instructions() if ins == "RUN")


def constraints() -> dict[str, str]:
    out = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: '{line}' is not name==version"
            assert name.lower() not in out, f"constraints.txt pins {name} twice"
            out[name.lower()] = version
    return out


def test_cuda_runtime_base_matches_the_torch_index():
    args = arg_defaults()
    (base,) = [a for ins, a in instructions() if ins == "FROM"]
    assert base == "${CUDA_IMAGE}"
    m = re.fullmatch(
        r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:cudnn-)?runtime-ubuntu[\d.]+", args["CUDA_IMAGE"]
    )
    assert m, f"not a pinned CUDA runtime image: {args['CUDA_IMAGE']}"
    assert args["TORCH_INDEX"] == f"https://download.pytorch.org/whl/cu{m[1]}{m[2]}"


def test_versions_pinned_as_in_pyproject():
    args, p = arg_defaults(), pins()
    assert args["TORCH_VERSION"] == p["torch"] == "2.13.0"
    assert args["XFORMERS_VERSION"] == p["xformers"] == "0.0.35"
    r = runs()
    assert '--index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"' in r
    assert re.search(
        r'pip install -c deploy/constraints\.txt "\.\[gpu\]" "xformers==\$\{XFORMERS_VERSION\}"', r
    )
    # the lock agrees with every == pin of pyproject.toml and covers every dependency
    c = constraints()
    for name, version in p.items():
        assert c.get(name) == version, (
            f"constraints.txt pins {name}=={c.get(name)}, pyproject {version}"
        )
    for dep in pyproject()["project"]["dependencies"]:
        name = re.match(r"[A-Za-z0-9_.-]+", dep)[0].lower()
        assert name in c, f"constraints.txt does not pin {name}"


def test_runs_as_a_non_root_user():
    users = [a for ins, a in instructions() if ins == "USER"]
    assert users, "no USER: the image would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, (
        "USER must be a numeric non-zero UID (runAsNonRoot checks it)"
    )
    assert gid == "" or (gid.isdigit() and int(gid) != 0)
    assert re.search(rf"useradd\b[^\n]*--uid {uid}\b", runs())
    # nothing after the last USER switches back or installs as root
    last = max(i for i, (ins, _) in enumerate(instructions()) if ins == "USER")
    assert all(ins != "RUN" for ins, _ in instructions()[last:])


def copy_sources() -> list[str]:
    out = []
    for ins, args in instructions():
        assert ins != "ADD", "use COPY (ADD fetches URLs and unpacks archives)"
        if ins == "COPY":
            words = [w for w in args.split() if not w.startswith("--")]
            assert not any(w.startswith("--from") for w in args.split()), (
                "no copies from other images"
            )
            out += words[:-1]
    return out


def context_files(rules) -> list[str]:
    """Every file of the checkout that .dockerignore lets into the build context."""
    out = []
    for d, dirs, files in os.walk(REPO):
        rel_dir = Path(d).relative_to(REPO).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        # skip the big trees no rule re-includes (the allow-list names top-level folders only)
        dirs[:] = [x for x in dirs if x not in (".git", ".venv", "__pycache__", "node_modules")]
        out += [rel_dir + f for f in files if not excluded(rel_dir + f, rules)]
    return out


def test_no_model_weights_in_the_image():
    rules = dockerignore_rules(REPO / ".dockerignore")
    for src in copy_sources():
        assert (REPO / src).exists(), f"COPY {src}: no such file in the repository"
        assert not excluded(src, rules), f"COPY {src}: excluded by .dockerignore"
    files = context_files(rules)
    weights = [f for f in files if f.endswith(WEIGHT_SUFFIXES) or "embedded-model" in f]
    assert weights == [], f"weights would reach the build context: {weights[:5]}"
    copied = [
        f for f in files if any(f == s or f.startswith(s.rstrip("/") + "/") for s in copy_sources())
    ]
    assert "mcti/__init__.py" in copied and "pyproject.toml" in copied
    # and nothing fetches them while building
    r = runs()
    for pattern in (
        r"huggingface-cli|hf download|snapshot_download|from_pretrained",
        r"(wget|curl)\s[^\n]*https?://",
    ):
        assert not re.search(pattern, r), pattern


@pytest.mark.parametrize(
    "path, out",
    [
        (".venv/lib/python3.11/site-packages/torch/__init__.py", True),
        (".git/HEAD", True),
        ("mcti/assets/embedded-model/unet/diffusion_pytorch_model.safetensors", True),
        ("mcti/assets/embedded-model/model_index.json", True),
        ("models/sd15/unet/diffusion_pytorch_model.bin", True),
        ("serving/weights/x.pt", True),
        ("tokens/run-001/learned_embeds.safetensors", True),
        ("data/caltech-101/101_ObjectCategories/a/b.jpg", True),
        ("mcti/__pycache__/data.cpython-311.pyc", True),
        ("benchmarks/results.json", True),
        ("pyproject.toml", False),
        ("README.md", False),
        ("deploy/constraints.txt", False),
        ("mcti/data/coop.py", False),
        ("kernels/__init__.py", False),
        ("serving/serve_config.yaml", False),
        ("training/configs/zero1_bf16.json", False),
    ],
)
def test_dockerignore(path, out):
    assert excluded(path, dockerignore_rules(REPO / ".dockerignore")) is out


def test_dockerignore_matcher_follows_docker_rules(tmp_path: Path):
    f = tmp_path / ".dockerignore"
    f.write_text("*\n!src\n!docs\nsrc/**/*.bin\n!src/keep.bin\n# comment\ndocs/*.md\n")
    rules = dockerignore_rules(f)
    assert excluded("a.txt", rules) and excluded("x/y/z", rules)
    assert not excluded("src/a.py", rules) and not excluded("src/d/e.py", rules)
    assert excluded("src/w.bin", rules) and excluded("src/d/w.bin", rules)
    assert not excluded("src/keep.bin", rules)
    assert excluded("docs/a.md", rules) and not excluded("docs/a.txt", rules)
    assert not excluded("docs/sub/a.md", rules)  # `*` stops at '/'
