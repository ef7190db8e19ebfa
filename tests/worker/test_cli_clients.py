"""The client commands as a person meets them, on private redis-server processes: one line and
exit status 2 when Redis is unreachable, `submit --wait` and `tail` riding out a Redis restart
without repeating or losing an event, Ctrl-C and --timeout cancelling the job, `orcd cancel`,
and `submit` refusing a model no worker serves. The worker is faked here (its events written
by the test) except in the restart test marked slow, which runs a real `orcd worker`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs import OrcdClient
from jobs.keys import Keys
from tests.redis_server import RedisServer, free_port
from tests.worker.workers import WorkerProcess
from worker.cli import main

KEYS = Keys()
MODEL = "smollm2-135m"
ENV = {**{k: v for k, v in os.environ.items() if k != "REDIS_URL"}, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def persistent_redis(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path, persistent=True).start()
    yield server
    server.kill()


def orcd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], capture_output=True,
                          text=True, timeout=300, env=ENV)


class Orcd:
    """An `orcd` subprocess whose stdout and stderr go to files, read while it runs."""

    def __init__(self, directory: Path, name: str, *args: str) -> None:
        self.out, self.err = directory / f"{name}.out", directory / f"{name}.err"
        with self.out.open("w") as out, self.err.open("w") as err:
            self.process = subprocess.Popen([sys.executable, "-m", "worker.cli", *args],
                                            stdout=out, stderr=err, env=ENV,
                                            preexec_fn=_as_from_a_terminal)

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def wait_for(self, predicate, what: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"waiting for {what}: exit {self.process.poll()}\n"
                            f"stdout: {self.stdout()}\nstderr: {self.stderr()}")
            time.sleep(0.02)

    def finish(self, timeout: float = 120.0) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"still running after {timeout} s\nstdout: {self.stdout()}\n"
                        f"stderr: {self.stderr()}")
        finally:
            if self.process.poll() is None:
                self.process.kill()


def _as_from_a_terminal() -> None:
    """A terminal's Ctrl-C reaches a process whose SIGINT is at its default and unblocked. A
    child inherits an ignored SIGINT: a suite started in the background by a non-interactive
    shell (`make test &`: bash ignores SIGINT in asynchronous jobs without job control) had all
    three Ctrl-C tests wait out their 120 s (2026-12-07). The child starts as from a shell."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def fake_worker_alive(r, worker_id: str = "fake", model: str = MODEL) -> None:
    info = json.dumps({"model": model, "state": "serving"})
    r.hset(KEYS.workers, worker_id, info)
    r.set(KEYS.worker(worker_id), info, ex=600)


def queued_job_id(r, timeout: float = 120.0) -> str:
    """The id of the one job on the model's stream, once `orcd submit` has put it there."""
    deadline = time.monotonic() + timeout
    while not (entries := r.xrange(KEYS.jobs(MODEL))):
        assert time.monotonic() < deadline, "no job was queued"
        time.sleep(0.02)
    return json.loads(entries[0][1][b"job"])["job_id"]


def publish(r, job_id: str, kind: str, data: dict) -> None:
    r.xadd(KEYS.out(job_id), {"event": kind, "data": json.dumps(data)})


def token(index: int, text: str) -> dict:
    return {"index": index, "token_ids": [index], "text": text, "attempt": 1}


def done(text: str, reason: str = "stop") -> dict:
    return {"finish_reason": reason, "text": text,
            "usage": {"prompt_tokens": 1, "completion_tokens": len(text), "cached_tokens": 0},
            "timings": {"queue_ms": 0, "ttft_ms": 1, "total_ms": 2, "decode_tokens_per_s": None},
            "metadata": {}}


def test_unreachable_redis_is_one_line_and_exit_2(tmp_path):
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"  # nothing listens there
    commands = {
        "submit": ["submit", "Hi"],
        "submit --wait": ["submit", "--wait", "Hi"],
        "status": ["status"],
        "tail": ["tail", "some-job"],
        "cancel": ["cancel", "some-job"],
        "batch status": ["batch", "status", "some-batch"],
    }
    running = {name: Orcd(tmp_path, name.replace(" ", "_"), *args, "--redis", url)
               for name, args in commands.items()}
    for name, command in running.items():
        assert command.finish() == 2, name
        err = command.stderr()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (name, err)
        assert "cannot reach Redis at redis://:***@127.0.0.1" in err and "s3cret" not in err
        assert err.startswith(f"orcd {name.split()[0]}: error: "), err
        assert command.stdout() == ""


