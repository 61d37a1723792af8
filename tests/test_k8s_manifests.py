"""The deployment files agree with the program and with Kubernetes.

Offline checks, no cluster and no Docker engine: every manifest in k8s/ passes
kubernetes-validate's strict schemas (unknown fields are errors) for the newest Kubernetes
version the package ships; the walstore StatefulSet's environment, resolved for each pod the
way the kubelet would, is read by `walstore.config.from_env` into a cluster of exactly
those pods; ports, probe paths, data paths, etcd member names and disruption budgets line
up across files; and the Dockerfile is parsed (instructions and stages) and checked against
the Makefile's install command and the StatefulSet's user and ports.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate.utils as kv
import pytest
import yaml  # type: ignore[import-untyped]

from walstore import config
from walstore.http.server import HttpLimits
from walstore.node import shutdown_budget_s

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
MAKEFILE = ROOT / "Makefile"

# The names kustomize looks for (sigs.k8s.io/kustomize konfig.RecognizedKustomizationFileNames)
# and the extensions `kubectl apply -f DIR` reads (kubectl's resource.FileExtensions).
KUSTOMIZE_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
KUBECTL_EXTENSIONS = (".json", ".yaml", ".yml")

Obj = dict[str, Any]
# The C loader when PyYAML has it: the pure-Python one makes this file noticeably slower.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# --- loading the manifests -------------------------------------------------------------


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.iterdir() if p.suffix in KUBECTL_EXTENSIONS)


@functools.cache  # parsed once per run; the tests only read the objects
def _load(path: Path) -> list[Obj]:
    docs = [d for d in yaml.load_all(path.read_text(), Loader=_YAML_LOADER) if d is not None]
    assert all(isinstance(d, dict) for d in docs), f"{path.name}: a document is not a mapping"
    return docs


def _objects() -> list[tuple[Path, Obj]]:
    return [(path, doc) for path in _manifest_files() for doc in _load(path)]


def _get(kind: str, name: str) -> Obj:
    found = [d for _, d in _objects() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected exactly one {kind}/{name} in k8s/, found {len(found)}"
    return found[0]


def _namespace() -> str:
    namespaces = [d for _, d in _objects() if d["kind"] == "Namespace"]
    assert len(namespaces) == 1
    name = namespaces[0]["metadata"]["name"]
    assert isinstance(name, str)
    return name


def _sts(name: str) -> Obj:
    return _get("StatefulSet", name)


def _container(sts: Obj) -> Obj:
    containers = sts["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "one container per pod: the probes and ports below assume it"
    container = containers[0]
    assert isinstance(container, dict)
    return container


def _port_number(container: Obj, port: int | str) -> int:
    """A probe's or Service's port, named or numbered, as the container's port number."""
    if isinstance(port, int):
        return port
    numbers = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert len(numbers) == 1, f"container port named {port!r} not found"
    number = numbers[0]
    assert isinstance(number, int)
    return number


