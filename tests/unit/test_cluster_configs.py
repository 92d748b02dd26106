"""The cluster configs in cluster_configs/ hold what cluster_configs/README.md promises.

Nothing here talks to a cloud or a Kubernetes API: every YAML is parsed (all documents of it), the
launcher files are validated against Ray's own cluster-config schema, and the fields the docs and the
commands rely on are checked, including the u2seg config shipped in the ConfigMap (so a typo in a knob
fails here rather than at the first job) and that no credential is written inline.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from u2seg.config import ConfigError, config_from_dict, load_config

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster_configs"
KUBERAY = CLUSTER / "kuberay"
LAUNCHERS = {"aws.yaml": "aws", "gcp.yaml": "gcp"}
ALL_YAML = sorted(p.relative_to(CLUSTER).as_posix() for p in CLUSTER.rglob("*.yaml"))
RUN_ID = "u2seg-weekly-29000000"  # what the CronJob substitutes for @RUN_ID@ in the RayJob template


@functools.cache
def _parse(rel: str) -> tuple[Any, ...]:
    with open(CLUSTER / rel) as fh:
        return tuple(d for d in yaml.load_all(fh, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
                     if d is not None)


def load_docs(rel: str) -> list[dict[str, Any]]:
    """Every non-empty document of a (possibly multi-document) YAML file; a fresh copy per call."""
    return copy.deepcopy(list(_parse(rel)))


def kube_objects() -> list[dict[str, Any]]:
    """All Kubernetes objects under kuberay/ (the scheduled RayJob template is in scheduled_template())."""
    objs: list[dict[str, Any]] = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        objs.extend(load_docs(path.relative_to(CLUSTER).as_posix()))
    return objs


def of_kind(kind: str, objs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    return [o for o in (kube_objects() if objs is None else objs) if o.get("kind") == kind]


def scheduled_template() -> tuple[str, dict[str, Any]]:
    """The raw RayJob template of schedule.yaml and the RayJob it becomes on a tick."""
    cron = of_kind("CronJob", load_docs("kuberay/schedule.yaml"))[0]
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    mount = pod["containers"][0]["volumeMounts"][0]
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    cm = next(c for c in of_kind("ConfigMap") if c["metadata"]["name"] == volume["configMap"]["name"])
    script = pod["containers"][0]["args"][0]
    key = next(k for k in cm["data"] if f"{mount['mountPath']}/{k}" in script)
    raw = cm["data"][key]
    return raw, yaml.safe_load(raw.replace("@RUN_ID@", RUN_ID))


def ray_jobs() -> list[dict[str, Any]]:
    return [*of_kind("RayJob"), scheduled_template()[1]]


def cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """(where, RayCluster spec) for the RayCluster and the rayClusterSpec of every RayJob."""
    specs = [(f"RayCluster/{c['metadata']['name']}", c["spec"]) for c in of_kind("RayCluster")]
    specs += [(f"RayJob/{j['metadata']['name']}", j["spec"]["rayClusterSpec"]) for j in ray_jobs()]
    return specs


def pod_specs(spec: dict[str, Any]) -> list[dict[str, Any]]:
    workers = [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    return [spec["headGroupSpec"]["template"]["spec"], *workers]


def gpus(container: dict[str, Any]) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def cpu_quantity(q: Any) -> float:
    q = str(q)
    return int(q[:-1]) / 1000 if q.endswith("m") else float(q)


def ray_version_of_image(image: str) -> str:
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py311-gpu", image)
    assert match, f"{image} is not a rayproject/ray py311 GPU image"
    return match.group(1)


def dockerfile_ray_version() -> str:
    match = re.search(r"^ARG RAY_VERSION=(\S+)$", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert match, "Dockerfile has no ARG RAY_VERSION=..."
    return match.group(1)


# ---------------------------------------------------------------- every file


@pytest.mark.parametrize("rel", ALL_YAML)
def test_every_yaml_parses(rel: str) -> None:
    docs = load_docs(rel)
    assert docs, f"{rel} has no YAML document"
    assert all(isinstance(d, dict) for d in docs)


def test_the_documented_files_exist() -> None:
    expected = {"aws.yaml", "gcp.yaml", "kuberay/common.yaml", "kuberay/raycluster.yaml",
                "kuberay/rayjob.yaml", "kuberay/schedule.yaml"}
    assert expected <= set(ALL_YAML)
    readme = (CLUSTER / "README.md").read_text()
    for rel in [*expected, "Dockerfile"]:
        assert f"`{rel}`" in readme, f"README.md does not describe {rel}"


def test_entrypoint_module_exists_and_takes_config() -> None:
    assert importlib.util.find_spec("jobs.pipeline") is not None
    out = subprocess.run([sys.executable, "-m", "jobs.pipeline", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--config" in out.stdout


# ---------------------------------------------------------------- Ray cluster launcher


def ray_cluster_schema() -> dict[str, Any]:
    """Ray's own JSON schema for launcher configs, found without importing (starting) Ray."""
    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.submodule_search_locations
    path = Path(next(iter(spec.submodule_search_locations))) / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


