"""The local Ray instance of `mcti serve`: loopback only, token auth on, a clean stop on SIGINT
or SIGTERM, the token directories read again on SIGHUP.

The application is deployed as `serve deploy` deploys a config file (declaratively: settings as
`args`, token sets as the classifier's `user_config`, serving.config.serve_application). On SIGHUP
the token directories' versions (serving.tokensets.dir_version) go into a new user_config: Serve
then calls `reconfigure` on the running replicas, which keep the model loaded. (`serve.run` of
the same application with a new user_config would replace every replica: an imperative deploy
gets a new random code version each time.)

What listens where (Ray 2.60, checked by tests/serving/test_local_serve.py with `ss -ltnp` over
the server's whole process session):
- `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` is Ray's own single-machine mode (its default on macOS and
  Windows): the node address of every Ray process is 127.0.0.1, and GCS, raylet (node and object
  manager), every worker's gRPC server, the dashboard agent (HTTP, gRPC, metrics), the runtime-env
  agent and the metrics exporters then listen on 127.0.0.1 only. It must be set before `ray` is
  imported (Ray reads it at import) and reaches the Ray processes through their environment.
- Serve 2.60 binds each replica's inter-deployment gRPC server to "[::]:0", hard-coded in
  ray/serve/_private/replica.py with no setting; `serving.loopback.keep_replica_grpc_on_loopback`,
  called by our deployments' constructors, makes that bind 127.0.0.1 in a loopback instance.
- The dashboard is off; the HTTP proxy alone listens on --host.
Token auth: `RAY_AUTH_MODE=token` is set explicitly (Ray 2.60 happens to turn it on for a new
local cluster, but nothing should rest on a default). The token comes from `RAY_AUTH_TOKEN`, else
the file `RAY_AUTH_TOKEN_PATH`, else ~/.ray/auth_token; that file is created mode 0600 (Ray's own
would follow the umask, 0644) and an existing one is narrowed to 0600.
"""

import os
import re
import secrets
import signal
import stat
import sys
import threading
import time
from pathlib import Path

from mcti.errors import UserError
from serving.loopback import LOOPBACK, LOOPBACK_ENV

REQUEST_TIMEOUT_S = 300.0  # Serve's end-to-end limit of one HTTP request (then 408)


def token_file() -> tuple[Path | None, str]:
    """Make sure Ray finds a token only this user can read: (file or None, how it is kept)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None, "token from RAY_AUTH_TOKEN"
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))  # 256 bits, as `ray get-auth-token --generate`
        return path, f"new token in {path}, mode 0600"
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        path.chmod(0o600)
        return path, f"token in {path}, now mode 0600 (it was readable by others)"
    return path, f"token in {path}, mode 0600"


def prepare_environment() -> str:
    """Environment of a loopback-only, token-authenticated Ray; call before importing ray.
    Returns how the token is kept, for the start-up line."""
    if "ray" in sys.modules:
        raise RuntimeError("prepare_environment() must run before `import ray`")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ[LOOPBACK_ENV] = "1"
    _, how = token_file()
    return how


def startup_error(serve, e: Exception) -> str:
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


def deploy(cfg, versions: dict[str, str]) -> str:
    """Deploy the application, or update it, from its Serve config (as `serve deploy` does);
    returns the version of token sets the classifier replicas will report once applied."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from serving.config import serve_application
    from serving.tokensets import sets_version

    config = ServeDeploySchema(applications=[serve_application(cfg, versions)])
    _get_global_client().deploy_apps(config)
    return sets_version(cfg.tokens, versions)


def wait_running(serve, timeout_s: float | None = None) -> None:
    """Until the application runs; a UserError with the replicas' reason when it cannot."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get("mcti")
        status = str(app.status) if app else ""
        if status.endswith("RUNNING"):
            return
        if status.endswith("DEPLOY_FAILED"):
            raise RuntimeError(app.message)
        if deadline is not None and time.monotonic() > deadline:
            raise RuntimeError(f"not running after {timeout_s:g} s")
        time.sleep(0.2)


def reload_tokens(serve, cfg, timeout_s: float = 300) -> str:
    """Read the token directories again and apply them to the running replicas (SIGHUP):
    the line to print."""
    from serving.config import CLASSIFIER
    from serving.tokensets import dir_version

    t0 = time.monotonic()
    versions = {k: dir_version(p) for k, p in cfg.tokens.items()}
    expected = deploy(cfg, versions)
    handle = serve.get_deployment_handle(CLASSIFIER, "mcti")
    while True:  # until a replica says it has tried this version
        h = handle.health.remote().result(timeout_s=30)
        if h["requested"] == expected:
            break
        if time.monotonic() - t0 > timeout_s:
            return f"token sets not applied within {timeout_s:g} s; the previous ones serve"
        time.sleep(0.2)
    if h["error"]:
        return f"token sets not applied (the previous ones keep serving): {h['error']}"
    info = handle.info.remote().result(timeout_s=30)
    sets = ", ".join(f"{k} ({len(v['labels'])} classes)" for k, v in info["token_sets"].items())
    return f"token sets applied in {time.monotonic() - t0:.1f} s: {sets}"


def _stop(signum, frame) -> None:
    # SIGINT from a terminal or a process manager, SIGTERM (docker stop, kill): the same clean
    # stop. Set explicitly: a process started in the background inherits SIGINT ignored.
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # one stop; a second signal does not cut it
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def serve_locally(app_config, host: str, port: int, cpus: int, ready_line: str) -> None:
    """Run the application on a new local Ray instance until SIGINT or SIGTERM, then stop both.
    Ray's control plane listens on loopback only; the HTTP proxy on `host`."""
    auth = prepare_environment()

    import ray
    from ray import serve

    from serving.tokensets import dir_version

    hup = threading.Event()
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        ray.init(
            num_cpus=cpus,
            include_dashboard=False,
            object_store_memory=200 * 2**20,
            namespace="mcti-serve",
            _node_ip_address=LOOPBACK,
        )
        # after ray.init, which sets its own SIGTERM handler
        signal.signal(signal.SIGINT, _stop)
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGHUP, lambda signum, frame: hup.set())
        http = {"host": host, "port": port, "request_timeout_s": REQUEST_TIMEOUT_S}
        serve.start(http_options=http)
        try:
            deploy(app_config, {k: dir_version(p) for k, p in app_config.tokens.items()})
            wait_running(serve)
        except Exception as e:
            raise UserError(f"the application did not start: {startup_error(serve, e)}") from None
        print(ready_line, file=sys.stderr, flush=True)
        print(
            f"mcti serve: Ray listens on {LOOPBACK} only; Ray token auth on ({auth}); "
            f"`kill -HUP {os.getpid()}` re-reads the token directories",
            file=sys.stderr,
            flush=True,
        )
        while True:
            if not hup.wait(1.0):
                continue
            hup.clear()
            print("mcti serve: SIGHUP: reading the token directories", file=sys.stderr, flush=True)
            try:
                line = reload_tokens(serve, app_config)
            except Exception as e:  # the server keeps serving what it has
                line = f"token sets not applied: {type(e).__name__}: {str(e)[:300]}"
            print(f"mcti serve: {line}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("mcti serve: shutting down", file=sys.stderr, flush=True)
    finally:
        for s in saved:
            signal.signal(s, signal.SIG_IGN)
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            for s, handler in saved.items():
                signal.signal(s, handler)
