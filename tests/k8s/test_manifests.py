"""Every manifest in k8s/ validates strictly against the Kubernetes schemas of every minor version from 1.31 to 1.37;
embedded configs load with the project's own loaders; the pieces that must agree (node counts, service/subdomain,
config mounts, exit statuses and failure policies) agree.

The Kubeflow PyTorchJob and the JobSet are custom resources that the core schemas do not know: the PyTorchJob's
structure is checked here (its ``elasticPolicy`` against the CRD's fields) and its pod template validated as a core
``PodTemplate``; the JobSet is validated against
the OpenAPI schema of the JobSet CRD (vendored, trimmed: ``jobset-v1alpha2.schema.json``) and each of its Job
templates as a batch/v1 Job.
"""
from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

from deepflow.data_pipeline.config import load_config as load_precompute_config
from deepflow.platform.train.config import check_world_sizes
from deepflow.platform.train.config import load_config as load_run_config
from deepflow.platform.train.pod_supervisor import PREEMPTED_EXIT_CODE

K8S_VERSION = "1.37.0"  # the newest; every manifest is also checked against each of K8S_VERSIONS
K8S_VERSIONS = [f"1.{minor}.0" for minor in range(31, 38)]
K8S_DIR = Path(__file__).resolve().parents[2] / "k8s"
MANIFESTS = sorted(K8S_DIR.glob("*.yaml"))
CORE_KINDS = {"ConfigMap", "Service", "Job", "Deployment"}
JOBSET_SCHEMA = Path(__file__).resolve().parent / "jobset-v1alpha2.schema.json"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _by_kind(path: Path, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in _docs(path) if d["kind"] == kind]
    return doc


def _pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "PyTorchJob":
        return [spec["template"] for spec in doc["spec"]["pytorchReplicaSpecs"].values()]
    if doc["kind"] == "JobSet":
        return [rjob["template"]["spec"]["template"] for rjob in doc["spec"]["replicatedJobs"]]
    if doc["kind"] in ("Job", "Deployment"):
        return [doc["spec"]["template"]]
    return []


def test_the_expected_manifests_exist() -> None:
    names = {path.name for path in MANIFESTS}
    assert {"train-xl3t.yaml", "train-xl3t-jobset.yaml", "train-xl3t-pytorchjob.yaml", "train-xl3t-elastic.yaml",
            "precompute.yaml", "eval.yaml", "tensorboard.yaml"} <= names


def test_the_installed_validator_knows_every_checked_version() -> None:
    known = set(all_versions())
    assert set(K8S_VERSIONS) <= known, sorted(set(K8S_VERSIONS) - known)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_strictly(path: Path, version: str) -> None:
    docs = _docs(path)
    assert docs
    for doc in docs:
        if doc["kind"] == "PyTorchJob":
            _check_pytorchjob(doc, version)
        elif doc["kind"] == "JobSet":
            _check_jobset(doc, version)
        else:
            assert doc["kind"] in CORE_KINDS, doc["kind"]
            kubernetes_validate.validate(doc, version, strict=True)


