"""deploy/Dockerfile and .dockerignore: CUDA runtime base matching the torch wheel, every version
pinned by the one constraints file (which the Makefile and CI install with too), the package
installed with the cluster's extras, a non-root user, and no model weights in the build context or
the image. (The image is never built in CI: these read files.)"""

import os
import re
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from tests.deploy.helpers import (
    REPO,
    constraints,
    dockerfile_instructions,
    dockerignore_rules,
    excluded,
    requirements,
)

DOCKERFILE = REPO / "deploy" / "Dockerfile"
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


def test_cuda_runtime_base_matches_the_torch_index():
    args = arg_defaults()
    (base,) = [a for ins, a in instructions() if ins == "FROM"]
    assert base == "${CUDA_IMAGE}"
    m = re.fullmatch(
        r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:cudnn-)?runtime-ubuntu[\d.]+", args["CUDA_IMAGE"]
    )
    assert m, f"not a pinned CUDA runtime image: {args['CUDA_IMAGE']}"
    assert args["TORCH_INDEX"] == f"https://download.pytorch.org/whl/cu{m[1]}{m[2]}"


def test_constraints_pin_every_requirement_within_its_range():
    """pyproject.toml holds ranges, constraints.txt the exact versions: every requirement of the
    core and of every extra is pinned there, inside its range (markers evaluated here)."""
    c = constraints()
    for group, reqs in requirements().items():
        for r in reqs:
            if r.marker is not None and not r.marker.evaluate({"extra": group}):
                continue
            name = canonicalize_name(r.name)
            assert name in c, f"constraints.txt does not pin {r.name} ([{group}])"
            assert r.specifier.contains(c[name], prereleases=True), (
                f"constraints.txt pins {r.name}=={c[name]} outside [{group}]'s '{r}'"
            )


def test_core_has_ranges_and_no_extra_packages():
    """The core is what `pip install mcti` pulls: ranges only, and none of the packages that only
    serving, DeepSpeed training, the Triton kernels, plots or the demo need."""
    core = requirements()["core"]
    assert all(not any(s.operator == "==" for s in r.specifier) for r in core), core
    names = {canonicalize_name(r.name) for r in core}
    extras_only = {"ray", "deepspeed", "triton", "matplotlib", "scikit-learn", "python-multipart"}
    assert not names & extras_only, names & extras_only
    assert {"torch", "diffusers", "transformers", "safetensors"} <= names


def test_torch_is_pinned_everywhere_pip_runs():
    """Unpinned, pip would pull a multi-GB CUDA build of torch: one exact version, in the
    constraints file, and the Docker image's CUDA build is that version."""
    assert re.fullmatch(r"\d+\.\d+\.\d+", constraints()["torch"]), constraints()["torch"]
    assert arg_defaults()["TORCH_VERSION"] == constraints()["torch"] == "2.13.0"
    assert '--index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"' in runs()
    for where, cmd in pip_installs():
        if "torch==${TORCH_VERSION}" in cmd or re.fullmatch(r".*install (-q )?--upgrade pip", cmd):
            continue  # the CUDA build from its own index, pinned by the line itself; pip itself
        assert re.search(r"(^| )-c deploy/constraints\.txt( |$)", cmd), f"{where}: {cmd}"


def make_variables(text: str) -> dict[str, str]:
    out = {}
    for m in re.finditer(r"^([A-Z_]+)\s*[:?]?=\s*(.*)$", text, flags=re.M):
        out[m[1]] = m[2].strip()
    return out


def expand(text: str, variables: dict[str, str]) -> str:
    for _ in range(5):  # nested $(VAR)s
        text = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m[1], m[0]), text)
    return text


def pip_installs() -> list[tuple[str, str]]:
    """(file, command) for every `pip install` of the Dockerfile, the Makefile and .ci/run."""
    docker = [cmd for run in runs().splitlines() for cmd in run.split("&&")]
    out = [("Dockerfile", " ".join(cmd.split())) for cmd in docker]
    make = (REPO / "Makefile").read_text()
    recipes = [line for line in make.splitlines() if line.startswith("\t")]  # not the PIP := line
    out += [("Makefile", expand(line.strip(), make_variables(make))) for line in recipes]
    out += [(".ci/run", line.strip()) for line in (REPO / ".ci" / "run").read_text().splitlines()]
    return [(w, c) for w, c in out if "pip install" in c and not c.startswith("#")]


def test_makefile_and_ci_install_with_the_constraints_file():
    installs = pip_installs()
    assert [w for w, _ in installs].count("Makefile") >= 2, installs
    for where, cmd in installs:
        m = re.search(r'-e "\.\[([\w,]+)\]"', cmd)
        if where == "Makefile" and m:  # make setup installs every extra but the GPU-only one
            assert set(m[1].split(",")) == set(requirements()) - {"core", "gpu"}, cmd
    m = re.search(r'"\.\[([\w,]+)\]"', runs())
    assert m and {"serve", "distributed", "triton", "gpu"} <= set(m[1].split(","))
    ci = (REPO / ".ci" / "run").read_text()
    assert "export CI=true" in ci
    assert ci.index("make lint") < ci.index("make test"), "CI lints first, then tests"


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
