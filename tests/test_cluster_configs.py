"""Cluster configs in cluster/ checked without a cloud, a Kubernetes API or the network.

Launcher YAMLs: the autoscaler schema shipped in the ray package, then Ray's own prepare/validate step (what
`ray up` runs before it touches a cloud). KubeRay manifests: the fields KubeRay requires. Consistency with the
project: the pinned Ray version, the real entrypoint module, per-trial resources that fit a worker type, the
concurrency the README promises. Safety: no 0.0.0.0/0 ingress, no public dashboard or tracking server; access
control (last section): Ray token auth on every node, MLflow behind a login, GCP's firewall admitting Ray and
MLflow by network tag, NetworkPolicies that admit only kdsearch's Ray pods.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import json
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml

from kdsearch.config.schema import ResourcesConfig
from kdsearch.run.sizing import (
    DRIVER_RESOURCE,
    DRIVER_UNITS_PER_TRIAL,
    bundles_per_node,
    fits,
    max_concurrent_trials,
    worker_bundle,
)

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
README = CLUSTER / "README.md"
LAUNCHERS = ["aws", "gcp"]
STORAGE_SCHEME = {"aws": "s3://", "gcp": "gs://"}
# The per-trial request cluster/README.md documents (and rayjob.yaml submits).
DOCUMENTED_TRIAL = ResourcesConfig(num_workers=2, cpus_per_trial=8, gpus_per_trial=2)


def _pinned_ray_version() -> str:
    match = re.search(r'"ray\[[^\]]*\]==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert match, "pyproject.toml must pin Ray exactly: ray[default,train,tune]==X.Y.Z"
    return match.group(1)


RAY_VERSION = _pinned_ray_version()
# rayproject/ray:<version>-py3XY-gpu (or -cuXYZ); the ray-ml images are no longer published.
RAY_IMAGE = re.compile(rf"^rayproject/ray:{re.escape(RAY_VERSION)}-py3\d+-(gpu|cu\d+)$")
# The project image built from cluster/kuberay/Dockerfile: <registry>/kdsearch:<ver>-ray<pin>-py3XY-gpu.
KDSEARCH_IMAGE = re.compile(rf"^[\w.\-/:]+/kdsearch:[\w.\-]+-ray{re.escape(RAY_VERSION)}-py3\d+-(gpu|cu\d+)$")
OPEN_CIDRS = ("0.0.0.0/0", "::/0")
PUBLIC_DASHBOARD = re.compile(r"--dashboard-host[= ]+['\"]?(0\.0\.0\.0|::)")


@functools.cache
def _load(path: Path) -> tuple[Any, ...]:
    return tuple(yaml.safe_load_all(path.read_text()))


def launcher(name: str) -> dict[str, Any]:
    return copy.deepcopy(_load(CLUSTER / f"{name}.yaml")[0])


def kuberay(name: str) -> list[dict[str, Any]]:
    return [copy.deepcopy(doc) for doc in _load(KUBERAY / f"{name}.yaml") if doc]


@functools.cache
def ray_schema() -> dict[str, Any]:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def worker_node_types(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    types = cfg["available_node_types"]
    return {name: t for name, t in types.items() if name != cfg["head_node_type"]}


def commands(cfg: dict[str, Any], *keys: str) -> str:
    return "\n".join(cmd for key in keys for cmd in cfg.get(key, []))


def mlflow_server_command(cfg: dict[str, Any]) -> str:
    found = [c for c in cfg["head_start_ray_commands"] if "mlflow server" in c]
    assert len(found) == 1, "the head must start exactly one MLflow tracking server"
    return found[0]


# ---------------------------------------------------------------- launcher YAMLs against Ray's own checks


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_matches_the_schema_shipped_in_ray(name: str) -> None:
    jsonschema.validate(launcher(name), ray_schema())


BREAKAGES = {
    "typo in a top-level key": lambda c: c.__setitem__("idle_timeout_minute", c.pop("idle_timeout_minutes")),
    "no provider": lambda c: c.pop("provider"),
    "fractional node resource": lambda c: c["available_node_types"]["head"]["resources"].update(CPU=0.5),
    "min_workers as a string": lambda c: next(iter(worker_node_types(c).values())).update(min_workers="0"),
    "unknown node-type key": lambda c: c["available_node_types"]["head"].update(max_worker=0),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_schema_rejects_a_broken_launcher(breakage: str) -> None:
    cfg = launcher("aws")
    BREAKAGES[breakage](cfg)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, ray_schema())


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_survives_ray_up_preparation(name: str) -> None:
    # What `ray up` does before any cloud call: merge the provider defaults, then validate.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(launcher(name)))

    broken = launcher(name)
    broken["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(broken))


# ---------------------------------------------------------------- launcher YAMLs against the project


@pytest.mark.parametrize("name", LAUNCHERS)
def test_head_hosts_the_drivers_and_no_training(name: str) -> None:
    cfg = launcher(name)
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head must advertise 0 CPU so no Train worker lands on it"
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get(DRIVER_RESOURCE, 0) >= DRIVER_UNITS_PER_TRIAL
    assert head.get("max_workers", 0) == 0

    # `ray start` must say the same as `resources` (the launcher also exports it as RAY_OVERRIDE_RESOURCES).
    start = commands(cfg, "head_start_ray_commands")
    assert "--num-cpus=0" in start
    custom = re.search(r"--resources='([^']*)'", start)
    assert custom, "the head's ray start must pass --resources='{...}'"
    assert json.loads(custom.group(1)) == {k: v for k, v in head["resources"].items() if k != "CPU"}

    for worker_name, worker in worker_node_types(cfg).items():
        assert DRIVER_RESOURCE not in worker["resources"], f"{worker_name} must not host trial drivers"


@pytest.mark.parametrize("name", LAUNCHERS)
def test_gpu_workers_autoscale_from_zero_with_a_spot_option(name: str) -> None:
    cfg = launcher(name)
    assert cfg["idle_timeout_minutes"] > 0
    workers = worker_node_types(cfg)
    assert workers, "no worker node types"
    for worker_name, worker in workers.items():
        assert worker.get("min_workers", 0) == 0, f"{worker_name}: GPU nodes must scale to zero"
        assert worker["max_workers"] >= 1, worker_name
        assert worker["resources"].get("GPU", 0) >= 1, f"{worker_name}: worker types carry the GPUs"

    def is_spot(node_config: dict[str, Any]) -> bool:
        market = node_config.get("InstanceMarketOptions", {}).get("MarketType")
        scheduling = node_config.get("scheduling", {})
        return (
            market == "spot"
            or bool(scheduling.get("preemptible"))
            or (scheduling.get("provisioningModel") == "SPOT")
        )

    kinds = {is_spot(w["node_config"]) for w in workers.values()}
    assert kinds == {True, False}, "offer both a spot/preemptible and an on-demand GPU type"


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_images_are_the_pinned_ray_gpu_image(name: str) -> None:
    docker = launcher(name)["docker"]
    images = [docker[k] for k in ("image", "head_image", "worker_image") if k in docker]
    assert images, "every node must run the pinned Ray image"
    for image in images:
        assert RAY_IMAGE.match(image), f"{image}: expected rayproject/ray:{RAY_VERSION}-py3XY-gpu"


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_installs_the_checkout_on_every_node(name: str) -> None:
    cfg = launcher(name)
    remote = [dst for dst, src in cfg["file_mounts"].items() if src in (".", "./")]
    assert remote, "file_mounts must copy the repository root (ray up runs from it)"
    assert re.search(rf"pip install .*-e {re.escape(remote[0])}\b", commands(cfg, "setup_commands"))


@pytest.mark.parametrize("name", LAUNCHERS)
def test_storage_and_tracking_reach_every_node(name: str) -> None:
    cfg = launcher(name)
    scheme = STORAGE_SCHEME[name]
    assert f"KDSEARCH_STORAGE={scheme}" in commands(cfg, "setup_commands")  # common: head and workers

    server = mlflow_server_command(cfg)
    assert "--backend-store-uri sqlite:///" in server
    assert f"--artifacts-destination {scheme}" in server
    port = re.search(r"--port (\d+)", server)
    assert port, "give the MLflow server an explicit --port"
    worker_uri = f"MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:{port.group(1)}"
    assert worker_uri in commands(cfg, "worker_setup_commands")
    assert re.search(rf"MLFLOW_TRACKING_URI=http://.+:{port.group(1)}", commands(cfg, "head_setup_commands"))

    # Train workers write checkpoints to the bucket: they need credentials of their own.
    for worker_name, worker in worker_node_types(cfg).items():
        node_config = worker["node_config"]
        if name == "aws":
            assert "IamInstanceProfile" in node_config, f"{worker_name}: Ray gives only the head a profile"
        else:
            scopes = [s for acct in node_config.get("serviceAccounts", []) for s in acct["scopes"]]
            assert any(s.endswith("/cloud-platform") or "devstorage" in s for s in scopes), worker_name


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_opens_nothing_to_the_internet(name: str) -> None:
    cfg = launcher(name)
    dumped = json.dumps(cfg)  # parsed YAML: comments may explain 0.0.0.0/0, settings may not use it
    for cidr in OPEN_CIDRS:
        assert cidr not in dumped
    every_command = "\n".join(c for key, cmds in cfg.items() if key.endswith("_commands") for c in cmds)
    assert not PUBLIC_DASHBOARD.search(every_command)
    assert "--dashboard-host=127.0.0.1" in commands(cfg, "head_start_ray_commands")
    host = re.search(r"--host[= ]+(\S+)", mlflow_server_command(cfg))
    assert host and host.group(1).strip("'\"") not in ("0.0.0.0", "::"), "bind MLflow to the private address"
    if name == "aws":
        # Without SecurityGroupIds Ray creates a group whose SSH rule is 0.0.0.0/0
        # (ray.autoscaler._private.aws.config._create_default_ssh_inbound_rules).
        for type_name, node_type in cfg["available_node_types"].items():
            assert node_type["node_config"].get("SecurityGroupIds"), f"{type_name}: set SecurityGroupIds"


# ---------------------------------------------------------------- KubeRay manifests


def cluster_specs() -> dict[str, dict[str, Any]]:
    (raycluster,) = kuberay("raycluster")
    (rayjob,) = kuberay("rayjob")
    return {"raycluster": raycluster["spec"], "rayjob": rayjob["spec"]["rayClusterSpec"]}


def pod_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def quantity(value: str | int | float) -> float:
    text = str(value)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def kuberay_worker_types(spec: dict[str, Any]) -> dict[str, dict[str, float]]:
    types = {}
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        types[group["groupName"]] = {
            "CPU": quantity(limits["cpu"]),
            "GPU": quantity(limits["nvidia.com/gpu"]),
        }
    return types


@pytest.mark.parametrize(("name", "kind"), [("raycluster", "RayCluster"), ("rayjob", "RayJob")])
def test_kuberay_manifest_has_the_required_fields(name: str, kind: str) -> None:
    (doc,) = kuberay(name)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == kind
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])


@pytest.mark.parametrize("name", ["raycluster", "rayjob"])
def test_kuberay_cluster_autoscales_gpu_workers(name: str) -> None:
    spec = cluster_specs()[name]
    assert spec["rayVersion"] == RAY_VERSION, "rayVersion must be the Ray version pinned in pyproject.toml"
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["template"]["spec"]["containers"]
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"]
        assert 0 == group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        assert group["maxReplicas"] >= 1
        resources = group["template"]["spec"]["containers"][0]["resources"]
        gpus = resources["limits"].get("nvidia.com/gpu")
        assert gpus is not None and quantity(gpus) >= 1, f"{group['groupName']}: set nvidia.com/gpu limits"
        # Kubernetes rejects GPU requests that differ from the limit.
        assert resources.get("requests", {}).get("nvidia.com/gpu", gpus) == gpus


@pytest.mark.parametrize("name", ["raycluster", "rayjob"])
def test_kuberay_head_hosts_the_drivers(name: str) -> None:
    params = cluster_specs()[name]["headGroupSpec"]["rayStartParams"]
    assert params.get("num-cpus") == "0", 'rayStartParams values are strings: num-cpus: "0"'
    # KubeRay passes the value verbatim to `ray start --resources=`: a quoted JSON object.
    custom = json.loads(json.loads(params["resources"]))
    assert custom.get(DRIVER_RESOURCE, 0) >= DRIVER_UNITS_PER_TRIAL
    assert not PUBLIC_DASHBOARD.search(f"--dashboard-host={params.get('dashboard-host', '')}")


def test_kuberay_images_and_dockerfile_use_the_pinned_ray() -> None:
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", dockerfile, re.MULTILINE)
    assert base and RAY_IMAGE.match(base.group(1)), f"Dockerfile: FROM rayproject/ray:{RAY_VERSION}-py3XY-gpu"
    base_tag = base.group(1).split(":", 1)[1]

    images = [c["image"] for spec in cluster_specs().values() for c in pod_containers(spec)]
    images += [
        c["image"]
        for doc in kuberay("mlflow")
        if doc["kind"] == "Deployment"
        for c in doc["spec"]["template"]["spec"]["containers"]
    ]
    for image in images:
        assert KDSEARCH_IMAGE.match(image), f"{image}: expected <registry>/kdsearch:<ver>-ray{base_tag}"
        assert image.endswith(f"-ray{base_tag}"), f"{image}: not built on the Dockerfile's base {base_tag}"


def test_kuberay_exposes_nothing_publicly() -> None:
    docs = kuberay("raycluster") + kuberay("rayjob") + kuberay("mlflow") + kuberay("networkpolicy")
    dumped = json.dumps(docs)
    for cidr in OPEN_CIDRS:
        assert cidr not in dumped
    assert not any(doc["kind"] == "Ingress" for doc in docs)
    for doc in docs:
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", doc["metadata"]["name"]
    for name, spec in cluster_specs().items():
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", name


def test_rayjob_runs_the_search_entrypoint() -> None:
    (job,) = kuberay("rayjob")
    spec = job["spec"]
    entrypoint = spec["entrypoint"]
    assert re.search(r"python -m kdsearch\.tune\b", entrypoint) and "space=ted" in entrypoint
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    # A RayJob cannot upload a local directory: the code must come from the image (or a remote URI).
    working_dir = runtime_env.get("working_dir")
    assert working_dir is None or "://" in working_dir
    tracking = re.search(r"tracking\.uri=(\S+)", entrypoint)
    assert tracking, "pass tracking.uri= so the search logs to the cluster's MLflow server"
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == tracking.group(1)
    assert re.search(r"storage_path=(s3|gs)://", entrypoint), "multi-node Tune/Train needs shared storage"


def test_entrypoint_module_and_space_exist_in_the_repo() -> None:
    (job,) = kuberay("rayjob")
    module = re.search(r"python -m ([\w.]+)", job["spec"]["entrypoint"])
    space = re.search(r"space=(\w+)", job["spec"]["entrypoint"])
    assert module and space
    path = ROOT / (module.group(1).replace(".", "/") + ".py")
    assert path.exists(), f"{module.group(1)} has no module file {path.relative_to(ROOT)}"
    assert (ROOT / "search_spaces" / f"{space.group(1)}.yaml").exists()


def _tune_commands() -> dict[str, list[str]]:
    """Every `python -m kdsearch.tune ...` the RayJob and the README run, as argv lists."""
    (job,) = kuberay("rayjob")
    lines = [job["spec"]["entrypoint"], *_readme_code_lines()]
    commands = {}
    for i, line in enumerate(lines):
        if "python -m kdsearch.tune" in line:
            args = shlex.split(line.split("python -m kdsearch.tune", 1)[1].split("#")[0])
            commands["rayjob" if i == 0 else f"readme line {i}"] = [
                a.replace("$MLFLOW_URI", "http://10.0.0.2:5000") for a in args
            ]
    return commands


def test_documented_commands_parse_with_the_real_cli() -> None:
    # The real argument parser (no Ray, no tracking server): every key the docs use must exist.
    from kdsearch.search.settings import parse_search_args

    commands = _tune_commands()
    assert "rayjob" in commands and len(commands) >= 3
    for label, argv in commands.items():
        settings, space = parse_search_args(argv)
        assert settings.space == "ted", label
        assert urlparse(settings.tracking_uri).scheme == "http", (
            f"{label}: log to the cluster's MLflow server"
        )
        assert space.budget.max_concurrent_trials, f"{label}: set budget.max_concurrent_trials (0-CPU head)"


def allowed_host(allowed: list[str], host: str) -> bool:
    # The rule of mlflow.server.security_utils.is_allowed_host_header (importing it costs ~3 s).
    return any(fnmatch.fnmatch(host, a) if "*" in a else host == a for a in allowed)


def test_mlflow_server_accepts_the_hosts_that_call_it() -> None:
    docs = {doc["kind"]: doc for doc in kuberay("mlflow")}
    (container,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    flags = dict(arg.split("=", 1) for arg in container["command"] if arg.startswith("--") and "=" in arg)
    allowed = flags["--allowed-hosts"].split(",")
    service = docs["Service"]["metadata"]["name"]

    uris = {
        env["value"]
        for spec in cluster_specs().values()
        for c in pod_containers(spec)
        for env in c.get("env", [])
        if env["name"] == "MLFLOW_TRACKING_URI"
    }
    assert uris, "the Ray pods must be told where MLflow is"
    for uri in uris:
        url = urlparse(uri)
        assert url.hostname == service and str(url.port) == flags["--port"]
        # Without --allowed-hosts MLflow answers a Service-name Host header with 403 (DNS-rebinding guard).
        assert allowed_host(allowed, url.netloc)
    assert allowed_host(allowed, f"localhost:{flags['--port']}")  # kubectl port-forward
    assert not allowed_host(allowed, "evil.example.com")


# ---------------------------------------------------------------- sizing: trials fit, README numbers hold


def _overrides_to_resources(command: str) -> ResourcesConfig | None:
    found = dict(re.findall(r"resources\.(\w+)=([\d.]+)", command))
    if not found:
        return None
    kwargs: dict[str, Any] = {k: int(v) if k == "num_workers" else float(v) for k, v in found.items()}
    return ResourcesConfig(**kwargs)


def _readme_code_lines() -> list[str]:
    """Lines of the README's fenced code blocks, shell line continuations joined."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", README.read_text(), re.MULTILINE | re.DOTALL)
    return [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]


