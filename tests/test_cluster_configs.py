"""Static checks of everything under cluster/ (no Ray cluster is started, nothing leaves this machine).

- cluster/aws.yaml and cluster/gcp.yaml validate against the JSON schema Ray ships for cluster launcher
  configs (and pass Ray's own prepare_config/validate_config); broken copies fail, so the check can fail.
- The KubeRay manifests are ray.io/v1, run `dyrep-ray train` on an existing experiment file, ask for GPUs,
  and use images whose Ray version equals the installed Ray and `rayVersion`.
- Token authentication is on everywhere; nothing that looks like a secret is written in any file.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pathspec
import pytest
import ray
import ray.autoscaler._private.util as autoscaler_util
import yaml
from ray.runtime_env import RuntimeEnv

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER_FILES = ["aws.yaml", "gcp.yaml"]
KUBERAY_FILES = ["rayjob.yaml", "raycluster.yaml"]

RAY_VERSION = re.match(r"\d+\.\d+\.\d+", ray.__version__).group(0)


# ----------------------------------------------------------------------------------------------- helpers
def _load(name: str) -> Any:
    return yaml.safe_load((CLUSTER / name).read_text())


def _load_all(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


def _kuberay_object(name: str) -> dict:
    docs = [d for d in _load_all(name) if d.get("kind") in ("RayJob", "RayCluster")]
    assert len(docs) == 1, f"{name}: expected exactly one RayJob/RayCluster document"
    return docs[0]


def _cluster_spec(obj: dict) -> dict:
    return obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]


def _ray_schema() -> dict:
    path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


def _image_ray_version(image: str) -> str:
    """'rayproject/ray:2.60.0-py311-gpu' -> '2.60.0'; the tag must start with the Ray version."""
    name, sep, tag = image.rpartition(":")
    assert sep and name and "/" not in tag, f"image {image!r} has no tag (pin the Ray version)"
    m = re.match(r"(\d+\.\d+\.\d+)(?:[-.]|$)", tag)
    assert m, f"image tag {tag!r} of {image!r} does not start with a Ray version"
    return m.group(1)


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """Yield (path, key, value) for every mapping entry of a parsed YAML tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield path, k, v
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def _containers(pod_template: dict, init: bool = False) -> list[dict]:
    spec = pod_template["spec"]
    return spec["containers"] + (spec.get("initContainers", []) if init else [])


