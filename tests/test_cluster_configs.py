"""Cluster configs in cluster/ checked without a cloud, a Kubernetes API or the network.

Launcher YAMLs: the autoscaler schema shipped in the ray package, then Ray's own prepare/validate step (what
`ray up` runs before it touches a cloud). KubeRay manifests: the fields KubeRay requires. Consistency with the
project: the pinned Ray version, the real entrypoint module, per-trial resources that fit a worker type, the
concurrency the README promises. Safety: no 0.0.0.0/0 ingress, no public dashboard or tracking server.
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

from kdsearch.config import ResourcesConfig
from kdsearch.sizing import (
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
    docs = kuberay("raycluster") + kuberay("rayjob") + kuberay("mlflow")
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
    if not path.exists() and module.group(1) == "kdsearch.tune":
        pytest.skip("kdsearch/tune.py is not written yet (issue 4 lands before the search driver)")
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
    from kdsearch.search import parse_search_args

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