def _strict(schema: Any) -> Any:
    """``schema`` with unknown fields refused (``additionalProperties: false``) wherever it lists properties and
    does not keep unknown fields, as the API server's strict field validation does for a structural schema."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items()}
    keeps_unknown = out.get("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in out and "additionalProperties" not in out and not keeps_unknown:
        out["additionalProperties"] = False
    return out


def _jobset_validator() -> jsonschema.protocols.Validator:
    schema = _strict(json.loads(JOBSET_SCHEMA.read_text()))
    return jsonschema.Draft7Validator(schema)


def _check_jobset(doc: dict[str, Any], version: str = K8S_VERSION) -> None:
    """The JobSet against the CRD's schema; each replicated Job's template as a batch/v1 Job of ``version``."""
    assert doc["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
    errors = sorted(_jobset_validator().iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
    for rjob in doc["spec"]["replicatedJobs"]:
        metadata = {"name": f"{doc['metadata']['name']}-{rjob['name']}-0", **rjob["template"].get("metadata", {})}
        job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": rjob["template"]["spec"]}
        kubernetes_validate.validate(job, version, strict=True)


#: spec.elasticPolicy of the PyTorchJob CRD (kubeflow/training-operator, kubeflow.org/v1 ElasticPolicy), trimmed:
#: ``metrics`` (HPA MetricSpecs) is not used by our manifests and refused here
ELASTIC_POLICY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "minReplicas": {"type": "integer", "format": "int32"},
        "maxReplicas": {"type": "integer", "format": "int32"},
        "rdzvBackend": {"type": "string", "enum": ["c10d", "etcd", "etcd-v2"]},
        "rdzvPort": {"type": "integer", "format": "int32"},
        "rdzvHost": {"type": "string"},
        "rdzvId": {"type": "string"},
        "rdzvConf": {"type": "array", "items": {
            "type": "object", "additionalProperties": False,
            "properties": {"key": {"type": "string"}, "value": {"type": "string"}},
        }},
        "standalone": {"type": "boolean"},
        "nProcPerNode": {"type": "integer", "format": "int32"},
        "maxRestarts": {"type": "integer", "format": "int32"},
    },
}


def _check_elastic_policy(spec: dict[str, Any]) -> None:
    """elasticPolicy against the CRD's fields, and the operator's own rules: min <= max, the Worker replicas within
    them, no Master (the rendezvous is on worker 0), nprocPerNode in one place only."""
    policy = spec["elasticPolicy"]
    errors = list(jsonschema.Draft7Validator(ELASTIC_POLICY_SCHEMA).iter_errors(policy))
    assert not errors, [e.message for e in errors]
    assert 1 <= policy["minReplicas"] <= policy["maxReplicas"]
    assert set(spec["pytorchReplicaSpecs"]) == {"Worker"}
    assert policy["minReplicas"] <= spec["pytorchReplicaSpecs"]["Worker"]["replicas"] <= policy["maxReplicas"]
    assert not ("nProcPerNode" in policy and "nprocPerNode" in spec)


def _check_pytorchjob(doc: dict[str, Any], version: str = K8S_VERSION) -> None:
    assert doc["apiVersion"] == "kubeflow.org/v1"
    spec = doc["spec"]
    assert set(spec) <= {"pytorchReplicaSpecs", "runPolicy", "nprocPerNode", "elasticPolicy"}
    assert str(spec["nprocPerNode"]).isdigit() or spec["nprocPerNode"] in ("auto", "cpu", "gpu")
    replicas = spec["pytorchReplicaSpecs"]
    if "elasticPolicy" in spec:
        _check_elastic_policy(spec)
    else:
        assert set(replicas) <= {"Master", "Worker"} and replicas["Master"]["replicas"] == 1
    for replica in replicas.values():
        assert set(replica) <= {"replicas", "restartPolicy", "template"}
        assert replica["restartPolicy"] in ("Always", "OnFailure", "Never", "ExitCode")
        assert isinstance(replica["replicas"], int) and replica["replicas"] >= 1
        containers = replica["template"]["spec"]["containers"]
        assert "pytorch" in [c["name"] for c in containers], "the operator needs a container named 'pytorch'"
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"},
                        "template": replica["template"]}
        kubernetes_validate.validate(pod_template, version, strict=True)
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


@pytest.mark.parametrize("name", ["train-xl3t.yaml", "train-xl3t-jobset.yaml", "train-xl3t-pytorchjob.yaml",
                                  "train-xl3t-elastic.yaml"])
def test_embedded_run_config_loads_with_the_project_loader(name: str, tmp_path: Path) -> None:
    files = _write_configmap_files(K8S_DIR / name, tmp_path)
    config = load_run_config(files["run.yaml"])
    assert config.model.name == "DeepFlow-XL/2-3T" and config.model.depth == 24
    assert config.checkpoint.resume is True  # a recreated pod continues from the newest checkpoint
    assert config.data.url.startswith("s3://") and config.run.output_dir.startswith("s3://")
    assert config.eval.extractor == "inception"
    if name in ("train-xl3t.yaml", "train-xl3t-jobset.yaml"):
        (template,) = _pod_templates(_by_kind(K8S_DIR / name, "Job" if name == "train-xl3t.yaml" else "JobSet"))
        env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}
        world = int(env["NNODES"]) * int(env["GPUS_PER_NODE"])
    else:
        job = _by_kind(K8S_DIR / name, "PyTorchJob")
        world = int(job["spec"]["nprocPerNode"]) * sum(
            r["replicas"] for r in job["spec"]["pytorchReplicaSpecs"].values())
    assert config.per_rank_batch_size(world) * world == config.data.global_batch_size
    if name == "train-xl3t-elastic.yaml":
        check_world_sizes(config, _elastic_world_sizes(_by_kind(K8S_DIR / name, "PyTorchJob")))


def _elastic_world_sizes(job: dict[str, Any]) -> list[int]:
    policy = job["spec"]["elasticPolicy"]
    return [n * int(job["spec"]["nprocPerNode"]) for n in range(policy["minReplicas"], policy["maxReplicas"] + 1)]


def test_elastic_pytorchjob_pieces_agree(tmp_path: Path) -> None:
    """The elastic job: torchrun's elastic agent through k8s_env (tini, non-root), the shared store disabled, the pod
    IP advertised, bounded rendezvous waits, a grace period above the agent's 30 s, and an automatic stream count
    that every world size of the range divides (as jobs/train.py resolves it for a 1,282-shard dataset)."""
    from deepflow.artifacts import Manifest, ShardEntry
    from deepflow.platform.train.config import resolve_model_for_dataset
    from deepflow.platform.train.pod_topology import elastic_command, elastic_launch, pod_topology

    path = K8S_DIR / "train-xl3t-elastic.yaml"
    job = _by_kind(path, "PyTorchJob")
    policy, worker = job["spec"]["elasticPolicy"], job["spec"]["pytorchReplicaSpecs"]["Worker"]
    assert policy["rdzvBackend"] == "c10d" and policy["maxRestarts"] > 0
    assert policy["minReplicas"] < policy["maxReplicas"]
    assert worker["restartPolicy"] == "OnFailure"
    pod = worker["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > 30
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"]["value"] == "1"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    command = container["command"]
    assert command[:7] == ["tini", "--", "python", "-m", "deepflow.platform.train.k8s_env", "--launcher", "torchrun"]
    assert "--local-addr=$(POD_IP)" in command
    assert {p["containerPort"] for p in container["ports"]} == {policy["rdzvPort"]}
    # what the operator sets -> the torchrun command k8s_env runs
    operator_env = {"PET_NNODES": f"{policy['minReplicas']}:{policy['maxReplicas']}",
                    "PET_RDZV_ENDPOINT": f"{job['metadata']['name']}-worker-0:{policy['rdzvPort']}",
                    "PET_RDZV_BACKEND": "c10d", "PET_MAX_RESTARTS": str(policy["maxRestarts"]),
                    "PET_NPROC_PER_NODE": job["spec"]["nprocPerNode"], "POD_IP": "10.0.0.5"}
    topology = pod_topology(operator_env)
    timeout = int(command[command.index("--join-timeout-s") + 1])
    elastic = elastic_launch(topology, operator_env, join_timeout_s=timeout)
    assert elastic is not None
    torchrun = elastic_command(topology, elastic, command[command.index("--") + 1:])
    assert torchrun[:4] == ["torchrun", "--nnodes=2:4", "--nproc-per-node=8", "--rdzv-backend=c10d"]
    assert f"--rdzv-endpoint=deepflow-xl3t-el-worker-0:{policy['rdzvPort']}" in torchrun
    assert "--local-addr=10.0.0.5" in torchrun and f"join_timeout={timeout}" in " ".join(torchrun)
    config = load_run_config(_write_configmap_files(path, tmp_path)["run.yaml"])
    assert pod["volumes"][1]["configMap"]["name"] == _by_kind(path, "ConfigMap")["metadata"]["name"]
    manifest = Manifest(kind="vae", shape=[4, 32, 32], num_classes=1000,
                        shards=[ShardEntry(name=f"s{i}.tar", num_samples=1000) for i in range(1282)])
    resolved = resolve_model_for_dataset(config, manifest, _elastic_world_sizes(job))
    assert all(resolved.data.streams % size == 0 for size in _elastic_world_sizes(job)), resolved.data.streams


def test_elastic_policy_schema_rejects_a_misspelled_field() -> None:
    job = copy.deepcopy(_by_kind(K8S_DIR / "train-xl3t-elastic.yaml", "PyTorchJob"))
    job["spec"]["elasticPolicy"]["minReplica"] = 1  # typo of "minReplicas"
    with pytest.raises(AssertionError):
        _check_pytorchjob(job)


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
    # a preempted pod (exit 75 from k8s_env) and a disrupted one are ignored: recreated, not counted, index not done
    command = container["command"]
    preempted = int(command[command.index("--preempted-exit-code") + 1])
    assert preempted == PREEMPTED_EXIT_CODE == 75
    ignored = [r for r in spec["podFailurePolicy"]["rules"] if r["action"] == "Ignore"]
    assert [r["onExitCodes"] for r in ignored if "onExitCodes" in r] == [
        {"containerName": container["name"], "operator": "In", "values": [preempted]}]
    assert [r["onPodConditions"] for r in ignored if "onPodConditions" in r] == [
        [{"type": "DisruptionTarget", "status": "True"}]]
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


def _jobset_parts() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    jobset = _by_kind(K8S_DIR / "train-xl3t-jobset.yaml", "JobSet")
    (rjob,) = jobset["spec"]["replicatedJobs"]
    job_spec = rjob["template"]["spec"]
    return jobset, rjob, job_spec, job_spec["template"]["spec"]["containers"][0]


def _pod_failure_message(rule_index: int, exit_code: int | None = None) -> str:
    """The Job's failure message when podFailurePolicy rule ``rule_index`` (FailJob) fired, as the Kubernetes Job
    controller writes it (pkg/controller/job/pod_failure_policy.go)."""
    if exit_code is None:
        return f"Pod ml/p-0 has condition DisruptionTarget matching FailJob rule at index {rule_index}"
    return (f"Container train for pod ml/p-0 failed with exit code {exit_code} matching FailJob rule at index "
            f"{rule_index}")


def _jobset_action(jobset: dict[str, Any], reason: str, message: str) -> str:
    """The JobSet failurePolicy's action for a failed child Job (first matching rule; default RestartJobSet)."""
    for rule in jobset["spec"]["failurePolicy"]["rules"]:
        reasons, patterns = rule.get("onJobFailureReasons", []), rule.get("onJobFailureMessagePatterns", [])
        if (not reasons or reason in reasons) and (not patterns or any(re.search(p, message) for p in patterns)):
            return rule["action"]
    return "RestartJobSet"


