"""Reading deploy/: the manifests by kind and name, pod templates, the Dockerfile, .dockerignore."""

import re
from functools import cache
from pathlib import Path, PurePosixPath

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
# CI runs in a fresh clone with a copy of shared/ beside it (../shared from the repo root); a
# worktree one level deeper (e.g. wt/NAME) finds the same folder further up.
SHARED = next(
    (p / "shared" for p in REPO.parents if (p / "shared" / "crds" / "kuberay").is_dir()),
    REPO.parent / "shared",
)
CRDS = SHARED / "crds" / "kuberay"


@cache
def manifest_files() -> tuple[Path, ...]:
    return tuple(sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"))


@cache
def documents() -> tuple[tuple[str, dict], ...]:
    """(file name, object) for every YAML document of every manifest (kustomization excluded)."""
    out = []
    for f in manifest_files():
        for doc in yaml.safe_load_all(f.read_text()):
            if doc is not None:
                out.append((f.name, doc))
    return tuple(out)


def one(kind: str, name: str | None = None) -> dict:
    found = [
        d for _, d in documents() if d["kind"] == kind and name in (None, d["metadata"]["name"])
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def all_of(kind: str) -> list[dict]:
    return [d for _, d in documents() if d["kind"] == kind]


def pod_specs() -> dict[str, dict]:
    """Every pod template in the manifests: {'job/<name>' | 'ray-head' | 'ray-worker/<group>': spec}."""
    out = {f"job/{j['metadata']['name']}": j["spec"]["template"]["spec"] for j in all_of("Job")}
    for rs in all_of("RayService"):
        rc = rs["spec"]["rayClusterConfig"]
        out["ray-head"] = rc["headGroupSpec"]["template"]["spec"]
        for g in rc["workerGroupSpecs"]:
            out[f"ray-worker/{g['groupName']}"] = g["template"]["spec"]
    return out


def pod_labels() -> dict[str, dict]:
    out = {
        f"job/{j['metadata']['name']}": j["spec"]["template"]["metadata"]["labels"]
        for j in all_of("Job")
    }
    for rs in all_of("RayService"):
        rc = rs["spec"]["rayClusterConfig"]
        out["ray-head"] = rc["headGroupSpec"]["template"]["metadata"]["labels"]
        for g in rc["workerGroupSpecs"]:
            out[f"ray-worker/{g['groupName']}"] = g["template"]["metadata"]["labels"]
    return out


@cache
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


CONSTRAINTS = REPO / "deploy" / "constraints.txt"


@cache
def constraints() -> dict[str, str]:
    """{name: version} of deploy/constraints.txt, the one file of exact versions."""
    out = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: '{line}' is not name==version"
            key = canonicalize_name(name)
            assert key not in out, f"constraints.txt pins {name} twice"
            out[key] = version
    return out


def requirements() -> dict[str, list[Requirement]]:
    """pyproject.toml's requirements: {"core": [...], "<extra>": [...]}."""
    p = pyproject()["project"]
    out = {"core": [Requirement(r) for r in p["dependencies"]]}
    for extra, reqs in p.get("optional-dependencies", {}).items():
        out[extra] = [Requirement(r) for r in reqs]
    return out


def serve_config_path() -> Path:
    return REPO / "serving" / "serve_config.yaml"


# --- shared by the manifest tests ---------------------------------------------------------------


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def serve_v2() -> dict:
    return yaml.safe_load(one("RayService")["spec"]["serveConfigV2"])


def worker_groups() -> list[dict]:
    return one("RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]


COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def substituted_args(container: dict) -> list[str]:
    """The container's args with Kubernetes' $(VAR) expansion; the completion index reads as 0."""
    env = {e["name"]: e for e in container.get("env", [])}

    def value(m: re.Match) -> str:
        assert m[1] in env, f"$({m[1]}) is not defined in the container's env"
        e = env[m[1]]
        if "value" in e:
            return e["value"]
        assert e["valueFrom"]["fieldRef"]["fieldPath"] == COMPLETION_INDEX
        return "0"

    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value, a) for a in container["args"]]


def mount_of(container: dict, path: str) -> dict:
    """The volumeMount a path lies under (the deepest one)."""
    best = None
    for m in container.get("volumeMounts", []):
        if PurePosixPath(path).is_relative_to(m["mountPath"]):
            if best is None or len(m["mountPath"]) > len(best["mountPath"]):
                best = m
    assert best is not None, f"'{path}' is on no volume of container {container['name']}"
    return best


def claim_of(spec: dict, volume_name: str) -> str:
    (vol,) = [v for v in spec["volumes"] if v["name"] == volume_name]
    return vol.get("persistentVolumeClaim", {}).get("claimName", "")


# --- Dockerfile --------------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # comment inside a continued instruction
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


# --- .dockerignore (Docker's rules: Go filepath.Match per pattern, `**` any depth, `!` re-includes,
# the last matching pattern wins, and a pattern matching a parent directory matches its content) ---


def _pattern_regex(pattern: str) -> re.Pattern:
    parts, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                parts.append("(?:.*/)?")
                i += 1
            else:
                parts.append(".*")
            continue
        if c == "*":
            parts.append("[^/]*")
        elif c == "?":
            parts.append("[^/]")
        elif c == "[":
            j = pattern.index("]", i)
            body = pattern[i + 1 : j]
            parts.append("[" + ("^" + body[1:] if body.startswith(("!", "^")) else body) + "]")
            i = j
        else:
            parts.append(re.escape(c))
        i += 1
    return re.compile("".join(parts))


def dockerignore_rules(path: Path) -> list[tuple[bool, re.Pattern]]:
    """(exclude?, compiled pattern) per line, in order."""
    rules = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        pat = line.lstrip("!").strip().strip("/")
        rules.append((exclude, _pattern_regex(pat)))
    return rules


def excluded(rel: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Whether a path (relative to the build context, '/'-separated) stays out of the context."""
    parts = rel.strip("/").split("/")
    prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    result = False
    for exclude, rx in rules:
        if any(rx.fullmatch(p) for p in prefixes):
            result = exclude
    return result