# ----------------------------------------------------------------------------------- secret detection
_PLACEHOLDER = re.compile(r"^<[A-Z0-9_]+>$")
_SECRET_KEY = re.compile(
    r"(?i)(^|[_.-])(token|password|passwd|secret|secret_access_key|access_key_id|api_key|private_key|credentials?)$"
)
_SECRET_ENV_NAME = re.compile(r"(?i)(token|secret|password|passwd|access_key|api_key|credential)")
_TEXT_RULES = [
    ("AWS access key id", re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("private key block", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")),
    ("hex token (Ray tokens are 32 hex chars)", re.compile(r"\b[0-9a-fA-F]{32,}\b")),
    ("real AWS account id in an ARN", re.compile(r"arn:aws[\w-]*:[\w-]+:[\w-]*:\d{12}:")),
    ("GCP service-account key", re.compile(r'"private_key(_id)?"\s*:')),
    # `token: abc...`, `auth_token=abc...`, `password: ...` with a literal value. Allowed values: a
    # <PLACEHOLDER>, a shell expansion ($VAR, "$(cmd)"), a template ({{...}}) or nothing.
    (
        "literal value for a token/password/secret",
        re.compile(
            r"(?im)\b[\w.-]*(?:token|password|passwd|secret)\s*[:=]\s*[\"']?(?![\"'$<{]|\s|$)[^\s\"',}]{6,}"
        ),
    ),
]


def _secret_findings_in_text(text: str) -> list[str]:
    return [f"{what}: {m.group(0)!r}" for what, rx in _TEXT_RULES for m in rx.finditer(text)]


def _secret_findings_in_tree(tree: Any) -> list[str]:
    found = []
    for path, key, value in _walk(tree):
        if isinstance(key, str) and _SECRET_KEY.search(key) and isinstance(value, (str, int, float)):
            if str(value).strip() and not _PLACEHOLDER.match(str(value)):
                found.append(f"{path}.{key} has a literal value")
        # Kubernetes env entries: secret-looking names must come from valueFrom (a Secret), not value.
        if key == "env" and isinstance(value, list):
            for item in value:
                if (
                    isinstance(item, dict)
                    and _SECRET_ENV_NAME.search(str(item.get("name", "")))
                    and "value" in item
                ):
                    found.append(f"{path}.env {item['name']} has a literal value (use valueFrom)")
    return found


def _cluster_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- cluster launcher (ray up)
@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_config_validates_against_ray_schema(name):
    jsonschema.validate(_load(name), _ray_schema())


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_config_passes_ray_validate_config(name):
    prepared = autoscaler_util.prepare_config(copy.deepcopy(_load(name)))  # merges Ray's provider defaults
    autoscaler_util.validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def _misspelled_top_level_key(cfg):
    cfg["max_worker"] = cfg.pop("max_workers")


def _wrong_type(cfg):
    cfg["max_workers"] = "four"


def _node_type_without_node_config(cfg):
    next(iter(cfg["available_node_types"].values())).pop("node_config")


def _unknown_docker_key(cfg):
    cfg["docker"]["imgae"] = cfg["docker"]["worker_image"]


@pytest.mark.parametrize("name", LAUNCHER_FILES)
@pytest.mark.parametrize(
    "breakage",
    [_misspelled_top_level_key, _wrong_type, _node_type_without_node_config, _unknown_docker_key],
)
def test_broken_launcher_config_fails_validation(name, breakage):
    cfg = _load(name)
    breakage(cfg)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, _ray_schema())


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_config_has_cpu_head_and_autoscaling_gpu_workers(name):
    cfg = _load(name)
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    workers = {k: v for k, v in types.items() if k != head}
    assert workers, "no worker node type"
    assert types[head]["resources"].get("GPU", 0) == 0, "the head should be a CPU node"
    for wname, wtype in workers.items():
        assert wtype.get("min_workers", 0) == 0, f"{wname}: GPU workers should scale down to 0"
        assert wtype.get("max_workers", cfg["max_workers"]) >= 1
    assert cfg["max_workers"] >= 1


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_images_pin_the_installed_ray_version(name):
    docker = _load(name)["docker"]
    images = [docker[k] for k in ("image", "head_image", "worker_image") if k in docker]
    assert images
    for image in images:
        assert image.startswith("rayproject/ray"), image
        assert _image_ray_version(image) == RAY_VERSION, image
    assert any(i.endswith("-gpu") for i in images), "GPU workers need a -gpu image"


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_token_auth_and_project_install(name):
    cfg = _load(name)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts, key
        for cmd in starts:
            assert "RAY_AUTH_MODE=token" in cmd, f"{key}: token auth not enabled: {cmd}"
    assert any("RAY_AUTH_MODE=token" in o for o in cfg["docker"]["run_options"])
    # The project checkout is synced and pip-installed on every node.
    assert cfg["file_mounts"].get("/home/ray/dyrep-ray") == "."
    setup = " ".join(cfg["setup_commands"])
    assert "pip install" in setup and "-e /home/ray/dyrep-ray" in setup
    assert f"ray[default,train,tune]=={RAY_VERSION}" in setup
    # The token comes from a file outside the repository, installed as Ray's default token file.
    token_sources = [local for local in cfg["file_mounts"].values() if "auth" in local]
    assert token_sources and all(src.startswith("~") for src in token_sources)
    assert "~/.ray/auth_token" in setup


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_excludes_keep_the_package(name):
    """rsync_exclude must skip data/ and runs/ at the top only, never the dyrep_ray/data package."""
    spec = _pathspec(_load(name)["rsync_exclude"])
    assert spec.match_file("data/cifar-10-batches-py/data_batch_1")
    assert spec.match_file("runs/x/metrics.jsonl")
    for pkg_file in _package_files():
        assert not spec.match_file(pkg_file), f"{name}: rsync_exclude drops {pkg_file}"


def test_gcp_gpu_workers_have_accelerators_and_terminate_on_maintenance():
    cfg = _load("gcp.yaml")
    assert cfg["provider"]["project_id"], "project_id must be set (Ray's default is null)"
    gpu_types = [
        t for t in cfg["available_node_types"].values() if t["node_config"].get("guestAccelerators")
    ]
    assert gpu_types, "no node type with guestAccelerators"
    for t in gpu_types:
        nc = t["node_config"]
        assert nc["guestAccelerators"][0]["acceleratorCount"] == t["resources"]["GPU"]
        # The Compute API takes `scheduling` as an object.
        assert nc["scheduling"]["onHostMaintenance"] == "TERMINATE"


# ------------------------------------------------------------------------------------------- KubeRay
@pytest.mark.parametrize("name", KUBERAY_FILES)
def test_kuberay_manifest_basics(name):
    obj = _kuberay_object(name)
    assert obj["apiVersion"] == "ray.io/v1"
    spec = _cluster_spec(obj)
    assert str(spec["rayVersion"]) == RAY_VERSION
    # Token auth: KubeRay authOptions, or RAY_AUTH_MODE=token + RAY_AUTH_TOKEN from a Secret everywhere.
    if spec.get("authOptions", {}).get("mode") != "token":
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            for c in _containers(group["template"]):
                env = {e["name"]: e for e in c.get("env", [])}
                assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", c["name"]
                assert "secretKeyRef" in env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}), c["name"]
    # The head service is never published outside the Kubernetes cluster.
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    assert not spec["headGroupSpec"].get("enableIngress", False)