def _expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion in env values and args; $$ escapes a dollar."""

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return re.sub(r"\$\$|\$\((\w+)\)", one, text)


def _pod_env(sts: Obj, ordinal: int) -> dict[str, str]:
    """The environment the kubelet gives pod `ordinal`: fieldRefs resolved, $(VAR) expanded."""
    pod_fields = {
        "metadata.name": f"{sts['metadata']['name']}-{ordinal}",
        "metadata.namespace": sts["metadata"]["namespace"],
    }
    env: dict[str, str] = {}
    for var in _container(sts).get("env", []):
        if "value" in var:
            env[var["name"]] = _expand(str(var["value"]), env)
        else:
            field_path = var["valueFrom"]["fieldRef"]["fieldPath"]
            assert field_path in pod_fields, f"{var['name']}: unexpected fieldRef {field_path}"
            env[var["name"]] = pod_fields[field_path]
    return env


def event_store_pod_env(ordinal: int = 0) -> dict[str, str]:
    """Exactly the environment pod event-store-<ordinal> gets from the manifests, for tests
    that start a real node configured as Kubernetes would configure it."""
    return _pod_env(_sts("event-store"), ordinal)


def _flags(args: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for arg in args:
        assert arg.startswith("--") and "=" in arg, f"write flags as --name=value: {arg!r}"
        name, _, value = arg[2:].partition("=")
        assert name not in out, f"--{name} given twice"
        out[name] = value
    return out


def _selects(selector: Obj, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are checked here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _pod_labels(sts: Obj) -> dict[str, str]:
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert isinstance(labels, dict)
    return labels


def _majority(n: int) -> int:
    return n // 2 + 1


# --- the manifests as files ------------------------------------------------------------


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: p.name)
def test_manifest_passes_strict_schema_validation(path: Path) -> None:
    version = kv.latest_version()
    for doc in _load(path):
        try:
            validated = kv.validate(doc, version, strict=True)
        except kv.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            pytest.fail(f"{path.name} {doc['kind']}/{doc['metadata']['name']}: {where}: {e.message}")
        except kv.SchemaNotFoundError as e:
            # The CLI only warns here; for us an object no schema knows is a typo'd kind.
            pytest.fail(f"{path.name}: {e.message}")
        assert validated == kv.major_minor(version)


def test_kubectl_apply_f_on_the_folder_reads_only_api_objects_in_a_working_order() -> None:
    files = _manifest_files()
    assert len(files) >= 6
    assert not [p.name for p in files if p.name in KUSTOMIZE_NAMES], (
        "kubectl apply -f k8s/ would try to apply the kustomization as an object"
    )
    # kubectl applies the files in name order: the Namespace must exist before anything in it.
    first = _load(files[0])
    assert [d["kind"] for d in first] == ["Namespace"]
    namespace = _namespace()
    for path, doc in _objects():
        assert {"apiVersion", "kind", "metadata"} <= set(doc), path.name
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace, (
                f"{path.name} {doc['kind']}/{doc['metadata']['name']} is not in {namespace}"
            )


def test_kustomization_lists_exactly_the_manifests_in_name_order() -> None:
    present = [name for name in KUSTOMIZE_NAMES if (K8S / name).exists()]
    assert present == ["Kustomization"], "kustomize refuses a folder with two kustomization files"
    kustomization = yaml.safe_load((K8S / "Kustomization").read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["resources"] == [p.name for p in _manifest_files()]


# --- walstore's StatefulSet against the program ----------------------------------------


def test_statefulset_sets_only_variables_the_program_reads() -> None:
    names = [var["name"] for var in _container(_sts("event-store")).get("env", [])]
    assert len(names) == len(set(names)), "a variable is set twice"
    assert set(names) <= set(config.ENV_VARS), set(names) - set(config.ENV_VARS)


def test_every_pods_environment_configures_a_cluster_of_the_statefulset_pods() -> None:
    sts = _sts("event-store")
    replicas = sts["spec"]["replicas"]
    service = sts["spec"]["serviceName"]
    namespace = sts["metadata"]["namespace"]
    pods = [f"{sts['metadata']['name']}-{i}" for i in range(replicas)]
    for ordinal, pod in enumerate(pods):
        cfg = config.from_env(_pod_env(sts, ordinal))
        assert cfg.node_id == pod
        assert cfg.namespace == namespace
        assert cfg.clustered and cfg.cluster_size == replicas
        assert cfg.me is not None
        # The derived peers must be the pods' real DNS names behind the headless Service.
        assert [(p.node_id, p.host) for p in cfg.peers] == [
            (name, f"{name}.{service}.{namespace}.svc.cluster.local") for name in pods
        ]


def test_walstore_service_name_is_the_statefulset_and_headless_service_name() -> None:
    sts = _sts("event-store")
    env = event_store_pod_env(0)
    assert sts["metadata"]["name"] == sts["spec"]["serviceName"] == env["SERVICE_NAME"]
    headless = _get("Service", env["SERVICE_NAME"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert _selects({"matchLabels": headless["spec"]["selector"]}, _pod_labels(sts))


def test_probes_use_the_health_paths_on_the_probe_port() -> None:
    # Not the client port: whoever fills its connection cap would fail the liveness probe
    # there and get the pod restarted (walstore.http.server, "Probes that strangers cannot
    # starve").
    sts = _sts("event-store")
    container = _container(sts)
    cfg = config.from_env(_pod_env(sts, 0))
    assert cfg.probe_port is not None and cfg.probe_port not in (cfg.http_port, cfg.peer_port)
    expected = {"livenessProbe": "/health/live", "readinessProbe": "/health/ready"}
    if "startupProbe" in container:
        expected["startupProbe"] = "/health/live"
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert _port_number(container, get["port"]) == cfg.probe_port, probe


def test_no_service_and_no_pod_reaches_the_probe_port() -> None:
    sts = _sts("event-store")
    container = _container(sts)
    probe_port = config.from_env(_pod_env(sts, 0)).probe_port
    for _, obj in _objects():
        if obj["kind"] == "Service" and _selects({"matchLabels": obj["spec"]["selector"]}, _pod_labels(sts)):
            for port in obj["spec"]["ports"]:
                assert _port_number(container, port.get("targetPort", port["port"])) != probe_port, obj


def test_termination_grace_period_covers_the_worst_case_drain() -> None:
    sts = _sts("event-store")
    cfg = config.from_env(_pod_env(sts, 0))
    limits = HttpLimits(max_body_bytes=cfg.max_body_bytes, max_connections=cfg.http_max_connections)
    grace = sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # A second for the kubelet's own SIGTERM delivery and the process start of exit.
    assert grace >= shutdown_budget_s(limits) + 1, (grace, shutdown_budget_s(limits))


def test_services_expose_the_peer_and_http_ports_the_program_binds() -> None:
    sts = _sts("event-store")
    container = _container(sts)
    env = _pod_env(sts, 0)
    cfg = config.from_env(env)
    container_ports = {p["containerPort"] for p in container["ports"]}
    assert container_ports == {cfg.http_port, cfg.peer_port, cfg.probe_port}

    headless_ports = {p["name"]: p for p in _get("Service", env["SERVICE_NAME"])["spec"]["ports"]}
    peer = headless_ports["peer"]
    assert peer["port"] == int(env["PEER_PORT"]) == cfg.peer_port
    assert _port_number(container, peer["targetPort"]) == cfg.peer_port
    # Peers connect to the port in their derived address, i.e. the Service port.
    assert {p.port for p in cfg.peers} == {peer["port"]}

    client = _get("Service", "event-store-http")["spec"]
    assert client.get("clusterIP") != "None", "clients need one virtual IP over the ready pods"
    assert _selects({"matchLabels": client["selector"]}, _pod_labels(sts))
    (http,) = client["ports"]
    assert http["port"] == 8080
    assert _port_number(container, http["targetPort"]) == int(env["HTTP_PORT"]) == cfg.http_port


def test_data_dir_is_on_the_persistent_volume() -> None:
    sts = _sts("event-store")
    data_dir = PurePosixPath(_pod_env(sts, 0)["DATA_DIR"])
    assert PurePosixPath(str(config.from_env(_pod_env(sts, 0)).data_dir)) == data_dir
    _assert_on_claim(sts, data_dir)


def _assert_on_claim(sts: Obj, path: PurePosixPath) -> None:
    claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    mounts = [m for m in _container(sts)["volumeMounts"] if path.is_relative_to(m["mountPath"])]
    assert mounts, f"{path} is on no volume: it would vanish with the container"
    # The deepest mount containing the path is where the files land.
    deepest = max(mounts, key=lambda m: len(PurePosixPath(m["mountPath"]).parts))
    assert deepest["name"] in claims, f"{path} is on {deepest['name']}, not a PersistentVolumeClaim"
    assert not deepest.get("readOnly", False)


def test_etcd_endpoints_are_the_etcd_pods_client_addresses() -> None:
    etcd = _sts("etcd")
    etcd_container = _container(etcd)
    client_port = _port_number(etcd_container, "client")
    namespace = etcd["metadata"]["namespace"]
    expected = [
        f"etcd-{i}.{etcd['spec']['serviceName']}.{namespace}.svc.cluster.local:{client_port}"
        for i in range(etcd["spec"]["replicas"])
    ]
    env = _pod_env(_sts("event-store"), 0)
    assert env["ETCD_ENDPOINTS"].split(",") == expected
    assert list(config.from_env(env).etcd_endpoints) == expected
    etcd_service = {p["name"]: p["port"] for p in _get("Service", "etcd")["spec"]["ports"]}
    assert etcd_service["client"] == client_port


# --- etcd -------------------------------------------------------------------------------


def test_etcd_initial_cluster_names_the_statefulset_pods() -> None:
    etcd = _sts("etcd")
    container = _container(etcd)
    flags = _flags(container["args"])
    namespace = etcd["metadata"]["namespace"]
    service = etcd["spec"]["serviceName"]
    peer_port = _port_number(container, "peer")
    pods = [f"{etcd['metadata']['name']}-{i}" for i in range(etcd["spec"]["replicas"])]
    peer_url = {pod: f"http://{pod}.{service}.{namespace}.svc.cluster.local:{peer_port}" for pod in pods}

    members = dict(item.split("=", 1) for item in flags["initial-cluster"].split(","))
    assert members == peer_url
    assert flags["initial-cluster-state"] == "new"
    # Each pod must call itself by the name and URL the others expect for it.
    for ordinal, pod in enumerate(pods):
        env = _pod_env(etcd, ordinal)
        assert _expand(flags["name"], env) == pod
        assert _expand(flags["initial-advertise-peer-urls"], env) == peer_url[pod]
        client_port = _port_number(container, "client")
        client_url = f"http://{pod}.{service}.{namespace}.svc.cluster.local:{client_port}"
        assert _expand(flags["advertise-client-urls"], env) == client_url

    headless = _get("Service", service)["spec"]
    assert headless["clusterIP"] == "None"
    assert headless["publishNotReadyAddresses"] is True
    service_ports = {p["name"]: p["port"] for p in headless["ports"]}
    assert service_ports.items() >= {"client": _port_number(container, "client"), "peer": peer_port}.items()
    assert _selects({"matchLabels": headless["selector"]}, _pod_labels(etcd))
    _assert_on_claim(etcd, PurePosixPath(flags["data-dir"]))


def test_etcd_image_is_a_pinned_3_5_release() -> None:
    image = _container(_sts("etcd"))["image"]
    assert re.fullmatch(r"quay\.io/coreos/etcd:v3\.5\.\d+", image), image


# --- both quorum systems ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["event-store", "etcd"])
def test_replicas_are_odd(name: str) -> None:
    replicas = _sts(name)["spec"]["replicas"]
    # An even count tolerates no more failures than the odd count below it.
    assert replicas >= 3 and replicas % 2 == 1


@pytest.mark.parametrize("name", ["event-store", "etcd"])
def test_disruption_budget_keeps_a_majority(name: str) -> None:
    sts = _sts(name)
    replicas = sts["spec"]["replicas"]
    budgets = [
        d["spec"]
        for _, d in _objects()
        if d["kind"] == "PodDisruptionBudget" and _selects(d["spec"]["selector"], _pod_labels(sts))
    ]
    assert len(budgets) == 1, f"{name}: expected one PodDisruptionBudget, found {len(budgets)}"
    (budget,) = budgets
    always_up = budget["minAvailable"] if "minAvailable" in budget else replicas - budget["maxUnavailable"]
    assert isinstance(always_up, int), "percentages round in surprising ways; use a count"
    assert always_up >= _majority(replicas)


@pytest.mark.parametrize("name", ["event-store", "etcd"])
def test_statefulset_starts_in_parallel_and_updates_one_pod_at_a_time(name: str) -> None:
    spec = _sts(name)["spec"]
    # OrderedReady would deadlock: no pod is Ready before a majority is running.
    assert spec["podManagementPolicy"] == "Parallel"
    strategy = spec["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy.get("rollingUpdate", {}).get("maxUnavailable", 1) == 1
    pod = spec["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= 15
    terms = pod["affinity"]["podAntiAffinity"]
    selectors = [
        t.get("podAffinityTerm", t)
        for t in terms.get("preferredDuringSchedulingIgnoredDuringExecution", [])
        + terms.get("requiredDuringSchedulingIgnoredDuringExecution", [])
    ]
    assert any(
        s["topologyKey"] == "kubernetes.io/hostname" and _selects(s["labelSelector"], _pod_labels(_sts(name)))
        for s in selectors
    ), "pods of one quorum should not share a machine"
    retention = spec["persistentVolumeClaimRetentionPolicy"]
    assert retention == {"whenDeleted": "Retain", "whenScaled": "Retain"}


@pytest.mark.parametrize("name", ["event-store", "etcd"])
def test_pods_meet_the_restricted_pod_security_standard(name: str) -> None:
    pod = _sts(name)["spec"]["template"]["spec"]
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] != 0 and security["fsGroup"] != 0
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for container in pod["containers"]:
        own = container["securityContext"]
        assert own["allowPrivilegeEscalation"] is False
        assert own["readOnlyRootFilesystem"] is True
        assert own["capabilities"] == {"drop": ["ALL"]}
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"])
        assert "memory" in resources["limits"]
    labels = _get("Namespace", _namespace())["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_network_policies_let_the_quorums_talk() -> None:
    store, etcd = _sts("event-store"), _sts("etcd")

    def allowed(target: Obj, source_labels: dict[str, str] | None, port: int) -> bool:
        """Would some policy selecting `target` admit `port` from a pod with these labels
        (None = from outside the namespace)? No policy selecting it means all is allowed."""
        container = _container(target)
        policies = [
            d["spec"]
            for _, d in _objects()
            if d["kind"] == "NetworkPolicy" and _selects(d["spec"]["podSelector"], _pod_labels(target))
        ]
        if not policies:
            return True
        for policy in policies:
            for rule in policy.get("ingress", []):
                ports = [_port_number(container, p["port"]) for p in rule.get("ports", [])]
                sources = rule.get("from")
                from_ok = sources is None or (
                    source_labels is not None and any(_selects(s["podSelector"], source_labels) for s in sources)
                )
                if from_ok and (not ports or port in ports):
                    return True
        return False

    cfg = config.from_env(_pod_env(store, 0))
    store_labels, etcd_labels = _pod_labels(store), _pod_labels(etcd)
    etcd_port = {name: _port_number(_container(etcd), name) for name in ("client", "peer", "metrics")}
    assert allowed(store, store_labels, cfg.peer_port)
    assert allowed(store, None, cfg.http_port)
    # The probe port: only the kubelet, whose node traffic no NetworkPolicy can block.
    assert cfg.probe_port is not None
    assert not allowed(store, None, cfg.probe_port)
    assert not allowed(store, store_labels, cfg.probe_port)
    assert allowed(etcd, store_labels, etcd_port["client"])
    assert allowed(etcd, etcd_labels, etcd_port["client"])
    assert allowed(etcd, etcd_labels, etcd_port["peer"])
    assert allowed(etcd, None, etcd_port["metrics"])  # probes and Prometheus
    # The unauthenticated ports stay closed to everyone else.
    assert not allowed(store, None, cfg.peer_port)
    assert not allowed(etcd, None, etcd_port["client"])
    assert not allowed(etcd, store_labels, etcd_port["peer"])


# --- Dockerfile ---------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """Instructions grouped into stages, with backslash continuations joined, comments and
    parser directives dropped, and global ARG defaults substituted into FROM."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # a comment inside a continued instruction does not end it
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = args.split()
            words = [w for w in words if not w.startswith("--platform")]
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: global_args[m[1] or m[2]], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif not stages:
            assert keyword == "ARG", f"only ARG may come before the first FROM, not {keyword}"
            arg_name, _, default = args.partition("=")
            global_args[arg_name] = default
        else:
            stages[-1].instructions.append((keyword, args))
    return stages