def _readme_trial_requests() -> list[ResourcesConfig]:
    requests = [_overrides_to_resources(line) for line in _readme_code_lines() if "kdsearch.tune" in line]
    return [r for r in requests if r is not None]


def _space_requests() -> list[tuple[str, ResourcesConfig]]:
    # search_spaces/*.yaml may not exist yet, or may leave base.resources to the defaults
    out = []
    for path in sorted((ROOT / "search_spaces").glob("*.yaml")):
        resources = (yaml.safe_load(path.read_text()).get("base") or {}).get("resources")
        out.append((f"space:{path.stem}", ResourcesConfig(**(resources or {}))))
    return out


def trial_requests() -> list[tuple[str, ResourcesConfig]]:
    (job,) = kuberay("rayjob")
    job_request = _overrides_to_resources(job["spec"]["entrypoint"])
    assert job_request is not None, "rayjob.yaml's entrypoint must set resources.* for a GPU cluster"
    readme = [(f"readme:{i}", r) for i, r in enumerate(_readme_trial_requests())]
    return [("documented", DOCUMENTED_TRIAL), ("rayjob", job_request), *readme, *_space_requests()]


def all_worker_types() -> dict[str, dict[str, dict[str, float]]]:
    types = {
        name: {n: t["resources"] for n, t in worker_node_types(launcher(name)).items()} for name in LAUNCHERS
    }
    types.update({f"kuberay-{n}": kuberay_worker_types(spec) for n, spec in cluster_specs().items()})
    return types


