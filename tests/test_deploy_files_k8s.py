"""The Prefect Kubernetes work-pool template (deploy/k8s/), checked offline: accepted by the
Prefect server's schema and shaped like Prefect's default template, job variables validated
against it, and the job it renders (GPUs, env, service account, the images' user).
prefect-kubernetes, when installed, renders it for real; without it that test skips with the
reason."""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import uuid

import pytest

from tests.deploy_helpers import IMAGE_UID, ROOT

K8S_TEMPLATE = ROOT / "deploy" / "k8s" / "work-pool-job-template.json"


# ── Kubernetes work-pool template ─────────────────────────────────────────────────────────────
@pytest.fixture(scope="module")
def template() -> dict:
    return json.loads(K8S_TEMPLATE.read_text())


def _defaults(template: dict) -> dict:
    props = template["variables"]["properties"]
    return {k: v["default"] for k, v in props.items() if "default" in v}


def _render(template: dict, values: dict) -> dict:
    from prefect.utilities.templating import apply_values

    return apply_values(template["job_configuration"], {**_defaults(template), **values})


def test_k8s_template_is_accepted_by_the_prefect_server_schema(template):
    from prefect.server.schemas.actions import WorkPoolCreate

    # the server's own check: every {{ placeholder }} is a declared variable
    WorkPoolCreate(name="posttrain-k8s", type="kubernetes", base_job_template=template)
    # shaped like Prefect's default Kubernetes template (bundled with prefect): nothing the
    # Kubernetes worker reads is missing
    ref = importlib.resources.files("prefect.server.api.collections_data")
    metadata = json.loads((ref / "views" / "aggregate-worker-metadata.json").read_text())
    default = metadata["prefect-kubernetes"]["kubernetes"]["default_base_job_configuration"]
    assert set(default["job_configuration"]) <= set(template["job_configuration"])
    assert set(default["variables"]["properties"]) <= set(template["variables"]["properties"])


def test_k8s_job_variables_are_checked_against_the_template(template):
    from prefect.utilities.schema_tools import ValidationError, validate

    schema = template["variables"]
    validate(_defaults(template), schema, raise_on_error=True, ignore_required=True)
    validate({"gpu_count": 8, "image": "r/posttrain/training-worker:1"}, schema,
             raise_on_error=True, ignore_required=True)  # fmt: skip
    for bad in ({"gpu_count": "eight"}, {"gpu_count": -1}, {"image_pull_policy": "Sometimes"}):
        with pytest.raises(ValidationError):
            validate(bad, schema, raise_on_error=True, ignore_required=True)


def test_k8s_job_renders_with_gpus_env_and_service_account(template):
    cpu = _render(template, {})
    gpu = _render(template, {"gpu_count": 8, "image": "r/posttrain/training-worker:1"})
    for job, gpus in ((cpu, 0), (gpu, 8)):
        manifest = job["job_manifest"]
        assert manifest["kind"] == "Job" and manifest["metadata"]["namespace"] == "posttrain"
        pod = manifest["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == "posttrain-flow-runner"
        assert pod["securityContext"]["runAsUser"] == IMAGE_UID  # the images' USER
        assert pod["securityContext"]["runAsNonRoot"] is True
        (container,) = pod["containers"]
        assert container["command"] == ["env"]  # the worker's args run whatever the ENTRYPOINT
        res = container["resources"]
        assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == gpus
        assert container["envFrom"][0]["secretRef"] == {"name": "posttrain-llm-keys",
                                                        "optional": True}  # fmt: skip
        assert {m["mountPath"] for m in container["volumeMounts"]} == {"/dev/shm", "/data/runs"}
        assert job["env"]["PREFECT_API_URL"].endswith(":4200/api")
        assert job["env"]["MLFLOW_TRACKING_URI"].startswith("http://mlflow.")
    assert gpu["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["image"] == \
        "r/posttrain/training-worker:1"
    assert cpu["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["image"] == \
        "posttrain/flow-runner:latest"


def test_k8s_template_through_the_kubernetes_worker(template):
    """prefect-kubernetes' own job configuration: required Job paths, env as a list, command."""
    if importlib.util.find_spec("prefect_kubernetes") is None:
        pytest.skip("template NOT rendered by the Kubernetes worker: prefect-kubernetes is not "
                    "installed (pip install prefect-kubernetes==0.8.0); the checks above ran")
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    config = KubernetesWorkerJobConfiguration(**_render(template, {"gpu_count": 2}))
    config.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), name="x", flow_id=uuid.uuid4()))
    (container,) = config.job_manifest["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.posttrain.svc.cluster.local:5000"
    assert container["args"] == ["prefect", "flow-run", "execute"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
