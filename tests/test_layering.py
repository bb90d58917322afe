"""The import layering rule, checked on the source (ast), function-level imports included:

    mcti/cli  ->  training/, serving/  ->  the rest of mcti/  ->  kernels/

- nothing in mcti/ outside mcti/cli imports training or serving;
- kernels imports nothing of ours (mcti, training, serving);
- training and serving do not import mcti.cli, nor each other;
- no import cycles between files (a module importing a package's __init__ counts; importing
  `a.b.c` does not count as importing `a` and `a.b`, as in import-linter/grimp).

`make lint` runs this file. A dynamic import by name counts as an import: the constant argument of
`import_module`/`__import__`, and, in a file that calls either, any string that is exactly one of
our module names (a table of plugin modules, as in mcti/cli/__init__.py).
"""

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mcti", "kernels", "training", "serving")


@dataclass(frozen=True)
class Edge:
    src: str  # importing module, e.g. "mcti.cli.serve"
    dst: str  # imported module of ours, e.g. "serving.app"
    where: str  # "mcti/cli/serve.py:12"


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """{module name: file} for every .py under the packages (assets and caches left out)."""
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            if "__pycache__" not in path.parts:
                out[module_name(root, path)] = path
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The module of ours that `name` (a module or module.attribute) lives in, if any."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def _imported_names(node: ast.AST, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: from the importing module's package, `level - 1` levels up
            pkg = module.split(".") if is_package else module.split(".")[:-1]
            pkg = pkg[: len(pkg) - (node.level - 1)]
            base = ".".join(pkg + ([base] if base else []))
        # `from a.b import c`: c may be a module (a.b.c) or a name defined in a.b
        return [f"{base}.{a.name}" for a in node.names if a.name != "*"] or [base]
    if isinstance(node, ast.Call):  # importlib.import_module("x") / __import__("x")
        fn = node.func
        fname = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
        if fname in ("import_module", "__import__") and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                return [arg.value]
    return []


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> list[Edge]:
    known = modules(root, packages)
    edges = []
    for mod, path in known.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        dynamic = any(
            isinstance(n, ast.Attribute | ast.Name)
            and (getattr(n, "attr", None) or getattr(n, "id", None))
            in ("import_module", "__import__")
            for n in ast.walk(tree)
        )
        for node in ast.walk(tree):
            names = _imported_names(node, mod, is_package)
            if dynamic and isinstance(node, ast.Constant) and isinstance(node.value, str):
                if node.value in known and node.value != mod:  # a module named by a string
                    names = [node.value]
            for name in names:
                dst = _resolve(name, known)
                if dst is not None and dst != mod:
                    where = f"{path.relative_to(root).as_posix()}:{node.lineno}"
                    edges.append(Edge(mod, dst, where))
    return edges


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(edges: list[Edge]) -> list[str]:
    """Every import that breaks an arrow of the layering rule, one line each."""
    out = []
    for e in edges:
        why = None
        if _in(e.src, "mcti") and not _in(e.src, "mcti.cli"):
            if _in(e.dst, "training") or _in(e.dst, "serving"):
                why = "only mcti/cli may import training/ or serving/"
        elif _in(e.src, "kernels") and not _in(e.dst, "kernels"):
            why = "kernels imports nothing of ours"
        elif _in(e.src, "training") or _in(e.src, "serving"):
            other = "serving" if _in(e.src, "training") else "training"
            if _in(e.dst, "mcti.cli"):
                why = "training/ and serving/ sit below mcti/cli"
            elif _in(e.dst, other):
                why = "training/ and serving/ do not import each other"
        if why:
            out.append(f"{e.where}: {e.src} imports {e.dst} ({why})")
    return sorted(set(out))


