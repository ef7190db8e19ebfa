"""The systemd units pass `systemd-analyze verify` (with ExecStart pointed at this checkout's
`orcd`, since /opt/orcd does not exist here), and say what the issue asks of them."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from worker.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
INSTALLED_ORCD = "/opt/orcd/.venv/bin/orcd"
LOCAL_ORCD = Path(sys.executable).parent / "orcd"


def unit(name: str) -> dict[str, list[str]]:
    """`Section.Key` -> values in order (keys repeat: Environment=), continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (UNITS / name).read_text())
    values: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        values.setdefault(f"{section}.{key}", []).append(value)
    return values


def verify(directory: Path, *names: str) -> subprocess.CompletedProcess:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    return subprocess.run(["systemd-analyze", "verify", "--man=no",
                           *(str(directory / name) for name in names)],
                          capture_output=True, text=True, timeout=60)


def copy_units(directory: Path, orcd: str) -> None:
    for path in UNITS.glob("*.service"):
        (directory / path.name).write_text(path.read_text().replace(INSTALLED_ORCD, orcd))


def test_units_pass_systemd_analyze_verify(tmp_path):
    assert LOCAL_ORCD.exists()
    copy_units(tmp_path, str(LOCAL_ORCD))
    # An instance name makes verify load the template with %i = 0, as `systemctl start` would.
    result = verify(tmp_path, "orcd-worker@0.service", "orcd-batch.service",
                    "orcd-gateway.service")
    assert result.returncode == 0, result.stderr
    # verify exits 0 on unknown keys and bad values (it only warns): no output at all is the bar.
    assert result.stdout + result.stderr == ""


def test_verify_is_not_vacuous(tmp_path):
    """The same check fails for a missing ExecStart binary and warns on an unknown key."""
    copy_units(tmp_path, "/nonexistent/orcd")
    result = verify(tmp_path, "orcd-worker@0.service")
    assert result.returncode != 0 and "/nonexistent/orcd" in result.stderr
    (tmp_path / "typo.service").write_text(
        (UNITS / "orcd-batch.service").read_text().replace(INSTALLED_ORCD, str(LOCAL_ORCD))
        .replace("Restart=", "Restrat="))
    assert "Unknown key 'Restrat'" in verify(tmp_path, "typo.service").stderr


def test_worker_unit_is_a_notify_service_per_gpu():
    worker = unit("orcd-worker@.service")
    assert worker["Service.Type"] == ["notify"] and worker["Service.NotifyAccess"] == ["main"]
    assert "CUDA_VISIBLE_DEVICES=%i" in worker["Service.Environment"]
    assert worker["Service.EnvironmentFile"] == ["/etc/orcd/worker.env"]
    assert worker["Service.Restart"] == ["on-failure"]
    assert worker["Service.KillSignal"] == ["SIGTERM"]
    assert int(worker["Service.WatchdogSec"][0]) >= 10  # heartbeats come every second
    assert worker["Service.User"] == ["orcd"]
    # ExecStart as systemd expands it for instance 0 with the unit's defaults: every option is
    # one `orcd worker` really has (`$VAR` splits into words, `${VAR}` is one word).
    env = dict(line.split("=", 1) for line in worker["Service.Environment"])
    env["ORCD_WORKER_ARGS"] = "--max-jobs 16"
    args = []
    for word in worker["Service.ExecStart"][0].split()[1:]:
        word = word.replace("%i", "0").replace("%H", "host")
        if word.startswith("${"):
            args.append(env[word[2:-1]])
        elif word.startswith("$"):
            args.extend(env[word[1:]].split())
        else:
            args.append(word)
    parsed = build_parser().parse_args(args)
    assert parsed.command == "worker" and parsed.metrics_port == 9200 and parsed.log_json
    assert (parsed.worker_id, parsed.max_jobs, parsed.redis) == (
        "host-gpu0", 16, "redis://localhost:6379/0")


def test_stop_timeout_outlasts_the_grace_period():
    worker = unit("orcd-worker@.service")
    env = dict(line.split("=", 1) for line in worker["Service.Environment"])
    grace = float(env["ORCD_GRACE_S"])
    example = dict(line.split("=", 1) for line in
                   (UNITS / "worker.env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    grace = max(grace, float(example["ORCD_GRACE_S"]))
    assert grace == build_parser().parse_args(["worker"]).grace
    assert float(worker["Service.TimeoutStopSec"][0]) > grace + 10


def test_hardening_keeps_cuda_working():
    worker = unit("orcd-worker@.service")
    for key, value in [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                       ("PrivateTmp", "yes")]:
        assert worker[f"Service.{key}"] == [value]
    assert worker["Service.ReadOnlyPaths"] == ["/var/lib/orcd/models"]
    assert worker["Service.ReadWritePaths"] == ["/var/cache/orcd"]
    # These would hide /dev/nvidia* or forbid the executable memory CUDA/NVRTC need.
    for key in ("PrivateDevices", "DevicePolicy", "DeviceAllow", "MemoryDenyWriteExecute",
                "ProtectClock"):
        assert f"Service.{key}" not in worker, key


def test_batch_unit_runs_the_rq_worker():
    batch = unit("orcd-batch.service")
    assert batch["Service.ExecStart"][0].split()[1:3] == ["batch", "worker"]
    assert batch["Service.EnvironmentFile"] == ["/etc/orcd/worker.env"]
    assert batch["Service.Restart"] == ["on-failure"]


def test_gateway_unit_runs_the_gateway_with_keys_on_localhost():
    gateway = unit("orcd-gateway.service")
    env = dict(line.split("=", 1) for line in gateway["Service.Environment"])
    example = dict(line.split("=", 1) for line in
                   (UNITS / "gateway.env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    for values in (env, {**env, **example}):  # the unit's defaults, then the example's
        args = []
        for word in gateway["Service.ExecStart"][0].split()[1:]:
            word = word.replace("%H", "host")
            if word.startswith("${"):
                args.append(values[word[2:-1]])
            elif word.startswith("$"):
                args.extend(values[word[1:]].split())
            else:
                args.append(word)
        parsed = build_parser().parse_args(args)
        assert parsed.command == "gateway" and parsed.host == "127.0.0.1"
        assert parsed.api_keys_file == "/etc/orcd/api-keys" and not parsed.no_auth
        assert parsed.gateway_id == "host-gateway"
    assert gateway["Service.User"] == ["orcd"] and gateway["Service.Restart"] == ["on-failure"]
