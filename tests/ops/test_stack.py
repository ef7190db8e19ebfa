"""The whole stack on a private redis-server: an `orcd worker` subprocess with
`--metrics-port` and a NOTIFY_SOCKET, a 50-item batch submitted through `orcd batch submit`
and run by `orcd batch worker --burst` (RQ), results and progress read back through the CLI;
the worker's READY / WATCHDOG / STOPPING datagrams on the way."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from jobs import OrcdClient
from jobs.keys import Keys
from tests.redis_server import RedisServer, free_port
from tests.worker.workers import WorkerProcess

# One worker process serves the module, whose last test stops it: one pytest-xdist worker.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("stack")]
KEYS = Keys()
MODEL = "smollm2-135m"
BAD_INDEX = 17
ITEMS = 50


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    directory = tmp_path_factory.mktemp("stack")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(directory / "notify.sock"))
    notify.settimeout(120)
    server = RedisServer(directory).start()
    port = free_port()
    previous = os.environ.get("NOTIFY_SOCKET")
    os.environ["NOTIFY_SOCKET"] = str(directory / "notify.sock")
    try:
        worker = WorkerProcess(server.url, "w-stack", directory, "--max-jobs", "16",
                               "--metrics-port", str(port), "--metrics-host", "127.0.0.1")
    finally:
        if previous is None:
            del os.environ["NOTIFY_SOCKET"]
        else:
            os.environ["NOTIFY_SOCKET"] = previous
    try:
        yield server, worker, port, notify, directory
    finally:
        worker.stop()
        server.kill()
        notify.close()


def orcd(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "worker.cli", *args], capture_output=True,
                            text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    return result


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def datagram(sock) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_ready_comes_after_the_first_heartbeat_then_the_watchdog_is_fed(stack):
    server, worker, _, notify, _ = stack
    ready = datagram(notify)
    assert ready[0] == "READY=1", ready
    # READY is sent only once the heartbeat is in Redis (and so the model is loaded).
    assert server.client().exists(KEYS.worker("w-stack"))
    assert datagram(notify)[0] == "WATCHDOG=1"
    worker.wait_ready()


def test_metrics_move_after_a_job(stack):
    server, worker, port, _, _ = stack
    worker.wait_ready()
    before = scrape(port)
    done = OrcdClient(server.url).generate("The capital of France is", max_tokens=4,
                                           temperature=0, timeout=60)
    after = scrape(port)

    def moved(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert moved("orcd_jobs_total", outcome=done.finish_reason) == 1
    assert moved("orcd_tokens_generated_total") == done.usage.completion_tokens == 4
    assert moved("orcd_prompt_tokens_total", cached="false") + moved(
        "orcd_prompt_tokens_total", cached="true") == done.usage.prompt_tokens
    for histogram in ("orcd_time_to_first_token_seconds", "orcd_job_duration_seconds"):
        assert moved(f"{histogram}_count") == 1
    assert moved("orcd_decode_tokens_per_second_count") == 1
    assert after[("orcd_kv_blocks_total", ())] == 512
    stream = (("stream", KEYS.jobs(MODEL)),)
    assert after[("orcd_queue_depth", stream)] == 0
    assert after[("orcd_pending_jobs", stream)] == 0
    for name in ("orcd_preemptions_total", "orcd_session_evictions_total",
                 "orcd_redis_reconnects_total", "orcd_sessions", "orcd_active_jobs"):
        assert (name, ()) in after, name
    assert ("orcd_sequences", (("state", "running"),)) in after


def test_batch_of_50_through_the_cli_rq_and_the_worker(stack):
    server, worker, port, _, directory = stack
    worker.wait_ready()
    items = [{"prompt": f"Question {i}: what is {i} plus {i}? Answer:", "metadata": {"item": i}}
             for i in range(ITEMS)]
    items[BAD_INDEX] = {"prompt": "both", "messages": [{"role": "user", "content": "x"}]}
    items[3]["sampling"] = {"seed": 3}
    path, out = directory / "items.jsonl", directory / "out.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    before = scrape(port)
    batch_id = orcd("batch", "submit", str(path), "--model", MODEL, "--max-tokens", "4",
                    "--temperature", "0", "--out", str(out),
                    "--redis", server.url).stdout.strip()
    queued = json.loads(orcd("batch", "status", batch_id, "--json", "--redis",
                             server.url).stdout)
    assert (queued["status"], queued["total"], queued["progress"]) == ("queued", ITEMS, 0)

    orcd("batch", "worker", "--burst", "--redis", server.url, timeout=180)

    status = json.loads(orcd("batch", "status", batch_id, "--json", "--redis",
                             server.url).stdout)
    assert status["status"] == "finished"
    assert (status["completed"], status["done"], status["failed"], status["progress"]) == (
        ITEMS, ITEMS - 1, 1, 1.0)
    for follow in ((), ("--follow",)):
        bar = orcd("batch", "status", batch_id, *follow, "--redis", server.url).stdout
        assert "100%" in bar and f"{ITEMS}/{ITEMS} items, finished, 49 done, 1 failed" in bar
    lines = orcd("batch", "results", batch_id, "--redis", server.url).stdout.splitlines()
    results = [json.loads(line) for line in lines]
    assert [json.loads(line) for line in out.read_text().splitlines()] == results
    assert [result["index"] for result in results] == list(range(ITEMS))
    bad = results[BAD_INDEX]
    assert bad["status"] == "failed" and bad["error"]["code"] == "invalid_job"
    assert "exactly one of 'prompt' and 'messages'" in bad["error"]["message"]
    good = [result for result in results if result["index"] != BAD_INDEX]
    assert all(r["status"] == "done" and r["finish_reason"] in ("length", "stop")
               and 1 <= r["usage"]["completion_tokens"] <= 4 for r in good)
    # Each result is its own item's answer: the worker echoes the item's metadata in `done`.
    assert all(r["metadata"] == {"item": r["index"]} for r in good)
    # The same prompt alone gives the same greedy text as inside the batch.
    client = OrcdClient(server.url)
    for index in (0, ITEMS - 1):
        alone = client.generate(items[index]["prompt"], max_tokens=4, temperature=0, timeout=60)
        assert alone.text == results[index]["text"]
    # The worker counted the 49 valid items and the 2 jobs above; the bad item never reached it.
    after = scrape(port)
    ended = sum(after.get(key, 0) - before.get(key, 0) for key in after
                if key[0] == "orcd_jobs_total")
    assert ended == ITEMS - 1 + 2


def test_sigterm_says_stopping_and_exits_cleanly(stack):
    _, worker, _, notify, _ = stack
    worker.wait_ready()
    # Unread WATCHDOG datagrams fill the socket's queue (the worker then drops new ones
    # rather than block): empty it so that STOPPING has room.
    notify.setblocking(False)
    try:
        while notify.recv(4096):
            pass
    except BlockingIOError:
        pass
    notify.settimeout(30)
    worker.signal(signal.SIGTERM)
    while (message := datagram(notify))[0] == "WATCHDOG=1":
        pass
    assert message == ["STOPPING=1", "STATUS=draining 0 jobs"]
    assert worker.process.wait(30) == 0
