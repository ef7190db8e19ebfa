"""Redis Sentinel failover under load, with real processes on loopback: a primary, a replica,
three sentinels and one `orcd worker` on a `redis+sentinel://` URL. The primary is killed
while 20 jobs run; the worker follows the new primary, and the client re-submits every job
without a `done` under its own `job_id` (replication is asynchronous: the last writes before
the failover may be gone). Every job then ends with exactly one `done`."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from jobs import OrcdClient
from jobs.keys import Keys
from jobs.redis_url import connect, parse_sentinel_url
from tests.redis_server import free_port
from tests.worker.workers import WorkerProcess

pytestmark = pytest.mark.slow
KEYS = Keys()
SERVICE = "orcdprimary"


def _start(args: list[str], port: int) -> subprocess.Popen:
    process = subprocess.Popen([shutil.which("redis-server"), *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            if redis.Redis(port=port).ping():
                return process
        except redis.ConnectionError:
            assert time.monotonic() < deadline, f"redis process on {port} did not start"
            time.sleep(0.05)


@pytest.fixture
def sentinel_cluster(tmp_path: Path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    processes: dict[str, subprocess.Popen] = {}
    primary, replica = free_port(), free_port()
    base = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    try:
        processes["primary"] = _start(["--port", str(primary), "--dir", str(tmp_path), *base],
                                      primary)
        processes["replica"] = _start(["--port", str(replica), "--dir", str(tmp_path), *base,
                                       "--replicaof", "127.0.0.1", str(primary)], replica)
        sentinels = []
        for i in range(3):
            port = free_port()
            conf = tmp_path / f"sentinel{i}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {primary} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 4000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            processes[f"sentinel{i}"] = _start([str(conf), "--sentinel"], port)
            sentinels.append(port)
        url = "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in sentinels) + f"/{SERVICE}/0"
        yield url, processes, primary, replica
    finally:
        for process in processes.values():
            process.kill()
            process.wait(10)


def test_sentinel_urls_parse_and_malformed_ones_are_refused():
    parsed = parse_sentinel_url("redis+sentinel://u:p%40ss@h1:26379,h2:26380/svc/3")
    assert parsed.hosts == (("h1", 26379), ("h2", 26380)) and parsed.service == "svc"
    assert (parsed.db, parsed.username, parsed.password, parsed.ssl) == (3, "u", "p@ss", False)
    assert parse_sentinel_url("rediss+sentinel://h:1/svc").ssl
    for bad in ("redis+sentinel://h:1", "redis+sentinel://h/svc", "redis+sentinel://h:1/s/x"):
        with pytest.raises(Exception, match="Sentinel URL"):
            parse_sentinel_url(bad)


def test_failover_while_jobs_run_every_job_ends_with_one_done(sentinel_cluster, tmp_path):
    url, processes, primary, replica = sentinel_cluster
    worker = WorkerProcess(url, "ws", tmp_path, "--max-jobs", "20")
    try:
        worker.wait_ready()
        client = OrcdClient(connection=connect(url))
        jobs = [client.submit("Once upon a time", max_tokens=24, temperature=0,
                              job_id=f"failover-{i}") for i in range(20)]
        deadline = time.monotonic() + 120
        while not any(client.redis.xlen(KEYS.out(job_id)) > 2 for job_id in jobs):
            assert time.monotonic() < deadline, worker.log()
            time.sleep(0.05)
        time.sleep(0.5)  # the replica has what the primary had a moment ago
        processes["primary"].kill()
        processes["primary"].wait(10)
        sentinel = redis.Redis(port=int(url.split(",")[0].rsplit(":", 1)[1]))
        deadline = time.monotonic() + 60
        while int(sentinel.sentinel_get_master_addr_by_name(SERVICE)[1]) != replica:
            assert time.monotonic() < deadline, "no failover"
            time.sleep(0.1)
        # The client re-submits whatever has no `done` on the new primary, under the same id:
        # a job the worker already answered or is running is only acknowledged.
        for job_id in jobs:
            for _ in range(50):
                try:
                    events = client.redis.xrange(KEYS.out(job_id))
                    break
                except redis.ConnectionError:
                    time.sleep(0.2)
            if not any(f[b"event"] == b"done" for _, f in events):
                client.submit("Once upon a time", max_tokens=24, temperature=0, job_id=job_id)
        texts = {client.wait(job_id, timeout=180).text for job_id in jobs}
        assert len(texts) == 1  # greedy: every job, resumed or recomputed, has the same answer
        for job_id in jobs:
            finals = [f[b"event"] for _, f in client.redis.xrange(KEYS.out(job_id))
                      if f[b"event"] in (b"done", b"error")]
            assert finals == [b"done"], (job_id, finals)
        assert "Redis" in worker.log()  # it saw the primary go and came back
    finally:
        worker.stop()