def _stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


_PROJECT_SPEC = re.compile(r"""^['"]?\.(\[[\w,-]+\])?['"]?$""")


def _pip_installs_of_the_project(command: str) -> list[tuple[str, bool]]:
    """(project spec without extras, editable?) for each `pip install` of `.` in a shell line."""
    # A Makefile's $(BIN) would lex as shell punctuation; its name is enough here.
    command = re.sub(r"\$\((\w+)\)", r"\1", command)
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|"):
            commands.append([])
        else:
            commands[-1].append(token)
    found: list[tuple[str, bool]] = []
    for words in commands:
        if len(words) < 2 or not words[0].endswith("pip") or words[1] != "install":
            continue
        for i, word in enumerate(words[2:], start=2):
            if _PROJECT_SPEC.match(word):
                editable = words[i - 1] in ("-e", "--editable")
                found.append((re.sub(r"\[.*\]", "", word.strip("'\"")), editable))
    return found


def _makefile_install_command() -> str:
    """The `pip install` line of the rule `make install` depends on ($(STAMP))."""
    text = MAKEFILE.read_text()
    rule = re.search(r"^\$\(STAMP\):.*\n((?:\t.*\n)+)", text, re.MULTILINE)
    assert rule, "Makefile: no $(STAMP) rule"
    lines = [line.strip() for line in rule.group(1).splitlines() if _pip_installs_of_the_project(line)]
    assert len(lines) == 1, lines
    return lines[0]


