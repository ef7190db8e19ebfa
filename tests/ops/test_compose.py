"""compose.yaml against the Compose Specification's JSON schema (vendored from PyPI's
check-jsonschema 0.39.0, `builtin_schemas/vendor/compose-spec.json`, Apache-2.0: no network
at test time), `docker compose config` where that plugin exists, and what the issue asks of
the stack: AOF, healthchecks, a GPU reservation, a CPU profile, commands orcd accepts."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from worker.cli import build_parser

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = Path(__file__).with_name("compose-spec.json")
_VARIABLE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def interpolate(value, env: dict[str, str]):
    """Compose's `${VAR}` / `${VAR:-default}` substitution, on every string of the file."""
    if isinstance(value, str):
        return _VARIABLE.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    return value


@pytest.fixture(scope="module")
def raw():
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def compose(raw):
    return interpolate(raw, {})


def active_services(compose, *profiles: str) -> set[str]:
    """Services `docker compose --profile P up` starts: no profiles, or one of those given."""
    return {name for name, service in compose["services"].items()
            if not service.get("profiles") or set(service["profiles"]) & set(profiles)}


def test_compose_file_validates_against_the_compose_spec(raw, compose):
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    for document in (raw, compose):  # as written and after interpolation
        errors = sorted(validator.iter_errors(document), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_the_schema_check_is_not_vacuous(compose):
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    broken = json.loads(json.dumps(compose))
    broken["services"]["redis"]["healthcheck"]["retries"] = "ten"
    broken["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["gpus"] = 1
    broken["services"]["batch"]["depends_on"]["redis"]["condition"] = "service_ready"
    assert len(list(validator.iter_errors(broken))) >= 3


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker CLI")
def test_docker_compose_config_accepts_the_file():
    version = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if version.returncode != 0:
        pytest.skip(f"no docker compose plugin: {version.stderr.strip() or version.stdout}")
    for profile in ("gpu", "cpu"):
        result = subprocess.run(["docker", "compose", "--profile", profile, "config", "-q"],
                                cwd=ROOT, capture_output=True, text=True,
                                env={**os.environ, "COMPOSE_FILE": "compose.yaml"})
        assert result.returncode == 0, result.stderr


def test_redis_keeps_data_and_reports_health(compose):
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert any(volume.endswith(":/data") for volume in redis["volumes"])
    assert redis["volumes"][0].split(":")[0] in compose["volumes"]


def test_gpu_worker_reserves_a_gpu_and_waits_for_a_healthy_redis(compose):
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["build"]["context"] == "." and (ROOT / "Dockerfile").exists()
    assert any(volume.endswith(":/models:ro") for volume in worker["volumes"])


def test_cpu_profile_runs_the_worker_without_a_gpu(compose):
    assert active_services(compose, "cpu") == {"redis", "worker-cpu", "batch", "gateway"}
    assert active_services(compose, "gpu") == {"redis", "worker", "batch", "gateway"}
    cpu = compose["services"]["worker-cpu"]
    assert "deploy" not in cpu and "torch" in cpu["command"]
    assert cpu["depends_on"]["redis"]["condition"] == "service_healthy"
    assert cpu["build"]["args"]["TORCH_INDEX_URL"].endswith("/cpu")


def test_every_command_is_one_orcd_accepts(compose):
    parser = build_parser()
    commands = {name: service["command"] for name, service in compose["services"].items()
                if name != "redis"}
    assert commands["batch"] == ["batch", "worker"]
    for name, command in commands.items():
        args = parser.parse_args(command)  # argparse exits on an unknown option
        if args.command == "worker":
            assert args.redis  # from $REDIS_URL in the container's environment
            grace = compose["services"][name]["stop_grace_period"]
            assert int(grace.rstrip("s")) > args.grace


def test_gateway_service_publishes_on_localhost_with_keys(compose):
    gateway = compose["services"]["gateway"]
    args = build_parser().parse_args(gateway["command"])
    assert args.command == "gateway" and args.host == "0.0.0.0"  # inside its container
    assert not args.no_auth and args.api_keys_file == "/etc/orcd/api-keys"
    assert gateway["ports"] == [f"127.0.0.1:{args.port}:{args.port}"]
    assert any(volume.endswith(":/etc/orcd/api-keys:ro") for volume in gateway["volumes"])
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"


def test_dockerfile_installs_orcd_on_a_cuda_runtime_base():
    dockerfile = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", dockerfile, re.M).group(1)
    assert base.startswith("nvidia/cuda:") and "-runtime-" in base
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", dockerfile, re.M)
    for package in ("jobs", "worker", "gpu", "loader", "tokenizer", "gateway"):
        assert f"COPY {package} ./{package}" in dockerfile
        assert (ROOT / package / "__init__.py").exists()
    assert 'ENTRYPOINT ["orcd"]' in dockerfile and "VOLUME" in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