@pytest.mark.parametrize(("rel", "provider"), sorted(LAUNCHERS.items()))
def test_launcher_matches_rays_schema(rel: str, provider: str) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    (cfg,) = load_docs(rel)
    jsonschema.validate(cfg, ray_cluster_schema())
    assert cfg["provider"]["type"] == provider
    assert cfg["provider"]["region"]
    assert cfg["auth"]["ssh_user"]
    if provider == "gcp":
        assert cfg["provider"]["project_id"] and cfg["provider"]["availability_zone"]


@pytest.mark.parametrize("rel", sorted(LAUNCHERS))
def test_launcher_node_types_and_scaling_bounds(rel: str) -> None:
    (cfg,) = load_docs(rel)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    gpu_groups = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_groups, f"{rel} has no GPU worker type"
    for name, t in workers.items():
        assert {"CPU"} <= set(t["resources"]), f"{name} must declare its CPUs"
        assert 0 <= t["min_workers"] <= t["max_workers"], name
    assert sum(t["max_workers"] for t in workers.values()) <= cfg["max_workers"]
    for t in gpu_groups:
        assert t["resources"]["CPU"] >= 1
        node = t["node_config"]
        if LAUNCHERS[rel] == "aws":
            assert re.match(r"(g4dn|g5|g6e?|p3|p4d|p4de|p5e?)\.", node["InstanceType"]), node["InstanceType"]
        else:
            (acc,) = node["guestAccelerators"]
            assert acc["acceleratorType"].startswith("nvidia-")
            assert acc["acceleratorCount"] == t["resources"]["GPU"]
            assert node["scheduling"]["onHostMaintenance"] == "TERMINATE"


@pytest.mark.parametrize("rel", sorted(LAUNCHERS))
def test_launcher_nodes_use_a_deep_learning_image(rel: str) -> None:
    (cfg,) = load_docs(rel)
    for name, t in cfg["available_node_types"].items():
        node = t["node_config"]
        if LAUNCHERS[rel] == "aws":
            image = node["ImageId"]
            assert re.fullmatch(r"ami-[0-9a-f]{8,17}", image) or image.startswith(
                "resolve:ssm:/aws/service/deeplearning/ami/"), f"{name}: {image}"
        else:
            (disk,) = node["disks"]
            image = disk["initializeParams"]["sourceImage"]
            assert image.startswith("projects/deeplearning-platform-release/global/images/"), name


@pytest.mark.parametrize("rel", sorted(LAUNCHERS))
def test_launcher_installs_u2seg_from_the_mounted_wheel(rel: str) -> None:
    (cfg,) = load_docs(rel)
    setup = " ".join(cfg["setup_commands"])
    assert "u2seg" in setup and "[gpu]" in setup
    (remote,) = cfg["file_mounts"]
    assert cfg["file_mounts"][remote] == "./dist"
    assert f"{remote}/u2seg-" in setup, "setup_commands must install the wheel that file_mounts copies"
    assert "StandardGpuResources" in setup, "setup_commands must check that the GPU build of faiss won"
    # the container's Ray is kept: the pin equals the image's Ray, which equals the Dockerfile's
    version = ray_version_of_image(cfg["docker"]["image"])
    assert f"=={version}" in setup
    assert version == dockerfile_ray_version()


def test_aws_s3_access_comes_from_instance_profiles() -> None:
    (cfg,) = load_docs("aws.yaml")
    for name, t in cfg["available_node_types"].items():
        assert t["node_config"]["IamInstanceProfile"].get("Name"), f"{name} has no instance profile"


