"""Every manifest in k8s/ validates strictly against a current Kubernetes schema; embedded configs load with the
project's own loaders; the pieces that must agree (node counts, service/subdomain, config mounts) agree.

The Kubeflow PyTorchJob is a custom resource that the core schemas do not know: its structure is checked here
and its pod template is validated as a core ``PodTemplate``.
"""
from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from deepflow.data_pipeline.config import load_config as load_precompute_config
from deepflow.platform.train.config import load_config as load_run_config

K8S_VERSION = "1.37.0"
K8S_DIR = Path(__file__).resolve().parents[2] / "k8s"
MANIFESTS = sorted(K8S_DIR.glob("*.yaml"))
CORE_KINDS = {"ConfigMap", "Service", "Job", "Deployment"}


def _docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _by_kind(path: Path, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in _docs(path) if d["kind"] == kind]
    return doc


def _pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "PyTorchJob":
        return [spec["template"] for spec in doc["spec"]["pytorchReplicaSpecs"].values()]
    if doc["kind"] in ("Job", "Deployment"):
        return [doc["spec"]["template"]]
    return []


def test_the_expected_manifests_exist() -> None:
    names = {path.name for path in MANIFESTS}
    assert {"train-xl3t.yaml", "train-xl3t-pytorchjob.yaml", "precompute.yaml", "eval.yaml",
            "tensorboard.yaml"} <= names


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_strictly(path: Path) -> None:
    docs = _docs(path)
    assert docs
    for doc in docs:
        if doc["kind"] == "PyTorchJob":
            _check_pytorchjob(doc)
            continue
        assert doc["kind"] in CORE_KINDS, doc["kind"]
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _check_pytorchjob(doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == "kubeflow.org/v1"
    spec = doc["spec"]
    assert set(spec) <= {"pytorchReplicaSpecs", "runPolicy", "nprocPerNode", "elasticPolicy"}
    assert str(spec["nprocPerNode"]).isdigit() or spec["nprocPerNode"] in ("auto", "cpu", "gpu")
    replicas = spec["pytorchReplicaSpecs"]
    assert set(replicas) <= {"Master", "Worker"} and replicas["Master"]["replicas"] == 1
    for replica in replicas.values():
        assert set(replica) <= {"replicas", "restartPolicy", "template"}
        assert replica["restartPolicy"] in ("Always", "OnFailure", "Never", "ExitCode")
        assert isinstance(replica["replicas"], int) and replica["replicas"] >= 1
        containers = replica["template"]["spec"]["containers"]
        assert "pytorch" in [c["name"] for c in containers], "the operator needs a container named 'pytorch'"
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"},
                        "template": replica["template"]}
        kubernetes_validate.validate(pod_template, K8S_VERSION, strict=True)
    assert set(spec["runPolicy"]) <= {"cleanPodPolicy", "backoffLimit", "activeDeadlineSeconds",
                                      "ttlSecondsAfterFinished", "schedulingPolicy", "suspend", "managedBy"}


