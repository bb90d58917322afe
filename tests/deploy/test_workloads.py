"""deploy/k8s workloads: the RayService's Serve config is serving/serve_config.yaml's (and the
sync script keeps it so), and the training Job's arguments parse with torchrun's and the training
CLI's own parsers and pass the trainer's preflight."""

import importlib
import importlib.util
import json
from pathlib import PurePosixPath

import pytest
import yaml

from tests.deploy.helpers import (
    K8S,
    REPO,
    all_of,
    claim_of,
    mount_of,
    one,
    serve_config_path,
    serve_v2,
    substituted_args,
)

# --- the Serve application -----------------------------------------------------------------------


def test_serve_config_is_serving_serve_config():
    from ray.serve.schema import ServeDeploySchema

    path = serve_config_path()
    assert path.is_file(), f"{path} is missing: the serving package ships its Serve config there"
    from_file = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    embedded = ServeDeploySchema.model_validate(serve_v2())

    def apps(cfg):
        return [a.model_dump(exclude_unset=True) for a in cfg.applications]

    assert apps(embedded) == apps(from_file), "run `python deploy/sync_serve_config.py`"
    from serving.config import CLASSIFIER, application_settings, load_config

    for a in embedded.applications:
        assert a.import_path == "serving.app:build_app"
        # the app's own settings model accepts them (unknown keys rejected)
        load_config(application_settings(a.model_dump(exclude_unset=True)))
        # token sets are the classifier's user_config: changing them replaces no replica
        assert "tokens" not in a.args
        (classifier,) = [d for d in a.deployments if d.name == CLASSIFIER]
        assert classifier.user_config["tokens"]
    # pods listen on their own address, on the port the probes and the client Service use
    assert (embedded.http_options.host, embedded.http_options.port) == ("0.0.0.0", 8000)


def test_serve_import_path_imports():
    for app in serve_v2()["applications"]:
        module, _, attr = app["import_path"].partition(":")
        builder = getattr(importlib.import_module(module), attr)
        assert callable(builder)


def load_sync_script():
    spec = importlib.util.spec_from_file_location(
        "sync_serve_config", REPO / "deploy" / "sync_serve_config.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sync_script_rewrites_only_serve_config(tmp_path):
    sync = load_sync_script()
    manifest = tmp_path / "rayservice.yaml"
    serve_cfg = tmp_path / "serve_config.yaml"
    text = (K8S / "rayservice.yaml").read_text()
    manifest.write_text(text)
    cfg = {
        "applications": [
            {
                "name": "x",
                "route_prefix": "/",
                "import_path": "serving.app:build_app",
                "args": {"model": "/models/other", "tokens": {"a": "/tokens/run-002"}},
            }
        ]
    }
    serve_cfg.write_text(yaml.safe_dump(cfg))
    paths = ["--manifest", str(manifest), "--serve-config", str(serve_cfg)]
    assert sync.main(["--check", *paths]) == 1
    assert sync.main(paths) == 0
    assert sync.main(["--check", *paths]) == 0
    new = yaml.safe_load(manifest.read_text())
    assert yaml.safe_load(new["spec"]["serveConfigV2"])["applications"] == cfg["applications"]
    old = yaml.safe_load(text)
    del old["spec"]["serveConfigV2"], new["spec"]["serveConfigV2"]
    assert new == old
    assert [ln for ln in manifest.read_text().splitlines() if ln.lstrip().startswith("#")] == [
        ln for ln in text.splitlines() if ln.lstrip().startswith("#")
    ]  # comments survive


def test_sync_script_agrees_with_the_repo():
    if not serve_config_path().is_file():
        pytest.fail(f"{serve_config_path()} is missing")
    assert load_sync_script().main(["--check"]) == 0


# --- training -------------------------------------------------------------------------------------


def test_training_job_runs_torchrun_across_pods():
    from torch.distributed.run import get_args_parser

    job = one("Job")
    spec = job["spec"]
    pod = spec["template"]["spec"]
    assert spec["completionMode"] == "Indexed"
    n = spec["completions"]
    assert spec["parallelism"] == n >= 1
    (c,) = pod["containers"]
    assert c["command"] == ["torchrun"]
    node_rank_arg = [a for a in c["args"] if a.startswith("--node-rank")]
    assert node_rank_arg == ["--node-rank=$(NODE_RANK)"]
    a = get_args_parser().parse_args(substituted_args(c))
    assert a.nnodes == str(n)
    assert a.nproc_per_node == str(c["resources"]["limits"]["nvidia.com/gpu"])
    assert a.rdzv_backend == "static" and a.module and a.training_script == "training"
    assert importlib.util.find_spec("training.__main__"), "`-m training` needs training/__main__.py"
    # pod 0 hosts the rendezvous: <job>-0.<subdomain>, a headless Service selecting the pods
    svc = one("Service", pod["subdomain"])
    assert a.master_addr == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    assert a.master_port in [p["port"] for p in svc["spec"]["ports"]]
    assert a.master_port in [p["containerPort"] for p in c["ports"]]


def test_training_arguments_parse_with_the_training_cli(tmp_path):
    from torch.distributed.run import get_args_parser

    from mcti.errors import UserError
    from mcti.flags import to_dataclass
    from training.cli import DistTrainArgs, build_parser, preflight

    job = one("Job")
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    launch = get_args_parser().parse_args(substituted_args(c))
    try:
        ns = build_parser().parse_args(launch.training_script_args)
    except SystemExit as e:
        pytest.fail(
            f"training.cli rejects the Job's arguments {launch.training_script_args}: exit {e.code}"
        )
    data_root = ns.data.split(":", 2)[2] if ns.data.startswith("coop:") else ns.data
    expect = {  # argument -> (claim, writable)
        data_root: ("mcti-datasets", False),
        ns.out: ("mcti-tokens", True),
        ns.model: ("mcti-models", False),
    }
    for path, (claim, writable) in expect.items():
        m = mount_of(c, path)
        assert claim_of(pod, m["name"]) == claim, path
        assert m.get("readOnly", False) is not writable, path
    assert ns.resume, "--resume: a rerun of the Job continues from its checkpoint"
    # the DeepSpeed config is the ConfigMap's key, mounted where --deepspeed-config says ...
    m = mount_of(c, ns.deepspeed_config)
    (vol,) = [v for v in pod["volumes"] if v["name"] == m["name"]]
    cm = one("ConfigMap", vol["configMap"]["name"])
    key = str(PurePosixPath(ns.deepspeed_config).relative_to(m["mountPath"]))
    assert key in cm["data"]
    # ... and the trainer's own preflight accepts it at the Job's world size (batch, precision)
    local = tmp_path / key
    local.write_text(cm["data"][key])
    args = to_dataclass(DistTrainArgs, ns)
    args.deepspeed_config = str(local)
    world = int(launch.nnodes) * int(launch.nproc_per_node)
    try:
        resolved = preflight(args, world)
    except UserError as e:
        pytest.fail(f"the Job's settings fail the trainer's preflight at world size {world}: {e}")
    assert resolved.micro_batch >= 1


def test_deepspeed_configmap_is_a_training_config():
    configs = sorted((REPO / "training" / "configs").glob("*.json"))
    assert configs, (
        "training/configs/*.json is missing (the training package ships its DeepSpeed configs)"
    )
    (cm,) = all_of("ConfigMap")
    shipped = {p.name: json.loads(p.read_text()) for p in configs}
    for key, text in cm["data"].items():
        assert json.loads(text) in shipped.values(), (
            f"{key} differs from every training/configs/*.json"
        )
