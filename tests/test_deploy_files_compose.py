"""The compose stack, checked offline in a few seconds: docker/compose.yml against the Compose
Specification (and `docker compose config` where docker is installed), its variables (each
with a default, documented, repeated in docker/.env.example) and its wiring (dependencies,
health, volumes, ports, who reaches whom, the optional GPU worker, build contexts).

Linters that are not installed make their test skip with the reason; a skip is not a pass.
Dev tool these tests use: check-jsonschema (ships the compose-spec schema).
"""

from __future__ import annotations

import importlib.resources
import json
import re
import shutil
import subprocess

import pytest
import yaml

from tests.deploy_helpers import DOCKER, ROOT

COMPOSE = DOCKER / "compose.yml"
ENV_EXAMPLE = DOCKER / ".env.example"
DOCKER_README = DOCKER / "README.md"
INIT_SQL = DOCKER / "postgres-init.sql"


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