def test_submit_refuses_a_model_no_worker_serves(redis_server):
    r = redis_server.client()
    fake_worker_alive(r, "w-other", model="other-model")
    refused = orcd("submit", "--redis", redis_server.url, "Hi")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.strip() == (
        f"orcd submit: error: no live worker serves model {MODEL}; live workers: w-other "
        "(serves other-model); the job was not queued (--queue-anyway queues it for a worker "
        "yet to start)")
    assert r.exists(KEYS.jobs(MODEL)) == 0
    queued = orcd("submit", "--redis", redis_server.url, "--queue-anyway", "Hi")
    assert queued.returncode == 0, queued.stderr
    assert queued_job_id(r) == queued.stdout.strip()


def test_cancel_command(redis_server, capsys):
    r, url = redis_server.client(), redis_server.url
    client = OrcdClient(url)

    def cancel(job_id: str, *flags: str) -> tuple[int, str, str]:
        status = main(["cancel", "--redis", url, *flags, job_id])
        out, err = capsys.readouterr()
        return status, out.strip(), err.strip()

    status, out, err = cancel("no-such-job")
    assert status == 2 and out == "" and err.startswith("orcd cancel: error: no job no-such-job")
    assert not r.exists(KEYS.cancel("no-such-job"))
    queued = client.submit("Hi")
    status, out, _ = cancel(queued)
    assert status == 0 and out.startswith(f"cancel requested for job {queued} (queued on ")
    assert r.get(KEYS.cancel(queued)) == b"1" and 3500 < r.ttl(KEYS.cancel(queued)) <= 3600
    running = "job-running"
    publish(r, running, "started", {"worker_id": "w1", "attempt": 1})
    status, out, _ = cancel(running)
    assert status == 0 and "(running" in out and r.exists(KEYS.cancel(running))
    finished = "job-finished"
    publish(r, finished, "done", done("x"))
    status, out, err = cancel(finished)
    assert status == 2 and err == (f"orcd cancel: error: job {finished} already finished "
                                   "(done, finish_reason stop); nothing to cancel")
    assert not r.exists(KEYS.cancel(finished))
    status, out, _ = cancel(finished, "--force")
    assert status == 0 and r.exists(KEYS.cancel(finished))


@pytest.mark.parametrize("detach", [False, True])
def test_ctrl_c_on_submit_wait_cancels_the_job(redis_server, tmp_path, detach):
    r = redis_server.client()
    fake_worker_alive(r)
    submit = Orcd(tmp_path, "submit", "submit", "--redis", redis_server.url, "--wait", "Hi",
                  *(["--detach"] if detach else []))
    job_id = queued_job_id(r)
    publish(r, job_id, "started", {"worker_id": "fake", "attempt": 1})
    publish(r, job_id, "token", token(0, "Hel"))
    submit.wait_for(lambda: submit.stdout() == "Hel", "the first token")
    submit.process.send_signal(signal.SIGINT)
    assert submit.finish() == 130
    assert submit.stdout() == "Hel\n"  # the open line closed
    err = submit.stderr()
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    if detach:
        assert last == (f"orcd submit: interrupted; job {job_id} left running (--detach); "
                        f"orcd tail {job_id} follows it")
        assert not r.exists(KEYS.cancel(job_id))
    else:
        assert last == f"orcd submit: interrupted; cancel requested for job {job_id}"
        assert r.get(KEYS.cancel(job_id)) == b"1"


def test_ctrl_c_elsewhere_is_one_line_and_exit_130(redis_server, tmp_path):
    r = redis_server.client()
    tail = Orcd(tmp_path, "tail", "tail", "--redis", redis_server.url, "nothing-yet")
    tail.wait_for(lambda: len(r.client_list()) > 1, "tail to connect")  # reading by now
    tail.process.send_signal(signal.SIGINT)
    assert tail.finish() == 130
    assert tail.stderr() == "orcd tail: interrupted\n" and tail.stdout() == ""


