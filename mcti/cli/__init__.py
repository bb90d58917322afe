"""`mcti` command line: one module per command (mcti/cli/<command>.py, each with `run(args)`),
settings from mcti/settings.py.

User mistakes print one line `mcti <cmd>: error: ...` and exit 2; failures of the environment
(disk full, permissions, I/O) print one line and exit 1; nothing is left half-written. Output
paths are checked before any model loads. This is the only package that imports `training` and
`serving`; its top-level imports stay light (torch etc. inside the commands).
"""

import argparse
import importlib
import sys

from mcti import settings
from mcti.errors import UserError
from mcti.flags import SettingsParser, add_dataclass_args, check_outputs, to_dataclass
from mcti.runtime import setup_process

# name -> (module with run(args), settings class in mcti.settings (else in the module), help)
COMMANDS = {
    "train": ("mcti.cli.train", "TrainArgs", "learn one token per class from DATA/<label>/<image>"),
    "eval": ("mcti.cli.eval", "EvalArgs", "accuracy of a token set on a labelled image folder"),
    "classify": ("mcti.cli.classify", "ClassifyArgs", "best labels for image files"),
    "generate": ("mcti.cli.generate", "GenerateArgs", "draw images of one class"),
    "demo": (
        "mcti.cli.demo",
        "DemoArgs",
        "the main job: few-shot tokens on real data with the embedded model",
    ),
    "pretrain": ("mcti.pretrain", "PretrainArgs", "train the embedded base model from scratch"),
    "serve": ("mcti.cli.serve", "ServeArgs", "serve classification over HTTP (Ray Serve)"),
    "synth": (
        "mcti.cli.synth",
        "SynthArgs",
        "write a many-class synthetic image set (glyphs x colours), regenerable by seed",
    ),
    "tokens": (
        "mcti.cli.tokens",
        "TokensArgs",
        "inspect and edit token sets: info, list, merge, remove, rename",
    ),
}


def _settings_class(module: str, name: str) -> type | None:
    """The command's settings class; None when its module is not built (yet)."""
    if hasattr(settings, name):
        return getattr(settings, name)
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            return None
        raise


def _commands() -> dict[str, tuple[type, str, str]]:
    """name -> (settings class, module, help) of every command that is present."""
    out = {}
    for name, (module, cls_name, help_) in COMMANDS.items():
        cls = _settings_class(module, cls_name)
        if cls is not None:
            out[name] = (cls, module, help_)
    return out


def build_parser(commands: dict | None = None) -> argparse.ArgumentParser:
    parser = SettingsParser(
        prog="mcti",
        description="Multi-class textual inversion: learn a token per class without class names; classify and generate.",
    )
    verbose = "Show third-party progress bars and warnings (model loading etc.)."
    parser.add_argument("--verbose", action="store_true", help=verbose)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (cls, _, help_) in (commands or _commands()).items():
        p = sub.add_parser(name, help=help_, description=help_)
        parsers = [(p, cls)]
        subs = getattr(cls, "SUBCOMMANDS", None)
        if subs:  # a command with subcommands (`mcti tokens info`): a settings class each
            inner = p.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
            parsers = [
                (inner.add_parser(s, help=c.__doc__, description=c.__doc__), c)
                for s, c in subs.items()
            ]
        for p, cls in parsers:
            add_dataclass_args(p, cls)
            p.add_argument(
                "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    commands = _commands()
    try:
        ns = build_parser(commands).parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed on one line
        return e.code if isinstance(e.code, int) else 0
    setup_process(verbose=ns.verbose)
    cls, module, _ = commands[ns.command]
    prog = f"mcti {ns.command}"
    if getattr(cls, "SUBCOMMANDS", None):
        cls, prog = cls.SUBCOMMANDS[ns.subcommand], f"{prog} {ns.subcommand}"
    try:
        a = to_dataclass(cls, ns)
        check_outputs(a)
        importlib.import_module(module).run(a)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # the environment failed us: disk full, permissions, I/O
        what = f"{e.strerror or e}" + (f": '{e.filename}'" if e.filename else "")
        print(f"{prog}: error: {what}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
