"""Settings of the serving application (one pydantic model, validated once in the driver).

AppConfig is built from mcti.settings.ServeSettings: the same names, defaults, docstrings (as
descriptions), choices and bounds as `mcti serve`'s flags, so a new setting is one edit there;
only the checks across fields live here.

The same keys are the `args:` of an application in a Serve config file
(`import_path: serving.app:build_app`), the top level of `mcti serve --config FILE`, and the
fields `build_app(args)` takes. `tokens` is the exception in a Serve config file: there it is the
classifier deployment's `user_config` (`deployments: [{name: MctiClassifier, user_config:
{tokens: ...}}]`), which Serve applies to running replicas, while a change of `args` rebuilds the
application and replaces every replica (serving/tokensets.py). Imports stay light (no torch, no
ray): `mcti --help` loads this.
"""

import dataclasses
import types
import typing
from pathlib import Path
from typing import Annotated, Any

import annotated_types
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from mcti.errors import UserError
from mcti.settings import SCORERS, Bounds, Check, ScorerSettings, ServeSettings, field_docs, part

__all__ = [
    "CLASSIFIER",
    "SCORERS",
    "AppConfig",
    "application_settings",
    "load_config",
    "parse_tokens",
    "read_config_file",
    "serve_application",
]

CLASSIFIER = "MctiClassifier"  # the deployment whose user_config holds the token sets

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")  # decoders PIL may try on a request body


def parse_tokens(spec: str) -> dict[str, str]:
    """'DIR' -> {'default': DIR}; 'a=DIR1,b=DIR2' -> {'a': DIR1, 'b': DIR2} (first is default)."""
    out: dict[str, str] = {}
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise UserError("--tokens is empty: give a token directory or ID=DIR,ID=DIR")
    for i, part_ in enumerate(parts):
        key, sep, path = part_.partition("=")
        if not sep:
            key, path = ("default" if len(parts) == 1 else Path(part_).name or f"set{i}"), part_
        key, path = key.strip(), path.strip()
        if not key or not path:
            raise UserError(f"--tokens entry '{part_}' must be DIR or ID=DIR")
        if key in out:
            raise UserError(f"--tokens names token set '{key}' twice")
        out[key] = path
    return out


def _checked(check: Check):
    def validate(value):
        problem = check.problem(value)
        if problem:
            raise ValueError(f"{problem} (not {value!r})")
        return value

    return AfterValidator(validate)


def pydantic_type(hint):
    """The pydantic form of a settings type hint: Bounds become annotated_types constraints,
    Checks become validators (through Optional, list and Annotated)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        base, *markers = args
        extra = []
        for m in markers:
            if isinstance(m, Bounds):
                for name in ("ge", "gt", "le"):
                    if getattr(m, name) is not None:
                        extra.append(getattr(annotated_types, name.capitalize())(getattr(m, name)))
            elif isinstance(m, Check):
                extra.append(_checked(m))
        return Annotated[(pydantic_type(base), *extra)] if extra else pydantic_type(base)
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(pydantic_type(a) for a in args)]  # noqa: UP007
    if origin is list:
        return list[pydantic_type(args[0])]
    return hint  # plain types and Literal choices as they are


def _fields(cls: type) -> dict[str, Any]:
    """create_model fields of a settings dataclass: its types, defaults and docstrings."""
    hints = typing.get_type_hints(cls, include_extras=True)
    docs = field_docs(cls)
    return {
        f.name: (pydantic_type(hints[f.name]), Field(f.default, description=docs.get(f.name)))
        for f in dataclasses.fields(cls)
    }


class _AppConfigChecks(BaseModel):
    """Checks across fields, and conveniences; the fields come from mcti.settings.ServeSettings."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    @field_validator("tokens", mode="before", check_fields=False)
    @classmethod
    def _tokens(cls, v: Any) -> Any:
        if isinstance(v, str):
            return parse_tokens(v)
        if isinstance(v, dict) and not v:
            raise ValueError("needs at least one token set")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                f"({self.max_batch_size}), or batches can never fill"
            )
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("set both min_replicas and max_replicas to autoscale, or neither")
        if self.min_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        if self.scorers is not None and self.scorer not in self.scorers:
            raise ValueError(f"the default scorer '{self.scorer}' must be in scorers")
        return self

    @property
    def default_token_set(self) -> str | None:
        return next(iter(self.tokens)) if self.tokens else None

    def scorer_settings(self) -> ScorerSettings:
        """The scorer settings (what Classifier.from_settings takes)."""
        return part(ScorerSettings, self)

    def check_paths(self) -> dict[str, list[str]]:
        """Read each token set's classes.json (cheap, no model): its labels, or a UserError."""
        from mcti.core.store import read_meta

        return {key: list(read_meta(path)["classes"]) for key, path in self.tokens.items()}


_FIELDS = _fields(ServeSettings)
# Optional here: in a Serve config file the token sets are the classifier's user_config.
_FIELDS["tokens"] = (
    dict[str, str] | None,
    Field(None, description=_FIELDS["tokens"][1].description),
)
AppConfig = create_model(
    "AppConfig",
    __base__=_AppConfigChecks,
    __doc__="Everything the ingress and the classifier deployment need; defaults suit one CPU box.",
    **_FIELDS,
)


def load_config(args: dict | AppConfig, need_tokens: bool = True) -> AppConfig:
    """Validate settings; every mistake becomes one UserError line naming the key.
    `need_tokens=False`: the application builder's args, whose token sets may come as the
    classifier's user_config instead."""
    if not isinstance(args, AppConfig):
        try:
            args = AppConfig(**args)
        except ValidationError as e:
            msgs = []
            for err in e.errors():
                where = ".".join(str(x) for x in err["loc"]) or "config"
                msgs.append(f"{where}: {err['msg']}")  # never err['input']: it may be large
            raise UserError("bad serving config: " + "; ".join(msgs)) from None
    if need_tokens and not args.tokens:
        raise UserError("bad serving config: tokens: needs at least one token set")
    return args


def application_settings(app: dict) -> dict:
    """AppConfig keys of one application of a Serve config file: its `args`, and `tokens` from
    the classifier deployment's user_config (which wins, as it does in Serve)."""
    settings = dict(app.get("args") or {})
    for d in app.get("deployments") or []:
        if d.get("name") == CLASSIFIER and "tokens" in (d.get("user_config") or {}):
            settings["tokens"] = d["user_config"]["tokens"]
    return settings


def serve_application(cfg: AppConfig, versions: dict[str, str] | None = None) -> dict:
    """The Serve config entry of the application (what `serve deploy` takes): settings as
    `args`, token sets as the classifier's user_config, so that a change of token sets alone
    is applied to the running replicas."""
    from serving.tokensets import token_config

    return {
        "name": "mcti",
        "route_prefix": "/",
        "import_path": "serving.app:build_app",
        "args": cfg.model_dump(mode="json", exclude={"tokens"}),
        "deployments": [{"name": CLASSIFIER, "user_config": token_config(cfg.tokens, versions)}],
    }


def read_config_file(path: str | Path) -> dict:
    """A YAML file of AppConfig keys, or a Serve config file (args of its serving.app app)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"--config {path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping at the top level")
    if "applications" in data:  # a Serve config file: take our application's args
        apps = [
            a
            for a in data["applications"] or []
            if str(a.get("import_path", "")).startswith("serving.app")
        ]
        if not apps:
            raise UserError(
                f"--config {path}: no application with import_path serving.app:build_app"
            )
        data = application_settings(apps[0])
    return dict(data)