def test_gcp_service_accounts_belong_to_the_project() -> None:
    (cfg,) = load_docs("gcp.yaml")
    project = cfg["provider"]["project_id"]
    for name, t in cfg["available_node_types"].items():
        for sa in t["node_config"].get("serviceAccounts", []):
            assert sa["email"].endswith(f"@{project}.iam.gserviceaccount.com"), name


# ---------------------------------------------------------------- KubeRay


def test_kuberay_kinds_and_api_versions() -> None:
    api = {(o["kind"], o["apiVersion"]) for o in kube_objects()}
    assert ("RayCluster", "ray.io/v1") in api
    assert ("RayJob", "ray.io/v1") in api
    assert ("CronJob", "batch/v1") in api
    for o in kube_objects():
        if o["kind"].startswith("Ray"):
            assert o["apiVersion"] == "ray.io/v1", o["kind"]
    _, tmpl = scheduled_template()
    assert (tmpl["apiVersion"], tmpl["kind"]) == ("ray.io/v1", "RayJob")
    assert tmpl["metadata"]["name"] == RUN_ID


@pytest.mark.parametrize("where", [w for w, _ in cluster_specs()])
def test_cluster_groups_gpu_and_autoscaling(where: str) -> None:
    spec = dict(cluster_specs())[where]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert gpus(head) == 0
    gpu_groups = [g for g in spec["workerGroupSpecs"] if gpus(g["template"]["spec"]["containers"][0]) >= 1]
    assert gpu_groups, f"{where} has no worker group requesting nvidia.com/gpu"
    for g in spec["workerGroupSpecs"]:
        replicas = g.get("replicas", g["minReplicas"])
        assert 0 <= g["minReplicas"] <= replicas <= g["maxReplicas"], g["groupName"]
        res = g["template"]["spec"]["containers"][0]["resources"]
        assert res["requests"] == res["limits"], f"{g['groupName']}: Ray sizes itself from the limits"
    assert dockerfile_ray_version() == spec["rayVersion"]


def test_rayjob_cluster_and_schedule_template_match_the_raycluster() -> None:
    (cluster,) = of_kind("RayCluster")
    for job in ray_jobs():
        assert job["spec"]["rayClusterSpec"] == cluster["spec"], job["metadata"]["name"]
    (job,) = of_kind("RayJob")
    _, tmpl = scheduled_template()
    strip = ("entrypoint", "rayClusterSpec")
    assert {k: v for k, v in tmpl["spec"].items() if k not in strip} == \
        {k: v for k, v in job["spec"].items() if k not in strip}


def test_every_ray_container_runs_the_u2seg_image() -> None:
    images = {c["image"] for _, spec in cluster_specs() for pod in pod_specs(spec) for c in pod["containers"]}
    assert len(images) == 1, images
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert "FROM rayproject/ray:${RAY_VERSION}-py311-gpu" in dockerfile
    assert "[gpu]" in dockerfile and "StandardGpuResources" in dockerfile


def cm_keys(cm_volume: dict[str, Any]) -> list[str]:
    """File names a configMap volume creates: its items' paths, or every key of the ConfigMap."""
    if cm_volume.get("items"):
        return [i["path"] for i in cm_volume["items"]]
    return list(configmap(cm_volume["name"])["data"])


def configmap(name: str) -> dict[str, Any]:
    found = [c for c in of_kind("ConfigMap") if c["metadata"]["name"] == name]
    assert len(found) == 1, f"ConfigMap {name} must be defined once under kuberay/ (found {len(found)})"
    return found[0]


@pytest.mark.parametrize("job", ray_jobs(), ids=lambda j: j["metadata"]["name"])
def test_rayjob_entrypoint_reads_the_mounted_config(job: dict[str, Any], tmp_path: Path) -> None:
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] >= 0
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.pipeline"]
    config_path = argv[argv.index("--config") + 1]
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head["volumes"]}
    mounted = {}
    for m in head["containers"][0]["volumeMounts"]:
        cm = volumes[m["name"]].get("configMap")
        if cm:
            for key in cm_keys(cm):
                mounted[f"{m['mountPath'].rstrip('/')}/{key}"] = (cm["name"], key)
    assert config_path in mounted, f"--config {config_path} is not a ConfigMap file mounted on the head"
    name, key = mounted[config_path]
    text = configmap(name)["data"][key]
    overrides = [a for a in argv[argv.index("--config") + 2:] if "=" in a]
    assert any(o.startswith("run.run_root=s3://") for o in overrides)
    # the config plus the entrypoint's overrides resolve, exactly as the driver will resolve them
    (tmp_path / "config.yaml").write_text(text)
    cfg = load_config(str(tmp_path / "config.yaml"), overrides)
    assert cfg.run.run_root.startswith("s3://")