def test_jobset_runs_the_indexed_job_pods_and_restarts_the_group() -> None:
    jobset, rjob, job_spec, container = _jobset_parts()
    indexed = _by_kind(K8S_DIR / "train-xl3t.yaml", "Job")
    indexed_container = indexed["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == indexed_container["command"]
    assert container["resources"] == indexed_container["resources"]
    env = {e["name"]: e for e in container["env"]}
    # one replica of an Indexed Job: JOB_COMPLETION_INDEX is the node rank
    assert rjob["replicas"] == 1 and job_spec["completionMode"] == "Indexed"
    assert int(env["NNODES"]["value"]) == job_spec["completions"] == job_spec["parallelism"]
    assert int(env["GPUS_PER_NODE"]["value"]) == container["resources"]["limits"]["nvidia.com/gpu"]
    # the network: JobSet's headless Service is the subdomain; the coordinator (pod 0) is the master
    network = jobset["spec"]["network"]
    assert network["enableDNSHostnames"] is True and network["subdomain"] == env["HEADLESS_SERVICE"]["value"]
    assert jobset["spec"]["coordinator"] == {"replicatedJob": rjob["name"], "jobIndex": 0, "podIndex": 0}
    assert env["MASTER_ADDR"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['jobset.sigs.k8s.io/coordinator']")
    # the config: the same run as the Indexed Job, from this manifest's own ConfigMap
    configmap = _by_kind(K8S_DIR / "train-xl3t-jobset.yaml", "ConfigMap")
    assert configmap["data"]["run.yaml"] == _by_kind(K8S_DIR / "train-xl3t.yaml", "ConfigMap")["data"]["run.yaml"]
    volumes = {v["name"]: v for v in job_spec["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]
    assert {"secretRef": {"name": "deepflow-object-store"}} in container["envFrom"]
    # every pod failure fails the Job: the JobSet decides
    assert job_spec["backoffLimit"] == 0 and job_spec["template"]["spec"]["restartPolicy"] == "Never"
    assert jobset["spec"]["failurePolicy"]["maxRestarts"] > 0


@pytest.mark.parametrize(
    ("rule_index", "exit_code", "action"),
    [
        (0, 2, "FailJobSet"),  # invalid config / pod environment
        (0, 3, "FailJobSet"),  # non-finite loss
        (1, PREEMPTED_EXIT_CODE, "RestartJobSetAndIgnoreMaxRestarts"),  # preempted, checkpoint committed
        (2, None, "RestartJobSetAndIgnoreMaxRestarts"),  # DisruptionTarget
    ],
)
def test_jobset_failure_policy_by_pod_failure_rule(rule_index: int, exit_code: int | None, action: str) -> None:
    jobset, _, job_spec, container = _jobset_parts()
    rules = job_spec["podFailurePolicy"]["rules"]
    rule = rules[rule_index]
    assert rule["action"] == "FailJob"
    if exit_code is None:
        assert rule["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    else:
        assert rule["onExitCodes"]["containerName"] == container["name"] and exit_code in rule["onExitCodes"]["values"]
        assert all(exit_code not in r.get("onExitCodes", {}).get("values", []) for r in rules[:rule_index])
    assert _jobset_action(jobset, "PodFailurePolicy", _pod_failure_message(rule_index, exit_code)) == action


def test_jobset_counts_other_failures_against_max_restarts() -> None:
    jobset, *_ = _jobset_parts()
    message = "Job has reached the specified backoff limit"
    assert _jobset_action(jobset, "BackoffLimitExceeded", message) == "RestartJobSet"
    names = [rule["name"] for rule in jobset["spec"]["failurePolicy"]["rules"]]
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?", name) for name in names)  # the CRD's rule


def test_jobset_pod_environment_maps_to_the_coordinator_as_master() -> None:
    """What JobSet gives pod i: the Job <jobset>-<replicatedJob>-0, its index, the coordinator annotation; the
    hostname <job>-<i>.<subdomain> (the CRD's network.enableDNSHostnames description)."""
    from deepflow.platform.train.pod_topology import hostfile_text, pod_topology

    jobset, rjob, job_spec, container = _jobset_parts()
    name, subdomain = jobset["metadata"]["name"], jobset["spec"]["network"]["subdomain"]
    job_name = f"{name}-{rjob['name']}-0"
    resolved = {
        "metadata.annotations['jobset.sigs.k8s.io/coordinator']": f"{job_name}-0.{subdomain}",
        "metadata.labels['batch.kubernetes.io/job-name']": job_name,
        "metadata.namespace": "research",
    }
    env = {"JOB_COMPLETION_INDEX": "2"}
    for item in container["env"]:
        env[item["name"]] = item["value"] if "value" in item else resolved[item["valueFrom"]["fieldRef"]["fieldPath"]]
    topology = pod_topology(env)
    assert (topology.node_rank, topology.world_size) == (2, job_spec["completions"] * 8)
    assert topology.master_addr == "deepflow-xl3t-js-node-0-0.deepflow-xl3t-js"
    assert hostfile_text(topology).splitlines()[3] == (
        "deepflow-xl3t-js-node-0-3.deepflow-xl3t-js.research.svc.cluster.local slots=8")


def test_jobset_strict_schema_rejects_a_misspelled_field() -> None:
    jobset = copy.deepcopy(_by_kind(K8S_DIR / "train-xl3t-jobset.yaml", "JobSet"))
    jobset["spec"]["failurePolicy"]["maxRestart"] = 3  # typo of "maxRestarts"
    with pytest.raises(AssertionError, match="maxRestart"):
        _check_jobset(jobset)
    jobset = copy.deepcopy(_by_kind(K8S_DIR / "train-xl3t-jobset.yaml", "JobSet"))
    jobset["spec"]["failurePolicy"]["rules"][0]["action"] = "FailJobset"  # not in the CRD's enum
    with pytest.raises(AssertionError, match="FailJobset"):
        _check_jobset(jobset)
    jobset = copy.deepcopy(_by_kind(K8S_DIR / "train-xl3t-jobset.yaml", "JobSet"))
    jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        _check_jobset(jobset)


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