def cycles(edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.src, set()).add(e.dst)
        graph.setdefault(e.dst, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []

    def visit(v: str) -> None:  # recursion depth <= number of modules (~60)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def describe_cycle(comp: list[str], edges: list[Edge]) -> str:
    """The imports inside one cycle, each pair once, at its first line."""
    first: dict[tuple[str, str], Edge] = {}
    for e in edges:
        if e.src in comp and e.dst in comp:
            first.setdefault((e.src, e.dst), e)
    return " | ".join(f"{e.where} {e.src} -> {e.dst}" for _, e in sorted(first.items()))


# --- the rule on this repository ---------------------------------------------------------------


def test_the_graph_sees_the_code():
    """Guards the checker against reading nothing: known imports of the tree are found."""
    edges = import_graph(ROOT)
    pairs = {(e.src, e.dst) for e in edges}
    assert len(modules(ROOT)) >= 30
    assert ("mcti.core.diffusion", "kernels.denoise_errors") in pairs or (
        "mcti.core.diffusion",
        "kernels",
    ) in pairs
    assert any(_in(s, "mcti.cli") and _in(d, "serving") for s, d in pairs)


def test_arrows_point_one_way():
    bad = violations(import_graph(ROOT))
    assert bad == [], "layering violations:\n" + "\n".join(bad)


def test_no_import_cycles_between_files():
    edges = import_graph(ROOT)
    found = [describe_cycle(c, edges) for c in cycles(edges)]
    assert found == [], "import cycles:\n" + "\n".join(found)


# --- the checker on planted trees: it must catch what it claims to ---------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_checker_catches_planted_violations(tmp_path):
    root = _tree(
        tmp_path,
        {
            "mcti/__init__.py": "",
            "mcti/cli/__init__.py": "import serving.app\nfrom training import launch\n",
            "mcti/core/__init__.py": "",
            "mcti/core/scoring.py": "def f():\n    from serving.app import build_app\n",
            "mcti/data/x.py": "import importlib\nimportlib.import_module('training.cli')\n",
            "kernels/__init__.py": "from kernels.k import f\n",
            "kernels/k.py": "import torch\nfrom mcti.core import scoring\n",
            "training/__init__.py": "",
            "training/launch.py": "from mcti.cli import main\n",
            "training/cli.py": "from . import launch\nfrom serving import app\n",
            "serving/__init__.py": "",
            "serving/app.py": (
                "import importlib\nPLUGINS = {'x': 'training.cli'}\n"
                "mods = [importlib.import_module(m) for m in PLUGINS.values()]\n"
            ),
            "serving/config.py": "ok = 'serving.app:build_app'.startswith('training.cli')\n",
        },
    )
    bad = violations(import_graph(root))
    expect = [
        "kernels/k.py:2: kernels.k imports mcti.core.scoring",
        "mcti/core/scoring.py:2: mcti.core.scoring imports serving.app",
        "mcti/data/x.py:2: mcti.data.x imports training.cli",
        "serving/app.py:2: serving.app imports training.cli",
        "training/cli.py:2: training.cli imports serving.app",
        "training/launch.py:1: training.launch imports mcti.cli",
    ]
    assert [b.split(" (")[0] for b in bad] == expect, bad


def test_checker_finds_cycles_through_function_level_and_relative_imports(tmp_path):
    root = _tree(
        tmp_path,
        {
            "training/__init__.py": "",
            "training/cli.py": "def run():\n    from .launch import go\n",
            "training/launch.py": "from training.cli import run\n",
            "mcti/__init__.py": "",
            "mcti/a.py": "import mcti.b\n",
            "mcti/b.py": "from mcti import c\n",
            "mcti/c.py": "from mcti.a import x\n",
            "mcti/d.py": "import mcti.a\n",  # into the cycle, not part of it
        },
    )
    edges = import_graph(root, ("mcti", "training"))
    assert cycles(edges) == [["mcti.a", "mcti.b", "mcti.c"], ["training.cli", "training.launch"]]
    assert "training/cli.py:2" in describe_cycle(["training.cli", "training.launch"], edges)
