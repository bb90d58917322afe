"""Build argparse parsers from config dataclasses: the field docstrings are the --help text.

A field whose default is "" is a required option; metadata {"positional": True} makes a list
field a positional argument.
"""

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal right after each field) of cls and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _base_type(tp) -> type:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        help_ = docs.get(f.name, "")
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="+", metavar=f.name.rstrip("s").upper(), help=help_)
            continue
        flag = "--" + f.name.replace("_", "-")
        if tp is bool:
            parser.add_argument(flag, action="store_true", help=help_)
        elif f.default == "":
            parser.add_argument(flag, type=tp, required=True, help=help_)
        else:
            default = f.default if f.default is not dataclasses.MISSING else None
            parser.add_argument(
                flag, type=tp, default=default, help=f"{help_} (default: {default})"
            )


def to_dataclass(cls: type, ns: argparse.Namespace):
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})