def test_readme_documents_the_trial_the_tests_size_for() -> None:
    assert DOCUMENTED_TRIAL in _readme_trial_requests(), (
        "cluster/README.md must show `python -m kdsearch.tune ... resources.num_workers=2 "
        "resources.gpus_per_trial=2 resources.cpus_per_trial=8`"
    )
    assert dict(trial_requests())["rayjob"] == DOCUMENTED_TRIAL


@pytest.mark.parametrize("cluster", ["aws", "gcp", "kuberay-raycluster", "kuberay-rayjob"])
def test_every_trial_request_fits_a_worker_type(cluster: str) -> None:
    types = all_worker_types()[cluster]
    for label, r in trial_requests():
        bundle = worker_bundle(r.num_workers, r.cpus_per_trial, r.gpus_per_trial)
        assert fits(types, r.num_workers, r.cpus_per_trial, r.gpus_per_trial), (
            f"{label}: one Train worker needs {bundle}, more than any worker type of {cluster} has: {types}"
        )


def _max_scale(cluster: str) -> list[tuple[dict[str, float], int]]:
    if cluster.startswith("kuberay-"):
        spec = cluster_specs()[cluster.removeprefix("kuberay-")]
        types = kuberay_worker_types(spec)
        return [(types[g["groupName"]], g["maxReplicas"]) for g in spec["workerGroupSpecs"]]
    return [(t["resources"], t["max_workers"]) for t in worker_node_types(launcher(cluster)).values()]