def test_scheduled_runs_get_their_own_run_root() -> None:
    raw, tmpl = scheduled_template()
    assert "@RUN_ID@" in raw
    argv = shlex.split(tmpl["spec"]["entrypoint"])
    (root,) = [a for a in argv if a.startswith("run.run_root=")]
    assert root.endswith(f"/{RUN_ID}")
    (job,) = of_kind("RayJob")
    assert root not in job["spec"]["entrypoint"]


def test_every_referenced_object_is_defined() -> None:
    objs = kube_objects()
    defined = {(o["kind"], o["metadata"]["name"]) for o in objs}
    pods = [pod for _, spec in cluster_specs() for pod in pod_specs(spec)]
    cron = of_kind("CronJob")[0]
    pods.append(cron["spec"]["jobTemplate"]["spec"]["template"]["spec"])
    for pod in pods:
        if "serviceAccountName" in pod:
            assert ("ServiceAccount", pod["serviceAccountName"]) in defined
        for v in pod.get("volumes", []):
            if "configMap" in v:
                assert ("ConfigMap", v["configMap"]["name"]) in defined


def test_scheduler_rbac_allows_creating_rayjobs_only() -> None:
    objs = load_docs("kuberay/schedule.yaml")
    cron = of_kind("CronJob", objs)[0]
    sa = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["serviceAccountName"]
    (binding,) = of_kind("RoleBinding", objs)
    assert {"kind": "ServiceAccount", "name": sa} in binding["subjects"]
    (role,) = [r for r in of_kind("Role", objs) if r["metadata"]["name"] == binding["roleRef"]["name"]]
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    assert ("ray.io", "rayjobs", "create") in granted
    assert {g for g, _, _ in granted} == {"ray.io"} and {r for _, r, _ in granted} == {"rayjobs"}
    assert not {v for _, _, v in granted} & {"delete", "update", "patch", "*"}
    script = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert "kubectl create -f" in script


# ---------------------------------------------------------------- cron


