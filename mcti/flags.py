"""Build argparse parsers from the settings dataclasses (mcti/settings.py), and check outputs.

- A field's docstring is its --help text; `Literal` choices become `choices`, and choices,
  bounds and checks are applied while parsing, so `--scorer knn` or `--shots 0` fail at once
  with one line `mcti <cmd>: error: --scorer must be one of ...`.
- A field whose default is "" is a required option; metadata {"positional": True} makes a
  field a positional argument (one value; one or more for a list field), {"flag": "--x"}
  names its flag, {"cli": False} leaves it out.
  A bool defaulting to True is turned off by its flag.
- A dataclass with a `given` field gets no argparse defaults: `to_dataclass` fills in the
  dataclass defaults and records in `given` which settings the command line set, so a command
  can tell an explicit flag from a default (`mcti serve`: flags override --config).
- `check_outputs` checks every `Output` path before the command loads a model.
"""

import argparse
import dataclasses
import os
import re
import tempfile
import typing
from pathlib import Path

from mcti.errors import UserError
from mcti.settings import Output, field_docs, field_types, flag_of, value_problem


class SettingsParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (`prog: error: ...`, exit 2), no usage dump."""

    def error(self, message: str) -> typing.NoReturn:
        # "argument --shots: must be >= 1 (not 0)" reads better as "--shots must be >= 1 (not 0)"
        message = re.sub(r"^argument (\S+?)(?:/\S+)?: (must .*)$", r"\1 \2", message)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _converter(cls: type, name: str, tp: type):
    """str -> one value of field `name` (an item, for a list field), raising
    ArgumentTypeError with what is wrong."""
    is_list = typing.get_origin(tp) is list
    item = typing.get_args(tp)[0] if is_list else tp
    literal = typing.get_origin(item) is typing.Literal
    convert = type(typing.get_args(item)[0]) if literal else item

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            kind = "an integer" if convert is int else "a number"
            raise argparse.ArgumentTypeError(f"must be {kind} (not {text!r})") from None
        problem = value_problem(cls, name, [value] if is_list else value)
        if problem:
            raise argparse.ArgumentTypeError(f"{problem} (not {text!r})")
        return value

    return parse


def _choices(tp: type) -> tuple | None:
    if typing.get_origin(tp) is list:
        tp = typing.get_args(tp)[0]
    return typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else None


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One option (or positional) per field of settings dataclass `cls`."""
    docs = field_docs(cls)
    types_ = field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    suppress = "given" in names  # see the module docstring
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli", True) is False:
            continue
        tp, _, _ = types_[f.name]
        help_ = docs.get(f.name, "")
        if f.metadata.get("positional"):
            nargs = "+" if typing.get_origin(tp) is list else None  # a str field: one value
            parser.add_argument(f.name, nargs=nargs, metavar=f.name.rstrip("s").upper(), help=help_)
            continue
        flag = flag_of(f)
        extra = {"default": argparse.SUPPRESS} if suppress else {}
        if tp is bool:
            action = "store_false" if f.default is True else "store_true"
            parser.add_argument(flag, dest=f.name, action=action, help=help_, **extra)
            continue
        kw = dict(dest=f.name, type=_converter(cls, f.name, tp), choices=_choices(tp))
        if kw["choices"] is None:
            kw["metavar"] = flag[2:].upper().replace("-", "_")
        if typing.get_origin(tp) is list:
            kw["nargs"] = "+"
        if f.default == "":
            parser.add_argument(flag, required=True, help=help_, **kw, **extra)
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        parser.add_argument(
            flag, help=f"{help_} (default: {default})", **kw, **(extra or {"default": default})
        )


def to_dataclass(cls: type, ns: argparse.Namespace):
    """The settings object of parsed arguments (dataclass defaults for what was not given)."""
    names = [f.name for f in dataclasses.fields(cls) if hasattr(ns, f.name)]
    values = {name: getattr(ns, name) for name in names}
    if "given" in {f.name for f in dataclasses.fields(cls)}:
        values["given"] = tuple(names)
    return cls(**values)


def _writable_dir(path: Path) -> None:
    """Raise OSError unless a file can be created in directory `path`."""
    fd, tmp = tempfile.mkstemp(prefix=".mcti-write-check.", dir=path)
    os.close(fd)
    os.unlink(tmp)


def check_output(flag: str, path: str, kind: str) -> None:
    """UserError unless `path` can be written as a directory (kind "dir") or a file ("file"):
    not the other kind already, and inside a directory we may write in. Leaves nothing behind
    (a probe file is created and removed in the nearest existing directory)."""
    p = Path(path)
    if kind == "dir" and p.exists() and not p.is_dir():
        raise UserError(f"{flag} '{path}' is a file, not a directory")
    if kind == "file" and p.is_dir():
        raise UserError(f"{flag} '{path}' is a directory; give a file name")
    first = p if kind == "dir" else p.parent  # the directory that must exist or be creatable
    near = next(q for q in [first, *first.parents] if q.exists() or q == Path(q.anchor))
    if not near.is_dir():
        raise UserError(f"{flag} '{path}': '{near}' is a file, not a directory")
    try:
        _writable_dir(near)
    except OSError as e:
        raise UserError(f"{flag} '{path}': cannot write in '{near}' ({e.strerror})") from None


def check_outputs(a) -> None:
    """Check every `Output` field of settings object `a` (before the command does real work)."""
    for f in dataclasses.fields(a):
        value = getattr(a, f.name)
        _, markers, _ = field_types(type(a))[f.name]
        for m in markers:
            if isinstance(m, Output) and value:
                check_output(flag_of(f), value, m.kind)