def test_timeout_on_submit_wait_cancels_the_job(redis_server):
    r = redis_server.client()
    result = orcd("submit", "--redis", redis_server.url, "--queue-anyway", "--wait",
                  "--timeout", "1", "Hi")
    job_id = queued_job_id(r)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"orcd submit: error: job {job_id}: no answer within 1.0 s; cancel requested for job "
        f"{job_id}")
    assert r.get(KEYS.cancel(job_id)) == b"1"


def test_submit_wait_and_tail_resume_after_a_redis_restart(persistent_redis, tmp_path):
    """Events written by the test: before the restart, while the readers wait, after it."""
    server = persistent_redis
    r = server.client()
    fake_worker_alive(r)
    submit = Orcd(tmp_path, "submit", "submit", "--redis", server.url, "--wait", "Hi",
                  "--timeout", "120")
    job_id = queued_job_id(r)
    publish(r, job_id, "queued", {"position": 0, "queue_depth": 1})
    publish(r, job_id, "started", {"worker_id": "fake", "attempt": 1})
    publish(r, job_id, "token", token(0, "One, "))
    tail = Orcd(tmp_path, "tail", "tail", "--redis", server.url, job_id)
    submit.wait_for(lambda: submit.stdout() == "One, ", "the first token")
    tail.wait_for(lambda: len(tail.stdout().splitlines()) == 3, "three events")
    server.kill()
    submit.wait_for(lambda: "lost Redis" in submit.stderr(), "the reconnection note")
    tail.wait_for(lambda: "lost Redis" in tail.stderr(), "the reconnection note")
    server.start()  # same port, same append-only file
    r = server.client()
    publish(r, job_id, "token", token(1, "two, "))
    publish(r, job_id, "token", token(2, "three."))
    publish(r, job_id, "done", done("One, two, three."))
    assert submit.finish() == 0, submit.stderr()
    assert tail.finish() == 0, tail.stderr()
    assert submit.stdout() == "One, two, three.\n"
    events = [json.loads(line) for line in tail.stdout().splitlines()]
    assert [e["event"] for e in events] == ["queued", "started", "token", "token", "token", "done"]
    assert [e["id"] for e in events] == [i.decode() for i, _ in r.xrange(KEYS.out(job_id))]
    for command, name in ((submit, "submit"), (tail, "tail")):
        notes = [line for line in command.stderr().splitlines() if "lost Redis" in line]
        assert len(notes) == 1 and notes[0].startswith(f"orcd {name}: lost Redis at {server.url}")
        assert "Traceback" not in command.stderr()


@pytest.mark.slow
def test_submit_wait_survives_a_redis_restart_with_a_real_worker(persistent_redis, tmp_path):
    """A real worker keeps generating while Redis is down and publishes what it buffered; the
    client resumes after its last event and prints every token exactly once."""
    server = persistent_redis
    worker = WorkerProcess(server.url, "wr", tmp_path).wait_ready()
    try:
        r = server.client()
        submit = Orcd(tmp_path, "submit", "submit", "--redis", server.url, "--wait",
                      "--max-tokens", "64", "--temperature", "0", "--timeout", "240",
                      "Once upon a time")
        job_id = queued_job_id(r)
        deadline = time.monotonic() + 120
        while not any(f[b"event"] == b"token" for _, f in r.xrange(KEYS.out(job_id))):
            assert time.monotonic() < deadline and submit.process.poll() is None, worker.log()
            time.sleep(0.01)
        server.kill()
        time.sleep(1.0)
        restarted_ms = time.time() * 1000
        server.start()
        assert submit.finish(240) == 0, submit.stderr() + worker.log()
        answer = OrcdClient(server.url).wait(job_id, timeout=5)
        after = [i for i, f in r.xrange(KEYS.out(job_id))
                 if f[b"event"] == b"token" and int(i.split(b"-")[0]) > restarted_ms]
        assert after, "every token was published before the restart: nothing was tested"
        assert submit.stdout() == answer.text + "\n"  # every token once, none lost
        err = submit.stderr()
        assert "lost Redis" in err and "Traceback" not in err
        assert "redis.lost" in worker.log() and "redis.reconnected" in worker.log()
    finally:
        worker.stop()