# The tag, and the digest that pins it (sha256 of the image index, 64 hex digits) once known.
BASE_IMAGE = re.compile(r"python:3\.11-slim-bookworm(?P<digest>@sha256:[0-9a-f]{64})?")


def test_every_stage_starts_from_the_one_base_image_argument() -> None:
    # One ARG names the base, so a digest pinned there (or passed as --build-arg) pins
    # every stage; a FROM with an image of its own would escape it.
    froms = [line.split()[1] for line in DOCKERFILE.read_text().splitlines() if line.upper().startswith("FROM ")]
    assert froms and set(froms) == {"${PYTHON_IMAGE}"}, froms


def test_dockerfile_parser_joins_continuations_and_splits_stages() -> None:
    stages = parse_dockerfile(
        "# syntax=docker/dockerfile:1\nARG BASE=img:1\nFROM ${BASE} AS build\n"
        "RUN a \\\n  # a comment inside\n  && b\n\nFROM $BASE\nUSER 5\n"
    )
    assert [(s.base, s.name) for s in stages] == [("img:1", "build"), ("img:1", None)]
    assert stages[0].instructions == [("RUN", "a && b")]
    assert stages[1].all("USER") == ["5"]


def test_dockerfile_builds_in_one_stage_and_runs_from_another_on_the_same_base() -> None:
    stages = _stages()
    assert len(stages) >= 2
    build, final = stages[0], stages[-1]
    assert build.name
    assert build.base == final.base
    assert BASE_IMAGE.fullmatch(build.base), build.base
    installs = " ".join(build.all("RUN"))
    assert "gcc" in installs and "libc6-dev" in installs
    # The runtime stage takes the built virtualenv and installs no toolchain of its own.
    copies = final.all("COPY")
    assert any(c.startswith(f"--from={build.name} ") for c in copies)
    assert not any("apt-get install" in r or "pip install" in r for r in final.all("RUN"))