@pytest.mark.parametrize("name", KUBERAY_FILES)
def test_kuberay_images_match_ray_version(name):
    spec = _cluster_spec(_kuberay_object(name))
    images = [
        c["image"]
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for c in _containers(group["template"], init=True)
    ]
    assert images
    for image in images:
        assert _image_ray_version(image) == RAY_VERSION == str(spec["rayVersion"]), image


@pytest.mark.parametrize("name", KUBERAY_FILES)
def test_kuberay_gpu_worker_group(name):
    spec = _cluster_spec(_kuberay_object(name))
    gpu_groups = []
    for group in spec["workerGroupSpecs"]:
        for c in _containers(group["template"]):
            limits = c.get("resources", {}).get("limits", {})
            if "nvidia.com/gpu" in limits:
                gpu_groups.append(group["groupName"])
                assert int(limits["nvidia.com/gpu"]) >= 1
                requests = c["resources"].get("requests", {})
                assert str(requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"])) == str(
                    limits["nvidia.com/gpu"]
                ), "GPU requests must equal limits"
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
    assert gpu_groups, f"{name}: no worker group with nvidia.com/gpu limits"


def test_rayjob_entrypoint_and_lifecycle():
    job = _kuberay_object("rayjob.yaml")
    assert job["kind"] == "RayJob"
    spec = job["spec"]
    entrypoint = " ".join(spec["entrypoint"].split())
    assert entrypoint.startswith("dyrep-ray train")
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict)
    assert runtime_env["working_dir"] == "/home/ray/dyrep-ray"  # WORKDIR of cluster/Dockerfile
    # Ray accepts the field names and types (working_dir exists only in the image: check with the repo).
    RuntimeEnv(**{**runtime_env, "working_dir": str(REPO)})
    spec_excl = _pathspec(runtime_env.get("excludes", []))
    for pkg_file in _package_files():
        assert not spec_excl.match_file(pkg_file), f"runtimeEnvYAML excludes drop {pkg_file}"


def test_rayjob_entrypoint_names_an_existing_experiment():
    entrypoint = _kuberay_object("rayjob.yaml")["spec"]["entrypoint"]
    m = re.search(r"(?:^|\s)(?:-c|--config)\s+(\S+\.ya?ml)", entrypoint)
    assert m, "entrypoint passes no -c <experiment>.yaml"
    config = m.group(1)
    assert config.startswith("experiments/"), config
    if not any((REPO / "experiments").rglob("*.yaml")):
        pytest.skip("experiments/ has no YAML files yet")
    assert (REPO / config).is_file(), f"entrypoint names {config}, which does not exist"


# -------------------------------------------------------------------------------------- runtime_env
def test_runtime_env_file():
    env = _load("runtime_env.yaml")
    assert isinstance(env, dict) and env.get("working_dir")
    RuntimeEnv(**env)
    assert all(isinstance(v, str) for v in env.get("env_vars", {}).values())
    assert env["env_vars"].get("RAY_TRAIN_V2_ENABLED") == "1"
    spec = _pathspec(env["excludes"])
    assert spec.match_file("data/cifar-10-batches-py/data_batch_1")
    assert spec.match_file("runs/x/metrics.jsonl")
    for pkg_file in _package_files():
        assert not spec.match_file(pkg_file), f"runtime_env excludes drop {pkg_file}"


