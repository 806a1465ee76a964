"""Every file under cluster/ launches as shipped, as far as can be known without a cloud account.

Launcher YAMLs: Ray's own autoscaler schema (the installed ``ray-schema.json``, validated with
jsonschema as ``ray up`` does) on the file and on Ray's defaults-filled config, plus what a GPU
training cluster needs. KubeRay manifests: the structural ``ray.io/v1`` schema in
kuberay_v1_schema.py plus the same needs. Images: only published ``rayproject/ray`` tags of the
installed Ray and Python, or the project image built from cluster/Dockerfile on such a tag.
"""
import copy
import json
import re
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from kuberay_v1_schema import SCHEMAS

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
PRESET = ROOT / "workflows/configs/llava-1.5-7b-coin.yaml"
RAY_SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
PY = f"py{sys.version_info.major}{sys.version_info.minor}"
# CUDA variants Ray's image build publishes for rayproject/ray (ci/ray_ci/docker_container.py:
# PLATFORMS_RAY, cu12.9 added for releases from December 2025); -gpu aliases the default one.
PUBLISHED_VARIANTS = {"cpu", "gpu", "cu117", "cu118", "cu121", "cu123", "cu124", "cu125", "cu126", "cu128", "cu129"}
RAY_IMAGE = re.compile(r"^rayproject/ray:(?P<version>[\w.]+)-(?P<py>py\d+)-(?P<variant>\w+?)(-aarch64)?$")
PROJECT_IMAGE = re.compile(r"^(?:[\w.-]+(?::\d+)?/)*cram-ray:(?P<tag>[\w.-]+)$")
LARGE = re.compile(r"checkpoint|safetensors|\.bin$|/models?\b|llava|weights", re.I)


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


LAUNCHERS = sorted(p for p in CLUSTER.glob("*.yaml") if "provider" in documents(p)[0])
KUBERAY = sorted(p for p in CLUSTER.glob("*.yaml") if any(d.get("apiVersion", "").startswith("ray.io/") for d in documents(p)))
RAY_RESOURCES = [d for p in KUBERAY for d in documents(p) if d["apiVersion"].startswith("ray.io/")]


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def pod_spec(group: dict) -> dict:
    return group["template"]["spec"]


def dockerfile_base() -> str:
    text = (CLUSTER / "Dockerfile").read_text()
    return re.search(r"^ARG RAY_IMAGE=(\S+)$", text, re.M).group(1)


def check_published(image: str) -> None:
    """A published rayproject/ray tag of the installed Ray and Python, or the project image on one."""
    m = RAY_IMAGE.match(image)
    if m is None:
        project = PROJECT_IMAGE.match(image)
        assert project, f"{image}: neither rayproject/ray nor the project image built by cluster/Dockerfile"
        base = dockerfile_base()
        assert project["tag"] == base.split(":", 1)[1], f"{image}: tag differs from the Dockerfile base {base}"
        return check_published(base)
    assert m["version"] == ray.__version__, f"{image}: Ray {m['version']}, installed {ray.__version__}"
    assert m["py"] == PY, f"{image}: {m['py']}, the project runs {PY}"
    assert m["variant"] in PUBLISHED_VARIANTS, f"{image}: no published -{m['variant']} variant"


def test_every_cluster_file_is_checked():
    assert {p.name for p in CLUSTER.glob("*.yaml")} == {p.name for p in LAUNCHERS + KUBERAY}
    assert LAUNCHERS and KUBERAY and {d["kind"] for d in RAY_RESOURCES} == {"RayCluster", "RayJob"}