def _readme_concurrency_table() -> dict[str, int]:
    row = re.compile(r"^\|\s*`cluster/([\w/]+)\.yaml`\s*\|.*\|\s*(\d+)\s*\|\s*$", re.MULTILINE)
    rows = row.findall(README.read_text())
    return {path: int(n) for path, n in rows}


def _trials_at_max_scale(cluster: str, r: ResourcesConfig) -> int:
    """Trials of shape `r` that run at once with every worker type at max_workers/maxReplicas."""
    bundle = worker_bundle(r.num_workers, r.cpus_per_trial, r.gpus_per_trial)
    nodes = _max_scale(cluster)
    packed = sum(bundles_per_node(node, bundle) * count for node, count in nodes) // r.num_workers
    totals: dict[str, float] = {}
    for node, count in nodes:
        for key, amount in node.items():
            totals[key] = totals.get(key, 0) + amount * count
    # totals ignore packing, so they can only promise more
    assert max_concurrent_trials(totals, r.num_workers, r.cpus_per_trial, r.gpus_per_trial) >= packed
    return packed


@pytest.mark.parametrize(
    ("cluster", "row"), [("aws", "aws"), ("gcp", "gcp"), ("kuberay-raycluster", "kuberay/raycluster")]
)
def test_readme_concurrency_matches_the_config(cluster: str, row: str) -> None:
    packed = _trials_at_max_scale(cluster, DOCUMENTED_TRIAL)
    table = _readme_concurrency_table()
    assert row in table, f"cluster/README.md's concurrency table has no row for cluster/{row}.yaml"
    assert table[row] == packed, f"cluster/{row}.yaml runs {packed} documented trials at once at max scale"


