"""Settings of the serving application (one pydantic model, validated once in the driver).

The same keys are the `args:` of an application in a Serve config file
(`import_path: serving.app:build_app`), the top level of `mcti serve --config FILE`, and the
fields `build_app(args)` takes. Imports stay light (no torch, no ray): `mcti --help` loads this.
"""

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mcti.errors import UserError
from mcti.settings import DEFAULT_MODEL

SCORERS = ("diffusion", "clip", "hybrid")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")  # decoders PIL may try on a request body


def parse_tokens(spec: str) -> dict[str, str]:
    """'DIR' -> {'default': DIR}; 'a=DIR1,b=DIR2' -> {'a': DIR1, 'b': DIR2} (first is default)."""
    out: dict[str, str] = {}
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise UserError("--tokens is empty: give a token directory or ID=DIR,ID=DIR")
    for i, part in enumerate(parts):
        key, sep, path = part.partition("=")
        if not sep:
            key, path = ("default" if len(parts) == 1 else Path(part).name or f"set{i}"), part
        key, path = key.strip(), path.strip()
        if not key or not path:
            raise UserError(f"--tokens entry '{part}' must be DIR or ID=DIR")
        if key in out:
            raise UserError(f"--tokens names token set '{key}' twice")
        out[key] = path
    return out


class AppConfig(BaseModel):
    """Everything the ingress and the classifier deployment need; defaults suit one CPU box."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # model and token sets
    model: str = Field(
        DEFAULT_MODEL, description="Base model: diffusers dir, 'embedded' or 'tiny-random'."
    )
    clip: str | None = Field(
        None, description="transformers CLIPModel dir when the model has no clip/."
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N (per replica).")
    precision: str = Field("fp32", description="fp32, bf16 or fp16 UNet/VAE (bf16/fp16 need CUDA).")
    attention: str = Field("auto", description="UNet attention backend: auto, sdpa or xformers.")
    tokens: dict[str, str] = Field(
        ...,
        description="Token sets {id: directory written by `mcti train`}; a string 'DIR' or "
        "'id=DIR,id=DIR' is accepted. All stay resident in every replica; the first is the default.",
    )
    # scoring
    scorer: str = Field("diffusion", description="Default scorer: diffusion, clip or hybrid.")
    scorers: list[str] | None = Field(
        None,
        description="Scorers a request may pick (built at load time). Default: the default scorer, "
        "plus clip and hybrid when the model has a CLIP vision tower.",
    )
    n_samples: str = Field(
        "8,16,32", description="Diffusion scorer: cumulative (t, eps) samples per stage."
    )
    to_keep: str = Field("5,2,1", description="Diffusion scorer: classes kept after each stage.")
    hybrid_m: int = Field(
        10, ge=1, description="Hybrid scorer: classes kept by the clip prefilter."
    )
    batch_rows: int = Field(
        256, ge=1, description="UNet rows (image x class x t) per forward pass."
    )
    template: str = Field("a photo of a {}", description="Prompt of each class token.")
    seed: int = Field(
        0, description="Seed of the (t, eps) grid: same seed, same scores as `mcti classify`."
    )
    top_k: int = Field(5, ge=1, description="Labels returned when a request does not say.")
    # batching
    max_batch_size: int = Field(
        8, ge=1, description="Images scored together (one scorer call per token set and scorer)."
    )
    batch_wait_timeout_s: float = Field(
        0.0,
        ge=0,
        description="How long a request waits for others before a batch is collected. Requests "
        "arriving while the model is busy join its next call anyway; a wait only helps bursts "
        "that hit an idle replica (worth a few ms on a GPU), and costs that much at low load.",
    )
    # input limits
    max_body_bytes: int = Field(10_000_000, ge=1024, description="Larger request bodies get 413.")
    max_pixels: int = Field(
        25_000_000,
        ge=1,
        description="Images with more pixels (width x height) get 413, checked before decoding.",
    )
    enable_generate: bool = Field(True, description="Serve POST /v1/generate (PNG of a class).")
    max_generate_steps: int = Field(
        50, ge=1, description="Upper bound of a generate request's steps."
    )
    max_generate_queue: int = Field(
        2,
        ge=1,
        description="Generations a classifier replica holds at once (running or waiting); more "
        "get a fast 503. Scoring goes first: a generation yields the model between its steps.",
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="A request body not fully received within this gets 408."
    )
    # scale and capacity
    num_replicas: int = Field(
        1, ge=1, description="Classifier replicas (ignored when autoscaling)."
    )
    min_replicas: int | None = Field(
        None, ge=0, description="Autoscaling lower bound (set both bounds to autoscale)."
    )
    max_replicas: int | None = Field(None, ge=1, description="Autoscaling upper bound.")
    target_ongoing_requests: float = Field(
        8, gt=0, description="Autoscaling target of in-flight requests per replica."
    )
    num_gpus: float = Field(0, ge=0, description="GPUs per classifier replica.")
    num_cpus: float = Field(1, ge=0, description="CPUs reserved per classifier replica.")
    torch_threads: int = Field(
        0,
        ge=0,
        description="torch intra-op threads in a replica (0: max(1, num_cpus), Ray's default).",
    )
    max_ongoing_requests: int = Field(
        16, ge=1, description="Requests a classifier replica holds at once (>= max_batch_size)."
    )
    max_queued_requests: int = Field(
        32,
        ge=0,
        description="Requests waiting for a classifier replica, per ingress replica; more get a fast 503.",
    )
    ingress_replicas: int = Field(
        1, ge=1, description="HTTP ingress replicas (decode + validation)."
    )

    @field_validator("tokens", mode="before")
    @classmethod
    def _tokens(cls, v: Any) -> Any:
        if isinstance(v, str):
            return parse_tokens(v)
        if isinstance(v, dict) and not v:
            raise ValueError("needs at least one token set")
        return v

    @field_validator("scorer")
    @classmethod
    def _scorer(cls, v: str) -> str:
        if v not in SCORERS:
            raise ValueError(f"must be one of {', '.join(SCORERS)}, not '{v}'")
        return v

    @field_validator("scorers")
    @classmethod
    def _scorers(cls, v: list[str] | None) -> list[str] | None:
        for s in v or []:
            if s not in SCORERS:
                raise ValueError(f"must be among {', '.join(SCORERS)}, not '{s}'")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "AppConfig":
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
    def default_token_set(self) -> str:
        return next(iter(self.tokens))

    def check_paths(self) -> dict[str, list[str]]:
        """Read each token set's classes.json (cheap, no model): its labels, or a UserError."""
        from mcti.core.store import read_meta

        return {key: list(read_meta(path)["classes"]) for key, path in self.tokens.items()}


def load_config(args: dict | AppConfig) -> AppConfig:
    """Validate settings; every mistake becomes one UserError line naming the key."""
    if isinstance(args, AppConfig):
        return args
    try:
        return AppConfig(**args)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            where = ".".join(str(x) for x in err["loc"]) or "config"
            msgs.append(f"{where}: {err['msg']}")  # never err['input']: it may be large
        raise UserError("bad serving config: " + "; ".join(msgs)) from None


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
        data = apps[0].get("args") or {}
    return dict(data)
