"""deploy/k8s security (issue 11.3): Ray token authentication is on, with the token from a Secret
that is never in the repository; NetworkPolicies admit Ray's ports only from the same RayService's
pods (the dashboard also from the KubeRay operator, Serve's 8000 also from labelled clients) and the
training Job's ports only from its own pods; the dashboard stays off the client Service.

The policies are evaluated by a small model of NetworkPolicy ingress semantics (a pod selected by
any Ingress policy is isolated; a connection is admitted when some rule of a selecting policy
matches both its port and its source) against a matrix of sources and ports."""

import re
from dataclasses import dataclass, field

import pytest

from tests.deploy.helpers import all_of, documents, one, pod_labels, pod_specs

DNS1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
# Ports Ray listens on besides the declared ones: dashboard agent, metrics, and one standing for the
# raylet / object manager / worker ports that Ray picks at random.
RAY_EXTRA_PORTS = [52365, 8080, 45678]
TRAIN_EXTRA_PORTS = [45678]  # NCCL / gloo pick their own ports besides torchrun's 29500


@dataclass(frozen=True)
class Source:
    name: str
    labels: dict
    namespace_labels: dict = field(default_factory=dict)
    same_namespace: bool = True


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"selector not modelled here: {selector}"
    return selector.get("matchLabels", {}).items() <= labels.items()


def _peer_matches(peers: list | None, src: Source) -> bool:
    if not peers:  # no `from`: every source
        return True
    for peer in peers:
        assert "ipBlock" not in peer, "ipBlock peers are not modelled (and not wanted here)"
        pod_ok = "podSelector" not in peer or _selects(peer["podSelector"], src.labels)
        if "namespaceSelector" in peer:
            ns_ok = _selects(peer["namespaceSelector"], src.namespace_labels)
        else:
            ns_ok = src.same_namespace  # a bare podSelector means this namespace
        if pod_ok and ns_ok:
            return True
    return False


def _port_matches(ports: list | None, port: int, name: str | None) -> bool:
    if not ports:  # no `ports`: every port
        return True
    for p in ports:
        if p.get("protocol", "TCP") != "TCP":
            continue
        want = p.get("port")
        if want is None or want == port or (name is not None and want == name):
            return True
        if isinstance(want, int) and "endPort" in p and want <= port <= p["endPort"]:
            return True
    return False


def isolating_policies(labels: dict) -> list[dict]:
    return [
        p
        for p in all_of("NetworkPolicy")
        if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and _selects(p["spec"]["podSelector"], labels)
    ]


def admits(labels: dict, port: int, port_name: str | None, src: Source) -> bool:
    policies = isolating_policies(labels)
    if not policies:
        return True  # not isolated: everything gets in
    return any(
        _port_matches(rule.get("ports"), port, port_name) and _peer_matches(rule.get("from"), src)
        for p in policies
        for rule in p["spec"].get("ingress", [])
    )


def ray_pods() -> dict[str, dict]:
    return {w: lab for w, lab in pod_labels().items() if w.startswith("ray-")}


def train_pods() -> dict[str, dict]:
    return {w: lab for w, lab in pod_labels().items() if w.startswith("job/")}


def listening_ports(where: str, extra: list[int]) -> list[tuple[int, str | None]]:
    declared = [
        (p["containerPort"], p.get("name"))
        for c in pod_specs()[where]["containers"]
        for p in c.get("ports", [])
    ]
    return declared + [(port, None) for port in extra]


def sources() -> dict[str, Source]:
    ray = next(iter(ray_pods().values()))
    train = next(iter(train_pods().values()))
    return {
        "ray": Source("ray", ray),
        "train": Source("train", train),
        "stranger": Source("stranger", {"app": "something-else"}),
        "lookalike-elsewhere": Source("lookalike", ray, {"team": "other"}, same_namespace=False),
        "client-pod": Source("client-pod", {"mcti/client": "true"}),
        "client-namespace": Source("ingress", {"app": "nginx"}, {"mcti/client": "true"}, False),
        "operator": Source(
            "operator",
            {"app.kubernetes.io/name": "kuberay-operator"},
            {"kubernetes.io/metadata.name": "kuberay-operator"},
            same_namespace=False,
        ),
    }


