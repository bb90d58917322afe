"""`mcti serve`: run the Serve application on this machine until Ctrl-C (or SIGTERM).

Settings come from --config FILE (AppConfig keys, or a Serve config file such as
serving/serve_config.yaml, whose application args are used), then from the flags: a flag given
on the command line overrides the file, even when its value is the default. Every AppConfig key
is a flag (mcti.settings.ServeSettings). Imports stay light (ray and torch are imported inside
`run`).
"""

import dataclasses
import os
import re
import signal
import socket
import sys
import time

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


def _why(serve, e: Exception) -> str:
    """The replicas' own error (e.g. tokens of another base model), else Serve's last line."""
    try:
        app = serve.status().applications["mcti"]
        texts = [d.message for d in app.deployments.values() if d.message] + [app.message]
    except Exception:
        texts = []
    for text in [*texts, str(e)]:
        m = re.findall(r"UserError: (.+)", text or "")
        if m:
            return m[-1].strip()
    lines = [x for x in str(e).splitlines() if x.strip()]
    return lines[-1] if lines else type(e).__name__


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

    import ray
    from ray import serve

    from serving.app import build_app

    patient_proxy_checks()
    ray.init(
        num_cpus=cpus,
        include_dashboard=False,
        object_store_memory=200 * 2**20,
        namespace="mcti-serve",
    )

    def _stop(signum, frame):  # SIGTERM (docker stop, kill) exits as cleanly as Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        serve.start(http_options={"host": a.host, "port": a.port})
        try:
            serve.run(build_app(cfg), name="mcti", route_prefix="/", blocking=False)
        except Exception as e:
            raise UserError(f"the application did not start: {_why(serve, e)}") from None
        sets = ", ".join(f"{k} ({len(v)} classes)" for k, v in labels.items())
        print(
            f"mcti serve: {sets} on http://{a.host}:{a.port} (API docs at /docs); Ctrl-C stops",
            file=sys.stderr,
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("mcti serve: shutting down", file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def patient_proxy_checks(seconds: int = 60) -> None:
    """Serve gives its HTTP proxy 5 s to report ready (10 s for health checks); on a loaded
    machine that fails start-up. Raise both before Ray starts (its processes inherit the env)."""
    import os

    for var in ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"):
        os.environ.setdefault(var, str(seconds))