# -- cluster launcher ------------------------------------------------------------------------
@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_validates_against_the_installed_ray_schema(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = documents(path)[0]
    jsonschema.validate(config, RAY_SCHEMA)
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` checks after filling defaults


def test_the_ray_schema_rejects_a_node_type_without_resources():
    config = documents(LAUNCHERS[0])[0]
    for node in config["available_node_types"].values():
        del node["resources"]
    with pytest.raises(jsonschema.ValidationError, match="'resources' is a required property"):
        jsonschema.validate(config, RAY_SCHEMA)


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_nodes_head_and_autoscaling(path):
    config = documents(path)[0]
    train = yaml.safe_load(PRESET.read_text())["train"]
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU"), "the head must run no training"
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert workers
    gpus = 0
    for name, t in workers.items():
        res = t["resources"]
        assert res.get("GPU", 0) > 0 and res.get("CPU", 0) >= res["GPU"] * train["cpus_per_worker"], name
        assert 0 <= t.get("min_workers", 0) <= t["max_workers"] <= config["max_workers"], name
        gpus += res["GPU"] * t["max_workers"]
    assert gpus >= train["num_workers"], "the preset's Train workers cannot all be placed"


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_ships_the_repository_not_weights(path):
    config = documents(path)[0]
    mounts = config.get("file_mounts", {})
    for remote, local in mounts.items():
        assert not LARGE.search(local) and not LARGE.search(remote), f"{remote}: {local} looks like model weights"
    repo = [remote for remote, local in mounts.items() if local in (".", "./")]
    assert repo, "the repository is not synced to the nodes"
    assert ".gitignore" in config.get("rsync_filter", [])
    assert {"checkpoints", "runs", ".venv", "*.safetensors"} <= set(config.get("rsync_exclude", []))
    setup = "\n".join(config.get("setup_commands", []))
    assert f"-e '{repo[0]}[all]'" in setup, "the synced repository is not installed with its extras"
    assert f"=={ray.__version__}" in setup, "pip could replace the image's Ray"
    fetch = "\n".join(config.get("worker_setup_commands", []))
    assert re.search(r"(s3|gs)://\S+/models/", fetch), "workers do not fetch the weights from object storage"


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_token_auth_and_loopback_dashboard(path):
    config = documents(path)[0]
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    for cmd in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token" in cmd, cmd
    assert any(remote.endswith("/.ray/auth_token") for remote in config["file_mounts"])


# -- images ----------------------------------------------------------------------------------
def all_images() -> list[str]:
    images = [documents(p)[0]["docker"]["image"] for p in LAUNCHERS]
    for doc in RAY_RESOURCES:
        spec = cluster_spec(doc)
        for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
            images += [c["image"] for c in pod_spec(group)["containers"]]
    return images + [dockerfile_base()]


def test_every_image_is_published_for_the_installed_ray():
    images = all_images()
    assert len(images) > len(LAUNCHERS) + 1
    for image in images:
        assert "ray-ml" not in image, f"{image}: ray-ml images stopped after Ray 2.49"
        check_published(image)
    for doc in RAY_RESOURCES:
        assert cluster_spec(doc)["rayVersion"] == ray.__version__


@pytest.mark.parametrize("image", ["rayproject/ray-ml:2.60.0-py311-gpu", "rayproject/ray:2.60.0-py311-cu999",
                                   "rayproject/ray:2.49.0-py311-gpu", "rayproject/ray:2.60.0-py27-gpu",
                                   "ghcr.io/x/cram-ray:latest"])
def test_unpublished_images_are_rejected(image):
    with pytest.raises(AssertionError):
        check_published(image)


# -- KubeRay ---------------------------------------------------------------------------------
@pytest.mark.parametrize("doc", RAY_RESOURCES, ids=lambda d: d["kind"])
def test_kuberay_manifest_matches_the_v1_schema(doc):
    jsonschema.validate(doc, SCHEMAS[doc["kind"]])


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s["workerGroupSpecs"][0].pop("minReplicas"), "'minReplicas' is a required property"),
    (lambda s: s["headGroupSpec"].update(rayStartparams={}), "Additional properties"),
    (lambda s: s["authOptions"].update(mode="on"), "is not one of"),
    (lambda s: pod_spec(s["workerGroupSpecs"][0])["containers"][0]["resources"]["limits"].update(cpu="16 cores"),
     "16 cores"),
])
def test_the_v1_schema_rejects_broken_manifests(mutate, message):
    doc = copy.deepcopy(next(d for d in RAY_RESOURCES if d["kind"] == "RayCluster"))
    mutate(doc["spec"])
    with pytest.raises(jsonschema.ValidationError, match=message):
        jsonschema.validate(doc, SCHEMAS["RayCluster"])


def cpus(quantity) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


@pytest.mark.parametrize("doc", RAY_RESOURCES, ids=lambda d: d["kind"])
def test_kuberay_pods_fit_the_preset(doc):
    train = yaml.safe_load(PRESET.read_text())["train"]
    spec = cluster_spec(doc)
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", "the head must run no training"
    gpus = 0
    for group in spec["workerGroupSpecs"]:
        limits = pod_spec(group)["containers"][0]["resources"]["limits"]
        requests = pod_spec(group)["containers"][0]["resources"]["requests"]
        assert limits == requests, f"{group['groupName']}: requests differ from limits"
        per_pod = int(limits["nvidia.com/gpu"])
        assert cpus(limits["cpu"]) >= per_pod * train["cpus_per_worker"] + 1, \
            f"{group['groupName']}: {limits['cpu']} CPUs idle some of its {per_pod} GPUs"
        assert 0 <= group["minReplicas"] <= group["maxReplicas"]
        gpus += per_pod * group["maxReplicas"]
    assert gpus >= train["num_workers"], "the preset's Train workers cannot all be placed"


@pytest.mark.parametrize("doc", RAY_RESOURCES, ids=lambda d: d["kind"])
def test_kuberay_storage_identity_and_security(doc):
    spec = cluster_spec(doc)
    assert spec["authOptions"]["mode"] == "token" and spec["authOptions"].get("secretName")
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress")
    accounts = {d["metadata"]["name"]: d["metadata"].get("annotations", {})
                for p in KUBERAY for d in documents(p) if d.get("kind") == "ServiceAccount"}
    for group in [head, *spec["workerGroupSpecs"]]:
        pod = pod_spec(group)
        annotations = accounts[pod["serviceAccountName"]]
        assert {"eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account"} <= set(annotations)
        mounts = {m["mountPath"]: m for c in pod["containers"] for m in c.get("volumeMounts", [])}
        preset = yaml.safe_load(PRESET.read_text())
        assert Path(preset["model"]["path"]).parent.as_posix() in mounts, "no volume holds model.path"
        assert mounts["/models"].get("readOnly")
        assert Path(preset["data"]["benchmark"]).parts[1] == "data" and "/data" in mounts


def test_rayjob_code_is_pinned():
    job = next(d for d in RAY_RESOURCES if d["kind"] == "RayJob")
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    uri = runtime_env["working_dir"]
    assert not uri.startswith("http://"), "code fetched over plain HTTP"
    assert re.search(r"-([0-9a-f]{7,40}|v\d+\.\d+\.\d+)\.zip$", uri), f"{uri}: not pinned to a commit or tag"
    assert "--address" not in job["spec"]["entrypoint"], "a submitted job joins its own cluster via RAY_ADDRESS"


def _tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def test_a_job_upload_leaves_out_a_comparisons_outputs_and_git_keeps_only_its_summaries(tmp_path):
    """`ray job submit --working-dir .` packages the checkout with Ray's own reading of .gitignore
    and .rayignore; a comparison under benchmarks/ writes gigabytes of stream files beside the
    summaries git keeps. Ray's package holds the code and the table, none of the stream files;
    git keeps the summaries and the table, nothing else a comparison writes."""
    import subprocess
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    kept_by_git = ["benchmarks/cmp/cram/seed_0/summary.json", "benchmarks/cmp/compare.md"]
    outputs = ["benchmarks/cmp/cram-0123abcd/task_0/train/expert.safetensors", "benchmarks/cmp/mlflow.db",
               "benchmarks/cmp/mlartifacts/1/model.bin", "benchmarks/cmp/datasets/ab/shard-0.parquet",
               "benchmarks/cmp/cram/seed_0/rank_map.png", "benchmarks/cmp/compare.json"]
    code = ["cram_ray/__init__.py", "workflows/stream.py", "README.md"]
    repo = tmp_path / "repo"
    _tree(repo, {".gitignore": (ROOT / ".gitignore").read_bytes(), ".rayignore": (ROOT / ".rayignore").read_bytes(),
                 **{rel: b"x" for rel in kept_by_git + outputs + code}})

    package = tmp_path / "package.zip"
    create_package(str(repo), package, include_gitignore=True)
    uploaded = {n.rstrip("/") for n in zipfile.ZipFile(package).namelist()}
    assert set(code) <= uploaded and "benchmarks/cmp/compare.md" in uploaded
    assert not uploaded & set(outputs), sorted(uploaded & set(outputs))
    assert not [n for n in uploaded if n.startswith("benchmarks/cmp/cram")], sorted(uploaded)

    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    listed = subprocess.run(["git", "-C", str(repo), "ls-files", "--others", "--exclude-standard"], check=True,
                            capture_output=True, text=True).stdout.split()
    assert set(kept_by_git + code) <= set(listed)
    assert not set(listed) & set(outputs), sorted(set(listed) & set(outputs))