def expected_ray(src: str, port: int) -> bool:
    return (
        src == "ray"
        or (src == "operator" and port == 8265)
        or (src in ("client-pod", "client-namespace") and port == 8000)
    )


# --- Ray authentication ------------------------------------------------------------------------


def test_ray_token_auth_is_on_with_a_secret_token():
    auth = one("RayService")["spec"]["rayClusterConfig"].get("authOptions")
    assert auth is not None, "no authOptions: `ray start` in the pods runs without authentication"
    assert auth["mode"] == "token"
    assert DNS1123.fullmatch(auth.get("secretName", "")), auth
    assert not auth.get("enableK8sTokenAuth", False), "unsupported for RayService"
    # the token never lives in the repository
    assert all_of("Secret") == [], "a Secret with Ray's token must not be committed"
    for _, doc in documents():
        assert "auth_token" not in str(doc.get("data", "")) + str(doc.get("stringData", ""))


def test_no_container_overrides_the_auth_mode():
    for where, spec in pod_specs().items():
        for c in spec["containers"]:
            names = {e["name"] for e in c.get("env", [])}
            assert not names & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"}, where


# --- NetworkPolicies ---------------------------------------------------------------------------


def test_every_pod_is_isolated_by_an_ingress_policy():
    for where, labels in pod_labels().items():
        assert isolating_policies(labels), f"{where}: no NetworkPolicy selects it (open to all)"


@pytest.mark.parametrize("src", list(sources()))
def test_ray_ports_admit_only_the_same_cluster(src):
    """Every port a Ray pod listens on: its own cluster always; the operator only on the dashboard;
    clients only on Serve's 8000; nobody else (not the training pods, not a same-labelled pod of
    another namespace) on any port."""
    source = sources()[src]
    for where, labels in ray_pods().items():
        for port, name in listening_ports(where, RAY_EXTRA_PORTS):
            got = admits(labels, port, name, source)
            assert got == expected_ray(src, port), f"{where}:{port} ({name}) from {src}: {got}"


@pytest.mark.parametrize("src", list(sources()))
def test_training_ports_admit_only_the_jobs_own_pods(src):
    source = sources()[src]
    for where, labels in train_pods().items():
        ports = listening_ports(where, TRAIN_EXTRA_PORTS)
        assert 29500 in [p for p, _ in ports], "the rendezvous port is declared"
        for port, name in ports:
            got = admits(labels, port, name, source)
            assert got == (src == "train"), f"{where}:{port} from {src}: {got}"


def test_policy_model_sees_an_open_policy():
    """The evaluator itself: a rule without `from` would open a port to everyone."""
    (policy,) = [p for p in all_of("NetworkPolicy") if p["metadata"]["name"] == "mcti-train"]
    rules = policy["spec"]["ingress"]
    labels = next(iter(train_pods().values()))
    stranger = sources()["stranger"]
    assert not admits(labels, 29500, "rendezvous", stranger)
    rules.append({"ports": [{"port": 29500}]})
    try:
        assert admits(labels, 29500, "rendezvous", stranger)
        assert not admits(labels, 29501, None, stranger)
    finally:
        rules.pop()


# --- the dashboard -----------------------------------------------------------------------------


def test_dashboard_and_ray_ports_stay_off_every_service():
    ray_only = {6379, 8265, 10001, 52365}
    for svc in all_of("Service"):
        for p in svc["spec"]["ports"]:
            assert p["port"] not in ray_only, svc["metadata"]["name"]
            assert p.get("targetPort") not in ("dashboard", "gcs-server", "client", 8265, 6379)
    (client,) = [s for s in all_of("Service") if s["spec"].get("clusterIP") != "None"]
    assert [p["port"] for p in client["spec"]["ports"]] == [8000]