def _pathspec(patterns):
    try:
        from ray._private.thirdparty.pathspec import PathSpec  # what Ray uses for `excludes`
    except ImportError:  # pragma: no cover - Ray moved it
        PathSpec = pathspec.PathSpec
    return PathSpec.from_lines("gitwildmatch", patterns)


def _package_files() -> list[str]:
    files = [p.relative_to(REPO).as_posix() for p in (REPO / "dyrep_ray").rglob("*.py")]
    # Paths that must survive even before the package has them.
    return files + ["dyrep_ray/data/__init__.py", "dyrep_ray/data/cifar.py", "experiments/x.yaml"]


# ----------------------------------------------------------------------------- Dockerfile / README
def test_dockerfile_base_image_matches_ray_version():
    text = (CLUSTER / "Dockerfile").read_text()
    bases = re.findall(r"(?m)^ARG RAY_IMAGE=(\S+)", text) + [
        b for b in re.findall(r"(?m)^FROM\s+(\S+)", text) if not b.startswith("$")
    ]
    assert bases
    for image in bases:
        assert _image_ray_version(image) == RAY_VERSION, image
    assert f"ray[default,train,tune]=={RAY_VERSION}" in text


def test_readme_covers_the_workflow_and_security():
    text = (CLUSTER / "README.md").read_text()
    for needle in [
        "ray up cluster/aws.yaml",
        "ray get-auth-token",
        "ray job submit",
        "ray job logs -f",
        "--name",
        "ray down cluster/aws.yaml",
        "kubectl apply -f cluster/rayjob.yaml",
        "ray dashboard cluster/aws.yaml",
        "weights_only=True",
        "## Security",
    ]:
        assert needle in text, f"README lacks {needle!r}"


# ------------------------------------------------------------------------------------------ secrets
def test_no_literal_secrets_in_cluster_files():
    findings = []
    for path in _cluster_files():
        text = path.read_text()
        findings += [f"{path.name}: {f}" for f in _secret_findings_in_text(text)]
        if path.suffix in (".yaml", ".yml"):
            for doc in yaml.safe_load_all(text):
                findings += [f"{path.name}: {f}" for f in _secret_findings_in_tree(doc)]
                # runtime_env embedded as a YAML string in a RayJob
                if isinstance(doc, dict) and isinstance(doc.get("spec", {}).get("runtimeEnvYAML"), str):
                    inner = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
                    findings += [f"{path.name}: runtimeEnvYAML {f}" for f in _secret_findings_in_tree(inner)]
    assert not findings, "\n".join(findings)


def test_placeholders_are_marked():
    """Account-specific values are <YOUR_...> placeholders (so the user sees what to fill in)."""
    for name in LAUNCHER_FILES + KUBERAY_FILES:
        assert re.search(r"<YOUR_[A-Z0-9_]+>", (CLUSTER / name).read_text()), name


def test_secret_detection_can_fail():
    """The scanners above must flag the things they exist to catch (built here, not written literally)."""
    fake_key = "AKIA" + "ABCDEFGHIJKLMNOP"
    fake_token = "3f" * 16
    assert _secret_findings_in_text(f"aws_access_key_id = {fake_key}")
    assert _secret_findings_in_text(f"token: {fake_token}")
    assert _secret_findings_in_text("auth_token=hunter2hunter2")
    assert _secret_findings_in_text("password: correct-horse-battery")
    assert not _secret_findings_in_text('export RAY_AUTH_TOKEN="$(ray get-auth-token)"\nmode: token')
    assert _secret_findings_in_tree({"env_vars": {"RAY_AUTH_TOKEN": "abc"}})
    assert _secret_findings_in_tree({"env": [{"name": "RAY_AUTH_TOKEN", "value": "abc"}]})
    assert not _secret_findings_in_tree(
        {"env": [{"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "auth_token"}}}]}
    )
    assert not _secret_findings_in_tree({"auth_token": "<YOUR_TOKEN>"})