def test_strict_validation_rejects_a_misspelled_field() -> None:
    job = copy.deepcopy(_by_kind(K8S_DIR / "train-xl3t.yaml", "Job"))
    job["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # typo of "resources"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_pods_are_non_root_and_cannot_escalate(path: Path) -> None:
    for doc in _docs(path):
        for template in _pod_templates(doc):
            pod = template["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
            for container in pod["containers"] + pod.get("initContainers", []):
                assert container["securityContext"]["allowPrivilegeEscalation"] is False, container["name"]
                assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
                for env in container.get("env", []):
                    assert not any(word in env["name"] for word in ("SECRET", "PASSWORD", "TOKEN")) or "valueFrom" in env


def _write_configmap_files(path: Path, tmp_path: Path) -> dict[str, Path]:
    files = {}
    for doc in _docs(path):
        if doc["kind"] == "ConfigMap":
            for key, text in doc["data"].items():
                files[key] = tmp_path / f"{doc['metadata']['name']}-{key}"
                files[key].write_text(text)
    return files


@pytest.mark.parametrize("name", ["train-xl3t.yaml", "train-xl3t-pytorchjob.yaml"])
def test_embedded_run_config_loads_with_the_project_loader(name: str, tmp_path: Path) -> None:
    files = _write_configmap_files(K8S_DIR / name, tmp_path)
    config = load_run_config(files["run.yaml"])
    assert config.model.name == "DeepFlow-XL/2-3T" and config.model.depth == 24
    assert config.checkpoint.resume is True  # a recreated pod continues from the newest checkpoint
    assert config.data.url.startswith("s3://") and config.run.output_dir.startswith("s3://")
    assert config.eval.extractor == "inception"
    if name == "train-xl3t.yaml":
        job = _by_kind(K8S_DIR / name, "Job")
        env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
        world = int(env["NNODES"]) * int(env["GPUS_PER_NODE"])
    else:
        job = _by_kind(K8S_DIR / name, "PyTorchJob")
        world = int(job["spec"]["nprocPerNode"]) * sum(
            r["replicas"] for r in job["spec"]["pytorchReplicaSpecs"].values())
    assert config.per_rank_batch_size(world) * world == config.data.global_batch_size


def test_embedded_precompute_config_loads_and_matches_the_job(tmp_path: Path) -> None:
    files = _write_configmap_files(K8S_DIR / "precompute.yaml", tmp_path)
    config = load_precompute_config(files["precompute.yaml"])
    job = _by_kind(K8S_DIR / "precompute.yaml", "Job")
    assert job["spec"]["completionMode"] == "Indexed"
    assert config.slices == job["spec"]["completions"] == job["spec"]["parallelism"]
    assert config.encoder.kind == "vae" and config.preprocess.resolution == 256


def test_train_job_pieces_agree() -> None:
    path = K8S_DIR / "train-xl3t.yaml"
    job, service, configmap = _by_kind(path, "Job"), _by_kind(path, "Service"), _by_kind(path, "ConfigMap")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert spec["completionMode"] == "Indexed"
    assert int(env["NNODES"]["value"]) == spec["completions"] == spec["parallelism"]
    assert int(env["GPUS_PER_NODE"]["value"]) == container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert service["spec"]["clusterIP"] == "None"
    assert pod["subdomain"] == service["metadata"]["name"] == env["HEADLESS_SERVICE"]["value"]
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    assert pod["restartPolicy"] == "Never" and spec["backoffLimit"] > 0
    (fail_rule,) = [r for r in spec["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
    assert fail_rule["onExitCodes"]["containerName"] == container["name"]
    assert set(fail_rule["onExitCodes"]["values"]) == {2, 3}  # jobs/train.py: invalid config, non-finite loss
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["dshm"] == "/dev/shm"
    assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]
    command = container["command"]
    config_path = command[command.index("--config") + 1]
    assert config_path == f"{mounts['config']}/run.yaml" and "run.yaml" in configmap["data"]
    assert command[:7] == ["tini", "--", "python", "-m", "deepflow.platform.train.k8s_env", "--launcher", "deepspeed"]
    assert {"secretRef": {"name": "deepflow-object-store"}} in container["envFrom"]


def test_eval_job_samples_then_evaluates_the_same_batch() -> None:
    job = _by_kind(K8S_DIR / "eval.yaml", "Job")
    pod = job["spec"]["template"]["spec"]
    (sampler,), (evaluator,) = pod["initContainers"], pod["containers"]
    sample_cmd, eval_cmd = sampler["command"], evaluator["command"]
    assert "jobs/sample.py" in sample_cmd and "jobs/evaluate.py" in eval_cmd
    out = sample_cmd[sample_cmd.index("--out") + 1]
    assert eval_cmd[eval_cmd.index("--samples") + 1] == f"{out}/samples.npz"
    assert sample_cmd[sample_cmd.index("--num-samples") + 1] == "50000"
    # the commands parse with the jobs' own argument parsers
    import importlib.util

    for script, command in (("sample.py", sample_cmd), ("evaluate.py", eval_cmd)):
        spec = importlib.util.spec_from_file_location(script, K8S_DIR.parent / "jobs" / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.build_parser().parse_args(command[command.index(f"jobs/{script}") + 1:])


def test_tensorboard_reads_the_run_log_url(tmp_path: Path) -> None:
    deployment = _by_kind(K8S_DIR / "tensorboard.yaml", "Deployment")
    service = _by_kind(K8S_DIR / "tensorboard.yaml", "Service")
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    logdir = command[command.index("--logdir") + 1]
    files = _write_configmap_files(K8S_DIR / "train-xl3t.yaml", tmp_path)
    assert logdir == load_run_config(files["run.yaml"]).tensorboard_url
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert shlex.join(command).startswith("tini -- tensorboard ")


# --------------------------------------------------------------------------------------------------- Dockerfile
REPO = K8S_DIR.parent


def _dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile as stages of (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        pending += raw.rstrip().removesuffix("\\") + " " if raw.rstrip().endswith("\\") else raw
        if not raw.rstrip().endswith("\\"):
            lines.append(pending.strip())
            pending = ""
    stages: list[list[tuple[str, str]]] = [[]]
    for line in lines:
        instruction, _, arguments = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), " ".join(arguments.split())))
    return stages


def _args(stage: list[tuple[str, str]], instruction: str) -> list[str]:
    return [arguments for name, arguments in stage if name == instruction]


def test_dockerfile_is_multi_stage_on_a_runtime_base() -> None:
    preamble, *stages = _dockerfile_stages()
    assert len(stages) >= 2, "a builder stage and a runtime stage"
    builder, runtime = stages[0], stages[-1]
    assert _args(builder, "FROM")[0].endswith(" AS builder")
    defaults = dict(arguments.split("=", 1) for arguments in _args(preamble, "ARG") if "=" in arguments)
    for stage in stages:
        base = _args(stage, "FROM")[0].split()[0]
        image = defaults.get(base.removeprefix("${").removesuffix("}"), base)
        assert "devel" not in image, f"{image}: a runtime base (torch wheels carry the CUDA runtime), no toolkit"
    # the builder builds the venv (torch, DeepSpeed against it, the package with every extra), pinned
    runs = " ".join(_args(builder, "RUN"))
    assert "-c constraints.txt torch torchvision" in runs and "--no-build-isolation deepspeed" in runs
    assert 'pip install -c constraints.txt ".[all]"' in runs
    # the runtime stage takes the venv, not the compilers' stage
    assert any(arguments.startswith("--from=builder /opt/venv") for arguments in _args(runtime, "COPY"))
    assert "build-essential" not in " ".join(_args(runtime, "RUN"))


def test_dockerfile_runs_the_job_under_tini_as_a_non_root_user() -> None:
    *_, runtime = _dockerfile_stages()
    assert "tini" in " ".join(_args(runtime, "RUN")).split()  # apt-get install ... tini ...
    (entrypoint,) = _args(runtime, "ENTRYPOINT")
    assert json.loads(entrypoint) == ["tini", "--"]
    users = _args(runtime, "USER")
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert json.loads(_args(runtime, "CMD")[-1])[0] == "deepflow"  # the console script is on PATH


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_the_image_holds_what_the_manifests_run(path: Path) -> None:
    """Every ``jobs/<x>.py`` a manifest runs (relative to its workingDir) is copied there by the runtime stage."""
    *_, runtime = _dockerfile_stages()
    workdir = _args(runtime, "WORKDIR")[-1]
    copies = {arguments.split()[-1].replace("./", f"{workdir}/").rstrip("/"): arguments.split()[0]
              for arguments in _args(runtime, "COPY") if not arguments.startswith("--from")}
    assert copies.get(f"{workdir}/jobs") == "jobs" and copies.get(f"{workdir}/configs") == "deepflow/configs"
    for doc in _docs(path):
        for template in _pod_templates(doc):
            for container in template["spec"]["containers"] + template["spec"].get("initContainers", []):
                scripts = [arg for arg in container["command"] if arg.startswith("jobs/")]
                for script in scripts:
                    assert container.get("workingDir", workdir) == workdir, container["name"]
                    assert (REPO / script).is_file(), script


def test_dockerignore_keeps_the_build_inputs() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    ignored = {line.strip() for line in lines if line.strip() and not line.startswith("#")}  # root-relative
    assert {".venv", ".git", "runs", "tests"} <= ignored
    for stage in _dockerfile_stages()[1:]:
        for arguments in _args(stage, "COPY"):
            if arguments.startswith("--from"):
                continue
            for source in arguments.split()[:-1]:
                assert (REPO / source).exists(), source
                parts = Path(source).parts
                prefixes = {"/".join(parts[: i + 1]) for i in range(len(parts))}
                assert not prefixes & ignored, f"{source} is excluded by .dockerignore"


def test_every_pod_command_runs_under_tini() -> None:
    """A pod's ``command`` replaces the image's ENTRYPOINT: each starts with tini so SIGTERM reaches the job."""
    commands = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for document in _docs(path):
            for template in _pod_templates(document):
                for container in template["spec"]["containers"]:
                    commands.append((path.name, container.get("command")))
    assert commands and all(command[:2] == ["tini", "--"] for _, command in commands if command), commands
