"""`mcti serve`: run the Serve application on this machine until Ctrl-C (or SIGTERM); SIGHUP
re-reads the --tokens directories and applies them to the running replicas, as `serve deploy`
of a changed user_config does (serving/local_ray.py: the model stays loaded, no replica restarts;
a set that fails to load leaves the old ones serving and is reported in /healthz).

Settings come from --config FILE (AppConfig keys, or a Serve config file such as
serving/serve_config.yaml, whose application args are used), then from the flags: a flag given
on the command line overrides the file, even when its value is the default. Every AppConfig key
is a flag (mcti.settings.ServeSettings). Imports stay light (ray and torch are imported inside
`run`).
"""

import dataclasses
import os
import socket

from mcti.errors import UserError
from mcti.settings import ServeArgs, ServeSettings

__all__ = ["ServeArgs", "app_settings", "run"]


def app_settings(a: ServeArgs) -> dict:
    """The config file's settings, overridden by the settings given on the command line
    (`a.given`; for a ServeArgs built in Python: every value other than the default)."""
    from serving.config import read_config_file

    settings = read_config_file(a.config) if a.config else {}
    names = [f.name for f in dataclasses.fields(ServeSettings)]
    if a.given is not None:
        settings.update({n: getattr(a, n) for n in names if n in a.given})
    else:
        defaults = ServeArgs()
        settings.update({n: getattr(a, n) for n in names if getattr(a, n) != getattr(defaults, n)})
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
