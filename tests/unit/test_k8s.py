"""deploy/k8s/: valid against the Kubernetes API schemas (offline, kubernetes-validate's
bundled schemas) and consistent with the job file they carry."""

from __future__ import annotations

import copy
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

kubernetes_validate = pytest.importorskip("kubernetes_validate")
yaml = pytest.importorskip("yaml")

from pserver import config as cfg  # noqa: E402

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
VERSION = "1.30.0"  # gRPC probes: 1.27; the pod-index label the pserver id comes from: 1.28


def manifests() -> dict[str, dict[str, Any]]:
    """Every resource of deploy/k8s/*.yaml, by KIND/NAME."""
    out = {}
    for f in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            out[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return out


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test: validation must be offline."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access during validation: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_every_manifest_is_valid_against_the_api_schemas_offline(no_network: None) -> None:
    found = manifests()
    assert set(found) == {"ConfigMap/psrt-job", "PersistentVolumeClaim/psrt-checkpoints",
                          "Service/psrt-pserver", "StatefulSet/psrt-pserver",
                          "Job/psrt-trainer"}
    for name, doc in found.items():
        try:
            kubernetes_validate.validate(doc, VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{name}: {e}") from None


def test_the_validator_rejects_a_broken_manifest(no_network: None) -> None:
    sts = copy.deepcopy(manifests()["StatefulSet/psrt-pserver"])
    del sts["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"]
    with pytest.raises(kubernetes_validate.ValidationError, match="port"):
        kubernetes_validate.validate(sts, VERSION, strict=True)
    sts["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, VERSION, strict=True)


def job_file() -> dict[str, Any]:
    return tomllib.loads(manifests()["ConfigMap/psrt-job"]["data"]["job.toml"])


def test_the_configmap_is_deploys_job_file_with_the_statefulset_dns_names() -> None:
    k8s_job = job_file()
    compose_job = tomllib.loads((ROOT / "deploy" / "job.toml").read_text())
    pservers = k8s_job["job"].pop("pservers")
    compose_job["job"].pop("pservers")
    assert k8s_job == compose_job
    found = manifests()
    sts, svc = found["StatefulSet/psrt-pserver"], found["Service/psrt-pserver"]
    port = svc["spec"]["ports"][0]["port"]
    assert pservers == [f"{sts['metadata']['name']}-{i}.{sts['spec']['serviceName']}:{port}"
                        for i in range(sts["spec"]["replicas"])]
    assert svc["spec"]["clusterIP"] == "None"  # headless: one DNS name per pod
    assert cfg.build(job_file()).num_pservers == sts["spec"]["replicas"]


def test_probes_ports_and_ids_match_the_job() -> None:
    found = manifests()
    pserver = found["StatefulSet/psrt-pserver"]["spec"]["template"]["spec"]["containers"][0]
    port = int(job_file()["job"]["pservers"][0].rpartition(":")[2])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert pserver[probe]["grpc"]["port"] == port
    assert pserver["ports"][0]["containerPort"] == port
    assert pserver["command"][:5] == ["python", "-m", "pserver", "--id", "$(PSERVER_ID)"]
    assert "0.0.0.0" in pserver["command"]
    job = found["Job/psrt-trainer"]["spec"]
    assert job["completionMode"] == "Indexed"
    assert job["completions"] == job["parallelism"] == job_file()["job"]["num_trainers"]
    trainer = job["template"]["spec"]["containers"][0]
    assert trainer["command"][:5] == ["python", "-m", "trainer", "--id",
                                      "$(JOB_COMPLETION_INDEX)"]
    for c in (pserver, trainer):
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert {"/etc/psrt", job_file()["checkpoint"]["checkpoint_dir"]} <= mounts
