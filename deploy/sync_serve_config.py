"""Write serving/serve_config.yaml's applications into the RayService's serveConfigV2.

    python deploy/sync_serve_config.py           # rewrite deploy/k8s/rayservice.yaml in place
    python deploy/sync_serve_config.py --check   # exit 1 if they differ

The RayService embeds the Serve config as a string, so it cannot include the file; this copies
the `applications` list verbatim (token sets in the classifier's `user_config`, where a change of
them alone replaces no replica: a warning names an application that has them in `args`), and the file's `http_options` (port 8000 by default, the request
timeout) listening on the pod's address (0.0.0.0). Only the serveConfigV2 block of the manifest is
rewritten; its comments and the rest of the file stay as they are.
"""

import argparse
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SERVE_CONFIG = REPO / "serving" / "serve_config.yaml"
RAYSERVICE = REPO / "deploy" / "k8s" / "rayservice.yaml"
HEADER = re.compile(r"^(?P<indent> *)serveConfigV2: *\|[-+]? *$")


def wanted(serve_config: Path) -> dict:
    """The serveConfigV2 body for a Serve config file."""
    cfg = yaml.safe_load(serve_config.read_text()) or {}
    apps = cfg.get("applications")
    if not apps:
        raise SystemExit(f"{serve_config}: no 'applications' list")
    for app in apps:
        if "tokens" in (app.get("args") or {}):
            print(
                f"{serve_config}: warning: application '{app.get('name')}' has tokens in args: "
                "a change of them replaces every replica; put them in the user_config of "
                "deployment MctiClassifier (see serving/serve_config.yaml)",
                file=sys.stderr,
            )
    http = {"host": "0.0.0.0", "port": 8000}
    http.update((k, v) for k, v in (cfg.get("http_options") or {}).items() if k != "host")
    return {"http_options": http, "applications": apps}


def block_span(lines: list[str]) -> tuple[int, int, int]:
    """(header line index, end of the block, header indent) of serveConfigV2 in a manifest."""
    for i, line in enumerate(lines):
        m = HEADER.match(line)
        if m:
            indent = len(m["indent"])
            j = i + 1
            while j < len(lines) and (
                not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip(" ")) > indent
            ):
                j += 1
            while j > i + 1 and not lines[j - 1].strip():  # trailing blank lines stay outside
                j -= 1
            return i, j, indent
    raise SystemExit("no `serveConfigV2: |` block in the RayService manifest")


def current(manifest: Path) -> dict:
    doc = yaml.safe_load(manifest.read_text())
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def render(body: dict, indent: int) -> list[str]:
    text = yaml.safe_dump(body, sort_keys=False, default_flow_style=False, width=100)
    return [(" " * (indent + 2) + line) if line else line for line in text.splitlines()]


def sync(serve_config: Path = SERVE_CONFIG, manifest: Path = RAYSERVICE) -> bool:
    """Rewrite the manifest's serveConfigV2; True if it changed."""
    body = wanted(serve_config)
    if current(manifest) == body:
        return False
    lines = manifest.read_text().splitlines()
    start, end, indent = block_span(lines)
    lines[start + 1 : end] = render(body, indent)
    manifest.write_text("\n".join(lines) + "\n")
    assert current(manifest) == body
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report; exit 1 if out of sync")
    ap.add_argument("--serve-config", type=Path, default=SERVE_CONFIG)
    ap.add_argument("--manifest", type=Path, default=RAYSERVICE)
    a = ap.parse_args(argv)
    if a.check:
        if current(a.manifest) != wanted(a.serve_config):
            print(f"{a.manifest}: serveConfigV2 differs from {a.serve_config}; run {__file__}")
            return 1
        return 0
    changed = sync(a.serve_config, a.manifest)
    print(f"{a.manifest}: {'updated' if changed else 'already in sync'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
