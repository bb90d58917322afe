"""`mcti serve`: run the Serve application on this machine until Ctrl-C (or SIGTERM).

Settings come from --config FILE (AppConfig keys, or a Serve config file such as
serving/serve_config.yaml, whose application args are used), then from the flags below: a flag
overrides the file when it is given a value other than its default. Imports stay light (ray and
torch are imported inside `run`).
"""

import dataclasses
import os
import socket
from dataclasses import dataclass

from mcti.errors import UserError
from mcti.settings import DEFAULT_MODEL


@dataclass
class ServeArgs:
    tokens: str = ""
    """Token directory written by `mcti train`, or several as ID=DIR,ID=DIR (the first is the default set)."""
    model: str = DEFAULT_MODEL
    """Base model the tokens were trained on: a diffusers directory, 'embedded' or 'tiny-random'."""
    clip: str | None = None
    """A transformers CLIPModel directory when the model has no clip/ folder (clip and hybrid scorers)."""
    device: str = "auto"
    """auto (CUDA if available), cpu, cuda or cuda:N."""
    precision: str = "fp32"
    """fp32, bf16 or fp16 for the UNet/VAE (bf16/fp16 need CUDA)."""
    attention: str = "auto"
    """UNet attention: auto, sdpa or xformers."""
    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0 to accept other machines)."""
    port: int = 8000
    """HTTP port."""
    config: str | None = None
    """YAML file with serving settings (keys of serving.config.AppConfig, or a Serve config file)."""
    scorer: str = "diffusion"
    """Default scorer: diffusion, clip or hybrid (requests may pick another enabled one)."""
    n_samples: str = "8,16,32"
    """Diffusion scorer: cumulative (t, eps) samples per stage, comma-separated."""
    to_keep: str = "5,2,1"
    """Diffusion scorer: classes kept after each stage (last must be 1)."""
    max_batch_size: int = 8
    """Concurrent requests scored in one scorer call."""
    batch_wait_timeout_s: float = 0.0
    """How long a request waits for others to batch with (requests that arrive while the model is busy join its next batch anyway)."""
    replicas: int = 1
    """Classifier replicas (each loads the model once)."""
    num_gpus: float = 0
    """GPUs per classifier replica."""
    no_generate: bool = False
    """Disable POST /v1/generate."""
    cpus: int = 0
    """CPUs of the local Ray instance (0: all); the classifier replicas share them."""


# ServeArgs field -> AppConfig key, where the names differ
RENAMED = {"replicas": "num_replicas"}
CLI_ONLY = {"host", "port", "config", "cpus", "no_generate"}


def app_settings(a: ServeArgs) -> dict:
    """The config file's settings, overridden by every flag given a non-default value."""
    from serving.config import read_config_file

    settings = read_config_file(a.config) if a.config else {}
    defaults = ServeArgs()
    for f in dataclasses.fields(ServeArgs):
        value = getattr(a, f.name)
        if f.name not in CLI_ONLY and value != getattr(defaults, f.name):
            settings[RENAMED.get(f.name, f.name)] = value
    if a.no_generate:
        settings["enable_generate"] = False
    return settings


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        # as the server will: connections of a previous run in TIME_WAIT do not block the port
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def run(a: ServeArgs) -> None:
    from serving.config import load_config

    settings = app_settings(a)
    cpus = a.cpus or os.cpu_count() or 1
    # The ingress takes no CPU; the classifiers share the rest, so one local replica uses every
    # core like `mcti classify` does (Ray would otherwise pin torch to one thread per replica).
    settings.setdefault("num_cpus", max(1, cpus // max(1, settings.get("num_replicas", 1))))
    cfg = load_config(settings)
    labels = cfg.check_paths()  # bad token dirs fail here, before Ray starts
    _check_port(a.host, a.port)

    from serving.local_ray import serve_locally

    patient_proxy_checks()
    sets = ", ".join(f"{k} ({len(v)} classes)" for k, v in labels.items())
    ready = f"mcti serve: {sets} on http://{a.host}:{a.port} (API docs at /docs); Ctrl-C stops"
    serve_locally(cfg, a.host, a.port, cpus, ready)


def patient_proxy_checks(seconds: int = 60) -> None:
    """Serve gives its HTTP proxy 5 s to report ready (10 s for health checks); on a loaded
    machine that fails start-up. Raise both before Ray starts (its processes inherit the env)."""
    import os

    for var in ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"):
        os.environ.setdefault(var, str(seconds))