def test_rayjob_asks_for_no_more_concurrent_trials_than_its_cluster_holds() -> None:
    (job,) = kuberay("rayjob")
    entrypoint = job["spec"]["entrypoint"]
    asked = re.search(r"budget\.max_concurrent_trials=(\d+)", entrypoint)
    # kdsearch.tune sizes concurrency from the cluster it sees at start: a 0-CPU head, so 1 trial at a time.
    assert asked, "set budget.max_concurrent_trials in the RayJob entrypoint"
    request = _overrides_to_resources(entrypoint)
    assert request is not None
    capacity = _trials_at_max_scale("kuberay-rayjob", request)
    # beyond capacity a trial's Train workers wait for GPUs until RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S
    assert 1 <= int(asked.group(1)) <= capacity


def test_every_placeholder_is_documented() -> None:
    files = [*CLUSTER.glob("*.yaml"), *KUBERAY.glob("*.yaml"), KUBERAY / "Dockerfile"]
    placeholders = {p for f in files for p in re.findall(r"YOUR_[A-Z0-9_]+", f.read_text())}
    readme = README.read_text()
    missing = sorted(p for p in placeholders if p not in readme)
    assert not missing, f"cluster/README.md must say what to put in {missing}"


def test_readme_covers_the_whole_lifecycle() -> None:
    readme = README.read_text()
    steps = ["ray up", "ray job submit", "kdsearch.leaderboard", "resume=true", "ray down", "ray dashboard"]
    for step in [*steps, "kubectl apply", "RAY_AUTH", DRIVER_RESOURCE]:
        assert step in readme, f"cluster/README.md does not mention {step!r}"


# ---------------------------------------------------------------- access control: tokens, logins, firewalls

# Where Ray reads the token when RAY_AUTH_MODE=token and neither RAY_AUTH_TOKEN nor RAY_AUTH_TOKEN_PATH is set
# (ray._private.authentication.authentication_token_setup._get_default_token_path).
RAY_TOKEN_PATH = "~/.ray/auth_token"
# `mlflow server --app-name basic-auth` imports Flask-WTF (the `auth` extra) or refuses to start.
MLFLOW_AUTH_PACKAGE = re.compile(r"pip install .*(mlflow\[auth\]|flask-wtf)", re.IGNORECASE)
SECRET_VARS = ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY",
               "MLFLOW_TRACKING_PASSWORD", "RAY_AUTH_TOKEN")