def test_build_stage_pip_installs_the_project_as_make_install_does() -> None:
    build = _stages()[0]
    docker = [spec for run in build.all("RUN") for spec in _pip_installs_of_the_project(run)]
    make = _pip_installs_of_the_project(_makefile_install_command())
    assert [spec for spec, _ in docker] == [spec for spec, _ in make] == ["."]
    # Editable would leave the image pointing at the build stage's source tree.
    assert docker == [(".", False)]


def test_the_images_install_contains_every_walstore_module() -> None:
    # The image installs a wheel (not editable), which holds only the packages pyproject.toml's
    # packages.find finds: a folder of modules without __init__.py works in the checkout
    # and is missing from the image.
    from setuptools import find_packages  # type: ignore[import-untyped]

    found = set(find_packages(where=str(ROOT), include=["walstore", "walstore.*"]))
    with_modules = {
        ".".join(d.relative_to(ROOT).parts)
        for d in [ROOT / "walstore", *(ROOT / "walstore").rglob("*")]
        if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py"))
    }
    assert with_modules <= found, f"not in the image (no __init__.py?): {sorted(with_modules - found)}"


def test_runtime_stage_runs_as_the_pods_non_root_user_owning_the_data_dir() -> None:
    final = _stages()[-1]
    users = final.all("USER")
    assert users, "the final stage must set USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, "a numeric uid lets Kubernetes verify runAsNonRoot"
    pod = _sts("event-store")["spec"]["template"]["spec"]["securityContext"]
    assert int(uid) == pod["runAsUser"]
    assert not gid or int(gid) == pod["runAsGroup"] == pod["fsGroup"]
    data_dir = config.Config().data_dir
    setup = " ".join(final.all("RUN"))
    assert f"mkdir -p {data_dir}" in setup
    assert re.search(rf"chown (-R )?{uid}(:\d+)? /data\b", setup)


