"""deploy/k8s: every manifest parses and validates (strict Kubernetes schemas, the KubeRay CRD),
and names, ports, volumes, images and users agree across files. The workloads' own checks (the
Serve application, the training Job's arguments) are in test_workloads.py, the security ones
(Ray auth, NetworkPolicies) in test_security.py."""

import copy
import re

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.deploy.helpers import (
    CRDS,
    REPO,
    all_of,
    claim_of,
    constraints,
    containers,
    dockerfile_instructions,
    documents,
    kustomization,
    manifest_files,
    mount_of,
    one,
    pod_labels,
    pod_specs,
    pyproject,
    serve_v2,
    worker_groups,
)

K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())  # oldest we support, newest known
DNS1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


# --- parsing and schemas -----------------------------------------------------------------------


def test_kustomization_lists_every_manifest():
    k = kustomization()
    assert (k["apiVersion"], k["kind"]) == ("kustomize.config.k8s.io/v1beta1", "Kustomization")
    assert sorted(k["resources"]) == sorted(f.name for f in manifest_files())
    assert len(k["resources"]) == len(set(k["resources"]))


def test_documents_are_well_formed():
    seen = set()
    kinds = {d["kind"] for _, d in documents()}
    assert {"PersistentVolumeClaim", "ConfigMap", "Service", "Job", "RayService"} <= kinds
    for fname, d in documents():
        assert set(d) >= {"apiVersion", "kind", "metadata"}, fname
        name = d["metadata"]["name"]
        assert DNS1123.fullmatch(name) and len(name) <= 63, f"{fname}: bad name {name!r}"
        # no namespace: `kubectl apply -n` / kustomize decide where it goes
        assert set(d["metadata"]) <= {"name", "labels", "annotations"}, fname
        assert (d["kind"], name) not in seen, f"duplicate {d['kind']} {name}"
        seen.add((d["kind"], name))


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_kinds_validate_strictly(version):
    checked = 0
    for fname, d in documents():
        if d["kind"] == "RayService":
            continue
        try:
            kubernetes_validate.validate(d, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{fname}: {d['kind']} {d['metadata']['name']}: {e}")
        checked += 1
    assert checked == len(documents()) - len(all_of("RayService"))
    # the RayService's pod templates are core PodTemplateSpecs too
    rc = one("RayService")["spec"]["rayClusterConfig"]
    groups = [rc["headGroupSpec"]] + rc["workerGroupSpecs"]
    for g in groups:
        pt = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
        pt["template"] = g["template"]
        kubernetes_validate.validate(pt, version, strict=True)


def test_strict_validation_rejects_a_misspelled_field():
    job = copy.deepcopy(one("Job"))
    c = job["spec"]["template"]["spec"]["containers"][0]
    c["volumeMount"] = c.pop("volumeMounts")
    with pytest.raises(kubernetes_validate.ValidationError, match="volumeMount"):
        kubernetes_validate.validate(job, K8S_VERSIONS[-1], strict=True)


def strict(schema: dict) -> dict:
    """The CRD schema with unknown fields rejected: additionalProperties false wherever an object
    lists its properties and does not ask to keep unknown fields (what the API server prunes)."""
    s = dict(schema)
    if "properties" in s:
        s["properties"] = {k: strict(v) for k, v in s["properties"].items()}
        if "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = strict(s["additionalProperties"])
    if isinstance(s.get("items"), dict):
        s["items"] = strict(s["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in s:
            s[key] = [strict(x) for x in s[key]]
    return s


@pytest.fixture(scope="module")
def rayservice_schema():
    if not CRDS.is_dir():
        pytest.skip(
            f"KubeRay CRD check skipped: {CRDS} does not exist (a clone without the project's "
            "shared/ folder beside it); CI has it and runs this check"
        )
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD is 1 MB of YAML
    crd = yaml.load((CRDS / "ray.io_rayservices.yaml").read_text(), Loader=loader)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(strict(v1["schema"]["openAPIV3Schema"]))


def crd_errors(validator, doc: dict) -> list[str]:
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


def test_rayservice_validates_against_kuberay_crd(rayservice_schema):
    rs = one("RayService")
    assert rs["apiVersion"] == "ray.io/v1"
    assert crd_errors(rayservice_schema, rs) == []


@pytest.mark.parametrize(
    "path, wrong",
    [
        (("spec",), "serveConfigv2"),
        (("spec", "rayClusterConfig", "headGroupSpec"), "rayStartParam"),
        (("spec", "rayClusterConfig", "workerGroupSpecs", 0), "maxReplica"),
        (
            (
                "spec",
                "rayClusterConfig",
                "workerGroupSpecs",
                0,
                "template",
                "spec",
                "containers",
                0,
            ),
            "readinesProbe",
        ),
    ],
)
def test_crd_check_rejects_unknown_fields(rayservice_schema, path, wrong):
    rs = copy.deepcopy(one("RayService"))
    node = rs
    for p in path:
        node = node[p]
    node[wrong] = "x"
    errors = crd_errors(rayservice_schema, rs)
    assert any(wrong in e for e in errors), errors


# --- agreement across files ---------------------------------------------------------------------


def all_containers() -> dict[str, dict]:
    return {
        f"{where}:{c['name']}": c for where, spec in pod_specs().items() for c in containers(spec)
    }


def test_one_image_everywhere():
    version = pyproject()["project"]["version"]
    (img,) = kustomization()["images"]
    expected = f"{img['name']}:{img['newTag']}"
    assert img["newTag"] == version
    for where, c in all_containers().items():
        assert c["image"] == expected, where
    labels = " ".join(
        args
        for ins, args in dockerfile_instructions(REPO / "deploy" / "Dockerfile")
        if ins == "LABEL"
    )
    assert f'org.opencontainers.image.version="{version}"' in labels


def test_ray_version_is_the_pinned_one():
    assert one("RayService")["spec"]["rayClusterConfig"]["rayVersion"] == constraints()["ray"]


def volume_source(v: dict) -> str:
    if "persistentVolumeClaim" in v:
        return "pvc/" + v["persistentVolumeClaim"]["claimName"]
    if "configMap" in v:
        return "configmap/" + v["configMap"]["name"]
    return next(k for k in v if k != "name")


def test_volumes_agree_across_pods():
    pvcs = {p["metadata"]["name"] for p in all_of("PersistentVolumeClaim")}
    cms = {c["metadata"]["name"] for c in all_of("ConfigMap")}
    seen: dict[str, tuple[str, str]] = {}  # volume name -> (source, mount path), in every pod
    used = set()
    for where, spec in pod_specs().items():
        vols = {v["name"]: v for v in spec.get("volumes", [])}
        for v in vols.values():
            src = volume_source(v)
            assert src.removeprefix("pvc/") in pvcs or not src.startswith("pvc/"), where
            assert src.removeprefix("configmap/") in cms or not src.startswith("configmap/"), where
            used.add(src.removeprefix("pvc/"))
        for c in containers(spec):
            for m in c.get("volumeMounts", []):
                assert m["name"] in vols, f"{where}: mount of undeclared volume {m['name']}"
                key = (volume_source(vols[m["name"]]), m["mountPath"])
                # one name, one source, one place: /models, /data, /tokens mean the same everywhere
                assert seen.setdefault(m["name"], key) == key, f"{where}: {m['name']} {key}"
    assert pvcs <= used, f"claims no pod mounts: {pvcs - used}"


def serving_pods() -> dict[str, dict]:
    return {w: s for w, s in pod_specs().items() if w.startswith("ray-")}


def test_serving_reads_volumes_read_only():
    for where, spec in serving_pods().items():
        for v in spec.get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"].get("readOnly") is True, where
        for c in containers(spec):
            for m in c.get("volumeMounts", []):
                if m["mountPath"] != "/dev/shm":
                    assert m.get("readOnly") is True, f"{where}: {m['mountPath']}"


def test_serve_paths_are_on_the_serving_volumes():
    def paths(x):
        if isinstance(x, dict):
            return [p for v in x.values() for p in paths(v)]
        if isinstance(x, list):
            return [p for v in x for p in paths(v)]
        return [x] if isinstance(x, str) and x.startswith("/") else []

    from serving.config import application_settings

    expected_claim = {"model": "mcti-models", "tokens": "mcti-tokens"}
    for app in serve_v2()["applications"]:
        args = application_settings(app)  # args, and the token sets of the user_config
        assert paths(args), "the Serve app reads no path: where do the model and tokens come from?"
        for where, spec in serving_pods().items():  # the builder may run on any node
            c = spec["containers"][0]
            for key, claim in expected_claim.items():
                for p in paths(args.get(key)):
                    assert claim_of(spec, mount_of(c, p)["name"]) == claim, (where, key, p)
            for p in paths(args):
                mount_of(c, p)


def test_client_service_reaches_the_serve_port():
    v2 = serve_v2()
    port = v2["http_options"]["port"]
    labels = pod_labels()
    (svc,) = [s for s in all_of("Service") if s["spec"].get("clusterIP") != "None"]
    sel = svc["spec"]["selector"].items()
    selected = [w for w, lab in labels.items() if sel <= lab.items()]
    assert selected == [f"ray-worker/{g['groupName']}" for g in worker_groups()]  # not the head
    (sp,) = svc["spec"]["ports"]
    for g in worker_groups():
        c = g["template"]["spec"]["containers"][0]
        ports = {p.get("name"): p["containerPort"] for p in c["ports"]}
        target = sp["targetPort"]
        assert (ports[target] if isinstance(target, str) else target) == port == sp["port"]
        probe = c["readinessProbe"]["httpGet"]
        prefix = v2["applications"][0].get("route_prefix", "/").rstrip("/")
        assert probe["path"] == f"{prefix}/healthz"
        assert (ports[probe["port"]] if isinstance(probe["port"], str) else probe["port"]) == port


def gpus(c: dict) -> int:
    return int(c["resources"].get("limits", {}).get("nvidia.com/gpu", 0))


def test_resources_gpus_and_tolerations():
    for where, c in all_containers().items():
        for k in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][k]), f"{where}: {k}"
    rc = one("RayService")["spec"]["rayClusterConfig"]
    head = rc["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0" and head["rayStartParams"]["num-cpus"] == "0"
    assert all(gpus(c) == 0 for c in containers(head["template"]["spec"]))
    assert rc["enableInTreeAutoscaling"] is True
    gpu_pods = {
        f"job/{j['metadata']['name']}": j["spec"]["template"]["spec"] for j in all_of("Job")
    }
    for g in rc["workerGroupSpecs"]:
        assert 1 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        gpu_pods[g["groupName"]] = g["template"]["spec"]
    for where, spec in gpu_pods.items():
        assert gpus(spec["containers"][0]) >= 1, where
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
            "tolerations"
        ], where
    # the classifier replicas ask for GPUs, and what Serve may ask for fits the worker group
    from serving.config import application_settings, load_config

    g = rc["workerGroupSpecs"][0]
    per_worker = gpus(g["template"]["spec"]["containers"][0])
    for app in serve_v2()["applications"]:
        cfg = load_config(application_settings(app))
        assert 0 < cfg.num_gpus <= per_worker, "the classifier must run on the GPU workers"
        assert (cfg.max_replicas or cfg.num_replicas) * cfg.num_gpus <= g[
            "maxReplicas"
        ] * per_worker
        for d in app.get("deployments", []):
            need = d.get("ray_actor_options", {}).get("num_gpus", 0)
            assert need <= per_worker, d["name"]
            top = d.get("autoscaling_config", {}).get("max_replicas") or d.get("num_replicas")
            if need and isinstance(top, int):
                assert top * need <= g["maxReplicas"] * per_worker, d["name"]


def test_security_context():
    users = [
        args
        for ins, args in dockerfile_instructions(REPO / "deploy" / "Dockerfile")
        if ins == "USER"
    ]
    uid = int(users[-1].split(":")[0])
    for where, spec in pod_specs().items():
        sc = spec["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == uid != 0, where
        for c in containers(spec):
            csc = c["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False, where
            assert not csc.get("privileged", False), where
            assert "ALL" in csc["capabilities"]["drop"], where
    auto = one("RayService")["spec"]["rayClusterConfig"]["autoscalerOptions"]["securityContext"]
    assert auto["allowPrivilegeEscalation"] is False and auto["runAsNonRoot"] is True