def every_command(cfg: dict[str, Any]) -> str:
    return "\n".join(c for key, cmds in cfg.items() if key.endswith("_commands") for c in cmds)


def outside_checkout(source: str) -> bool:
    """A file_mounts source in the user's home or an absolute path: a relative one is read from the checkout."""
    return source.startswith(("~/", "/"))


@pytest.mark.parametrize("name", LAUNCHERS)
def test_every_launcher_node_starts_ray_with_token_auth(name: str) -> None:
    cfg = launcher(name)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts, f"{key} starts no Ray"
        for command in starts:
            # the variable must prefix `ray start` itself, not an earlier command of the same line
            assert re.search(r"(^|[;&|]\s*)(\w+=\S*\s+)*RAY_AUTH_MODE=token\s+(\w+=\S*\s+)*ray start\b", command), (
                f"{key}: run `RAY_AUTH_MODE=token ray start ...` (a node without it cannot join)")
    assert not re.search(r"RAY_AUTH_MODE=(?!token\b)", every_command(cfg)), "token auth switched off somewhere"
    # Ray's CLI in a node's shell (`ray status`) is refused by the GCS unless it too is in token mode
    assert "export RAY_AUTH_MODE=token" in commands(cfg, "setup_commands")
    # file_mounts reach head and workers; the token must not come from (and be committed in) the checkout
    source = cfg["file_mounts"].get(RAY_TOKEN_PATH)
    assert source and outside_checkout(source), f"file_mounts must put the cluster's token at {RAY_TOKEN_PATH}"


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_mlflow_server_requires_a_login_every_node_has(name: str) -> None:
    cfg = launcher(name)
    server = mlflow_server_command(cfg)
    assert re.search(r"mlflow server .*--app-name[= ]basic-auth\b", server), "run MLflow's basic-auth app"
    assert MLFLOW_AUTH_PACKAGE.search(commands(cfg, "head_setup_commands")), "install mlflow[auth] on the head"
    for var in SECRET_VARS[:3]:
        assert re.search(rf"\b{var}=", server), f"the server needs {var}"
    # no secret is written into the config: each comes from a variable or a file on the node
    for var, value in re.findall(rf"\b({'|'.join(SECRET_VARS)})=(\S+)", every_command(cfg)):
        assert value.startswith(('"$', "$")), f"{var}={value}: a literal secret in cluster/{name}.yaml"
    # the login file reaches every node from outside the checkout, and every shell (`ray start`, the server) loads it
    (login,) = [dst for dst in cfg["file_mounts"] if dst.endswith("mlflow.env")]
    assert outside_checkout(cfg["file_mounts"][login])
    assert f". {login}" in commands(cfg, "setup_commands") and f". {login}" in server


def _gcloud_creates(what: str) -> dict[str, dict[str, str]]:
    """The README's `gcloud compute <what> create NAME --flag value ...` commands: NAME -> flags."""
    created = {}
    for line in _readme_code_lines():
        if f"gcloud compute {what} create " not in line:
            continue
        argv = shlex.split(line.split("#")[0])
        flags, i = {}, argv.index("create") + 2
        while i < len(argv):
            key, _, value = argv[i].partition("=")
            if not value and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            flags[key] = value
            i += 1
        created[argv[argv.index("create") + 1]] = flags
    return created


def allows(rules: str, port: int) -> bool:
    """Whether a gcloud `--rules` value (`tcp,icmp`, `tcp:22`, `tcp:8000-9000`, `all`) admits TCP `port`."""
    for rule in rules.split(","):
        protocol, _, ports = rule.partition(":")
        low, _, high = ports.partition("-")
        if protocol in ("tcp", "all") and (not ports or int(low) <= port <= int(high or low)):
            return True
    return False


def launcher_ports(cfg: dict[str, Any]) -> dict[str, int]:
    """The TCP ports the head's own commands open to the other nodes."""
    head = commands(cfg, "head_start_ray_commands")
    found = {what: re.search(pattern, head) for what, pattern in
             [("GCS", r"--port=(\d+)"), ("object manager", r"--object-manager-port=(\d+)"),
              ("MLflow", r"mlflow server .*--port[= ](\d+)")]}
    assert all(found.values()), found
    return {what: int(m.group(1)) for what, m in found.items() if m}


def gcp_node_network(cfg: dict[str, Any]) -> str:
    """The one network every node of gcp.yaml is on; it must be the one cluster/README.md creates."""
    networks, subnets = _gcloud_creates("networks"), _gcloud_creates("networks subnets")
    used = set()
    for type_name, node_type in cfg["available_node_types"].items():
        interfaces = node_type["node_config"].get("networkInterfaces")
        # without networkInterfaces Ray puts the node on the project's first subnet (gcp/config.py _configure_subnet)
        assert interfaces, f"{type_name}: set networkInterfaces"
        for interface in interfaces:
            subnet = interface["subnetwork"].rsplit("/subnetworks/", 1)[-1]
            assert subnet in subnets, f"{type_name}: subnet {subnet} is not one that cluster/README.md creates"
            assert "network" not in interface, f"{type_name}: the subnetwork alone names the network"
            used.add(subnets[subnet]["--network"])
    (network,) = used
    assert network in networks and network != "default", "a network of the cluster's own, created in the README"
    return network