CRON_FIELDS = [  # (low, high, names)
    (0, 59, {}),
    (0, 23, {}),
    (1, 31, {}),
    (1, 12, {m: i + 1 for i, m in enumerate(
        ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"])}),
    (0, 7, {d: i for i, d in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])}),
]


def valid_cron(expr: str) -> bool:
    """A standard 5-field cron expression, as the Kubernetes CronJob controller parses it."""
    fields = expr.split()
    if len(fields) != 5:
        return False
    for field, (lo, hi, names) in zip(fields, CRON_FIELDS, strict=True):
        for part in field.split(","):
            rng, _, step = part.partition("/")
            if step and not (step.isdigit() and int(step) > 0):
                return False
            if rng in ("*", "?"):
                continue
            bounds = rng.split("-")
            if len(bounds) > 2:
                return False
            values = []
            for b in bounds:
                b = b.lower()
                if b in names:
                    values.append(names[b])
                elif b.isdigit():
                    values.append(int(b))
                else:
                    return False
            if not all(lo <= v <= hi for v in values) or values != sorted(values):
                return False
    return True


@pytest.mark.parametrize(("expr", "ok"), [
    ("0 2 * * 0", True), ("*/15 0-6 1,15 jan-jun mon-fri", True), ("0 0 * * 7", True),
    ("0 2 * *", False), ("60 2 * * 0", False), ("0 24 * * 0", False), ("0 2 0 * *", False),
    ("0 2 * 13 *", False), ("0 2 * * 8", False), ("*/0 * * * *", False), ("0 5-1 * * *", False),
    ("@weekly", False), ("0 2 * * sunday", False),
])
def test_cron_validator(expr: str, ok: bool) -> None:
    assert valid_cron(expr) is ok


def test_schedule_is_a_valid_cron() -> None:
    for cron in of_kind("CronJob"):
        assert valid_cron(cron["spec"]["schedule"]), cron["spec"]["schedule"]
        assert cron["spec"]["concurrencyPolicy"] in ("Forbid", "Replace")


# ---------------------------------------------------------------- the shipped u2seg config


def shipped_config() -> dict[str, Any]:
    return yaml.safe_load(configmap("u2seg-config")["data"]["config.yaml"])


def test_configmap_u2seg_config_validates() -> None:
    cfg = config_from_dict(shipped_config())
    assert cfg.run.run_root.startswith("s3://")
    assert cfg.run.storage.key is None and cfg.run.storage.secret is None, "credentials belong in a Secret"


@pytest.mark.parametrize(("section", "key"), [("extract", "tua"), ("train", "num_worker"), ("oops", "x")])
def test_a_typo_in_the_configmap_config_would_fail(section: str, key: str) -> None:
    tree = shipped_config()
    tree.setdefault(section, {})[key] = 1
    with pytest.raises(ConfigError):
        config_from_dict(tree)


@pytest.mark.parametrize("where", [w for w, _ in cluster_specs()])
def test_configmap_config_fits_the_cluster(where: str) -> None:
    """Actor pools and trainers larger than the GPU group would wait for resources forever."""
    spec = dict(cluster_specs())[where]
    cfg = config_from_dict(shipped_config())
    gpu_groups = [g for g in spec["workerGroupSpecs"] if gpus(g["template"]["spec"]["containers"][0])]
    gpu_capacity = sum(g["maxReplicas"] * gpus(g["template"]["spec"]["containers"][0]) for g in gpu_groups)
    cpu_capacity = sum(g["maxReplicas"] * cpu_quantity(g["template"]["spec"]["containers"][0]["resources"]
                                                         ["limits"]["cpu"]) for g in spec["workerGroupSpecs"])
    assert cfg.extract.num_actors * cfg.extract.gpus_per_actor <= gpu_capacity
    per_pod_cpu = max(cpu_quantity(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
                      for g in gpu_groups)
    assert cfg.extract.cpus_per_actor < per_pod_cpu, "a MaskCut actor must leave CPUs for image decoding"
    if cfg.train.use_gpu == "yes":
        assert cfg.train.num_workers <= gpu_capacity
    assert cfg.cluster.num_shards <= cpu_capacity


# ---------------------------------------------------------------- credentials


AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
AWS_SECRET_VALUE = re.compile(
    r"aws_secret_access_key[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])", re.I)
SECRET_ENV = re.compile(r"AWS_(SECRET_ACCESS_KEY|ACCESS_KEY_ID|SESSION_TOKEN)")


def all_text_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.is_file())


@pytest.mark.parametrize("path", all_text_files(), ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_no_inline_aws_keys(path: Path) -> None:
    text = path.read_text()
    assert not AWS_KEY_ID.search(text), f"{path.name} holds an AWS access key id"
    assert not AWS_SECRET_VALUE.search(text), f"{path.name} holds an AWS secret access key"


def test_secret_scan_catches_inline_keys() -> None:
    assert AWS_KEY_ID.search("value: AKIAIOSFODNN7EXAMPLE")
    assert AWS_SECRET_VALUE.search("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    assert AWS_SECRET_VALUE.search('AWS_SECRET_ACCESS_KEY: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"')
    assert not AWS_SECRET_VALUE.search('--from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY"')


def containers_of(obj: Any) -> list[dict[str, Any]]:
    """Every container (and init container) anywhere in a manifest."""
    found: list[dict[str, Any]] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("containers", "initContainers") and isinstance(v, list):
                found.extend(c for c in v if isinstance(c, dict))
            found.extend(containers_of(v))
    elif isinstance(obj, list):
        for v in obj:
            found.extend(containers_of(v))
    return found


def test_credentials_come_from_a_secret_never_a_literal() -> None:
    manifests = [*kube_objects(), scheduled_template()[1]]
    for c in (c for o in manifests for c in containers_of(o)):
        for env in c.get("env", []):
            if SECRET_ENV.fullmatch(env["name"]):
                assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), env["name"]
    for job in ray_jobs():
        runtime_env = yaml.safe_load(job["spec"].get("runtimeEnvYAML") or "{}")
        assert not any(SECRET_ENV.fullmatch(k) for k in runtime_env.get("env_vars", {}))
    for _, spec in cluster_specs():
        for pod in pod_specs(spec):
            for c in pod["containers"]:
                refs = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
                refs += [e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", [])
                         if "secretKeyRef" in e.get("valueFrom", {})]
                assert refs, f"Ray container {c['name']} gets no credentials from a Secret"