def test_stopsignal_is_sigterm() -> None:
    assert _stages()[-1].all("STOPSIGNAL") == ["SIGTERM"]


def test_exposed_ports_are_the_programs_and_the_statefulsets() -> None:
    exposed = {int(p.split("/")[0]) for e in _stages()[-1].all("EXPOSE") for p in e.split()}
    defaults = config.Config()
    assert exposed == {defaults.http_port, defaults.peer_port}
    ports = {p["containerPort"] for p in _container(_sts("event-store"))["ports"]}
    # The probe port is off by default (the image's own HEALTHCHECK uses HTTP_PORT) and
    # only the kubelet reaches it at the pod's address, so EXPOSE need not name it.
    assert exposed == ports - {config.from_env(_pod_env(_sts("event-store"), 0)).probe_port}


def test_entrypoint_is_walstore_serve_in_exec_form() -> None:
    final = _stages()[-1]
    (entrypoint,) = final.all("ENTRYPOINT")
    # Exec form: the program is PID 1 and receives the SIGTERM itself, not a shell.
    assert json.loads(entrypoint) == ["walstore", "serve"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["walstore"] == "walstore.cli:main"
    for check in final.all("HEALTHCHECK"):
        assert "/health/live" in check


# --- .dockerignore ------------------------------------------------------------------------


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _ignored(path: str, rules: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    verdict = False
    for rule in rules:
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").strip("/")
        regex = _dockerignore_regex(pattern)
        if any(regex.fullmatch(p) for p in prefixes):
            verdict = not negate
    return verdict


def _dockerignore_rules() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_dockerignore_matcher_follows_last_match_wins() -> None:
    rules = ["*", "!src/", "**/__pycache__"]
    assert _ignored("README.md", rules)
    assert not _ignored("src/a.py", rules)
    assert _ignored("src/__pycache__/a.pyc", rules)


def _context_files() -> Iterator[tuple[str, bool]]:
    needed = ["setup.py", "pyproject.toml", "native/build_native.py", "walstore/config.py"]
    unwanted = [
        ".venv/bin/python",
        ".git/HEAD",
        "data/wal/00000000000000000001.seg",
        "tests/test_k8s_manifests.py",
        ".pytest_cache/v/cache/lastfailed",
        ".mypy_cache/3.11/walstore/config.data.json",
        "walstore/__pycache__/config.cpython-311.pyc",
        "walstore/_walstore_native.cpython-311-x86_64-linux-gnu.so",
        "walstore/_walstore_native.c",
        "native/walstore_native.o",
        "build/lib/walstore/config.py",
        "walstore.egg-info/PKG-INFO",
    ]
    yield from ((p, False) for p in needed)
    yield from ((p, True) for p in unwanted)


@pytest.mark.parametrize(("path", "ignored"), list(_context_files()))
def test_dockerignore_sends_only_what_the_build_needs(path: str, ignored: bool) -> None:
    assert _ignored(path, _dockerignore_rules()) is ignored