def only_ssh(rules: str) -> bool:
    return all(rule == "tcp:22" or not rule.startswith(("tcp", "all")) for rule in rules.split(","))


def test_gcp_firewall_admits_ray_and_mlflow_only_from_the_cluster_nodes() -> None:
    cfg = launcher("gcp")
    network = gcp_node_network(cfg)
    tags = {name: set(t["node_config"]["tags"]["items"]) for name, t in cfg["available_node_types"].items()}
    head_only = tags[cfg["head_node_type"]] - set.union(*(tags[w] for w in worker_node_types(cfg)))
    every_node = set.intersection(*tags.values())
    rules = {name: rule for name, rule in _gcloud_creates("firewall-rules").items()
             if rule.get("--direction", "INGRESS") == "INGRESS" and rule.get("--action", "allow") == "allow"}
    assert rules, "cluster/README.md must create the cluster's firewall rules"
    for rule_name, rule in rules.items():
        assert rule["--network"] == network, f"{rule_name}: not on the nodes' network"
        targets = set(rule.get("--target-tags", "").split(","))  # without them it covers every VM of the network
        sources = rule.get("--source-ranges", "")
        assert not {"0.0.0.0/0", "10.128.0.0/9"} & set(sources.split(",")), f"{rule_name}: {sources}"
        if only_ssh(rule["--rules"]):
            assert sources and targets <= head_only, f"{rule_name}: SSH from your address, to the head only"
        else:
            # every other TCP port (Ray's, MLflow's, the workers'): from the nodes' own tag, never an address range
            assert not sources and set(rule["--source-tags"].split(",")) <= every_node, rule_name
            assert targets <= set.union(*tags.values()), rule_name
    for what, port in {**launcher_ports(cfg), "SSH head to worker": 22}.items():
        admitted = [r for r in rules.values() if "--source-tags" in r and allows(r["--rules"], port)]
        assert any(every_node & set(r["--target-tags"].split(",")) for r in admitted), f"{what} ({port}) is shut"


@pytest.mark.parametrize("name", ["raycluster", "rayjob"])
def test_kuberay_gives_every_ray_container_the_token(name: str) -> None:
    spec = cluster_specs()[name]
    # KubeRay generates the token and sets RAY_AUTH_MODE/RAY_AUTH_TOKEN on head, workers, autoscaler, submitter
    assert spec.get("authOptions", {}).get("mode") == "token"
    assert not spec["authOptions"].get("enableK8sTokenAuth"), "K8s-delegated auth: RayCluster only (KubeRay 1.7)"
    for container in pod_containers(spec):
        # KubeRay leaves alone a container that sets RAY_AUTH_MODE itself (common/pod.go SetContainerTokenAuthEnvVars)
        own = {e["name"] for e in container.get("env", [])} & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
        assert not own, f"{container['name']} sets {own}: leave them to authOptions"


def secret_ref(env: dict[str, Any]) -> tuple[str, str]:
    ref = env.get("valueFrom", {}).get("secretKeyRef")
    assert ref and "value" not in env, f"{env['name']} must come from a Secret, not the manifest"
    return ref["name"], ref["key"]


def test_kuberay_mlflow_requires_the_login_the_ray_pods_have() -> None:
    (deployment,) = [doc for doc in kuberay("mlflow") if doc["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert "--app-name=basic-auth" in container["command"]
    env = {e["name"]: e for e in container["env"]}
    secret_ref(env["MLFLOW_FLASK_SERVER_SECRET_KEY"])
    admin = (secret_ref(env["MLFLOW_AUTH_ADMIN_USERNAME"]), secret_ref(env["MLFLOW_AUTH_ADMIN_PASSWORD"]))
    # basic-auth keeps its users in ./basic_auth.db: outside the volume, a restart would forget them
    assert container.get("workingDir") in {m["mountPath"] for m in container["volumeMounts"]}
    for spec in cluster_specs().values():
        for c in pod_containers(spec):
            env = {e["name"]: e for e in c["env"]}
            login = (secret_ref(env["MLFLOW_TRACKING_USERNAME"]), secret_ref(env["MLFLOW_TRACKING_PASSWORD"]))
            assert login == admin, f"{c['name']} must log in as the server's admin"
    dockerfile = (KUBERAY / "Dockerfile").read_text().replace("\\\n", " ")
    assert MLFLOW_AUTH_PACKAGE.search(dockerfile), "the image must install mlflow[auth]"


# KubeRay's labels on every Ray pod (common/pod.go labelPod), and those of the clients it runs beside them.
KUBERAY_OPERATOR = {"app.kubernetes.io/name": "kuberay-operator"}  # the Helm chart's pod label


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels is modelled here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def admitted(target: dict[str, str], source: dict[str, str], port: int, *, same_namespace: bool = True) -> bool:
    """Whether the NetworkPolicies in networkpolicy.yaml let a pod labelled `source` reach `target`:`port`."""
    policies = [doc["spec"] for doc in kuberay("networkpolicy") if doc["kind"] == "NetworkPolicy"]
    isolating = [p for p in policies if "Ingress" in p["policyTypes"] and selects(p["podSelector"], target)]
    if not isolating:
        return True  # a pod no policy selects takes everything

    def peer_matches(peer: dict[str, Any]) -> bool:
        if "ipBlock" in peer:
            return True  # an address range admits pods too: count it as admitting this one
        in_namespace = "namespaceSelector" in peer or same_namespace  # only `namespaceSelector: {}` is used
        return in_namespace and selects(peer.get("podSelector", {}), source)

    def port_matches(entry: dict[str, Any]) -> bool:
        assert isinstance(entry.get("port", 0), int), "give ports by number: a name is not modelled here"
        return entry.get("port") in (None, port)

    # `from` or `ports` absent or empty: every source, every port
    return any(
        (not rule.get("from") or any(peer_matches(peer) for peer in rule["from"]))
        and (not rule.get("ports") or any(port_matches(entry) for entry in rule["ports"]))
        for policy in isolating
        for rule in policy.get("ingress", [])
    )


def ray_pods() -> dict[str, dict[str, str]]:
    """Labels of every kdsearch Ray pod: its template's, and what KubeRay adds."""
    pods = {}
    for name, spec in cluster_specs().items():
        groups = [("head", spec["headGroupSpec"])] + [("worker", g) for g in spec["workerGroupSpecs"]]
        for node_type, group in groups:
            labels = group["template"].get("metadata", {}).get("labels", {})
            pods[f"{name}:{node_type}:{group.get('groupName', 'head')}"] = {
                **labels, "ray.io/is-ray-node": "yes", "ray.io/node-type": node_type}
    return pods


def test_networkpolicies_admit_only_kdsearch_ray_pods_to_ray_and_mlflow() -> None:
    (job,) = kuberay("rayjob")
    (mlflow_service,) = [doc for doc in kuberay("mlflow") if doc["kind"] == "Service"]
    mlflow_port = mlflow_service["spec"]["ports"][0]["targetPort"]
    (mlflow,) = [d for d in kuberay("mlflow") if d["kind"] == "Deployment"]
    mlflow_pod = mlflow["spec"]["template"]["metadata"]["labels"]
    pods = ray_pods()
    heads = {name: labels for name, labels in pods.items() if labels["ray.io/node-type"] == "head"}
    submitter = {"ray.io/originated-from-crd": "RayJob", "ray.io/originated-from-cr-name": job["metadata"]["name"]}
    strangers = {
        "a pod of the namespace": {"app": "other"},
        "another Ray cluster": {"ray.io/is-ray-node": "yes", "ray.io/node-type": "head", "ray.io/cluster": "x"},
        "the MLflow pod": mlflow_pod,
    }
    for ray_pod in pods.values():  # the cluster's own traffic: GCS, raylets, object managers, workers' ports
        for target in pods.values():
            for port in (6379, 8265, 8076, 10001, 23456):
                assert admitted(target, ray_pod, port)
        assert admitted(mlflow_pod, ray_pod, mlflow_port)
        assert not admitted(ray_pod, ray_pod, 6379, same_namespace=False), "only this namespace's Ray pods"
    for name, target in pods.items():
        for stranger, labels in strangers.items():
            for port in (6379, 8265, 10001, 23456):
                assert not admitted(target, labels, port), f"{stranger} reaches {name}:{port}"
        # KubeRay's clients reach the Jobs API on the head, and nothing else
        for client, labels, other_ns in (("operator", KUBERAY_OPERATOR, True), ("submitter", submitter, False)):
            assert admitted(target, labels, 8265, same_namespace=not other_ns) == (name in heads), (client, name)
            assert not admitted(target, labels, 6379, same_namespace=not other_ns), (client, name)
            assert not admitted(mlflow_pod, labels, mlflow_port, same_namespace=not other_ns), client
    for stranger, labels in strangers.items():
        if labels is not mlflow_pod:
            assert not admitted(mlflow_pod, labels, mlflow_port), f"{stranger} reaches MLflow"


def secret_refs(node: Any) -> set[tuple[str, str]]:
    """Every (Secret, key) a manifest reads through secretKeyRef."""
    if isinstance(node, list):
        return set().union(*map(secret_refs, node)) if node else set()
    if not isinstance(node, dict):
        return set()
    found = {(node["secretKeyRef"]["name"], node["secretKeyRef"]["key"])} if "secretKeyRef" in node else set()
    return found.union(*map(secret_refs, node.values()))


def test_readme_says_how_to_make_every_secret_the_configs_read() -> None:
    readme = "\n".join(_readme_code_lines())
    # launcher: each secret file that file_mounts copies from your machine is created by a documented command
    for name in LAUNCHERS:
        for source in launcher(name)["file_mounts"].values():
            if outside_checkout(source):
                assert re.search(rf">\s*{re.escape(source)}\b", readme), f"README must create {source}"
    # KubeRay: `kubectl create secret generic <name>` with every key the manifests read
    refs = secret_refs(kuberay("mlflow") + kuberay("raycluster") + kuberay("rayjob"))
    assert refs
    for secret, key in refs:
        created = re.search(rf"kubectl create secret generic {secret}\b(.*)", readme)
        assert created and f"--from-literal={key}=" in created.group(1), f"README must create {secret}/{key}"
