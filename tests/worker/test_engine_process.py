"""`orcd worker --engine-process` on a private redis-server with the real default model: the
engine in a child process answers as the in-process engine does (greedy text, stop strings,
a grammar, cancel, a bad request), and a dead engine process makes the worker exit 75 and hand
its job to another worker, which finishes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from jobs import OrcdClient
from jobs.keys import Keys
from jobs.protocol import JobEvent
from tests.worker.workers import WorkerProcess
from worker.daemon import EXIT_DEVICE_LOST
from worker.publisher import READS_LOST

pytestmark = pytest.mark.slow
KEYS = Keys()
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]


def events(client: OrcdClient, job_id: str) -> list[JobEvent]:
    return [JobEvent.from_entry(i, f) for i, f in client.redis.xrange(KEYS.out(job_id))]


def first_token(client: OrcdClient, job_id: str, timeout_s: float = 60.0) -> None:
    """Wait until the job has streamed a token."""
    deadline = time.monotonic() + timeout_s
    while not any(e.kind == "token" for e in events(client, job_id)):
        assert time.monotonic() < deadline, f"no token of {job_id} in {timeout_s:g} s"
        time.sleep(0.02)


def engine_processes(pid: int) -> list[int]:
    """Process ids of the spawned children of `pid` (from /proc; not multiprocessing's
    resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmdline:
                found.append(int(entry.name))
    return found


def test_the_engine_process_answers_as_the_engine_does(redis_server, tmp_path, reference):
    client = OrcdClient(redis_server.url)
    worker = WorkerProcess(redis_server.url, "ep", tmp_path, "--engine-process",
                           "--max-jobs", "8")
    try:
        worker.wait_ready()
        assert len(engine_processes(worker.process.pid)) == 1
        greedy = {client.submit(p, max_tokens=12, temperature=0): p for p in PROMPTS}
        schema = {"type": "object", "properties": {"n": {"type": "integer"}},
                  "required": ["n"], "additionalProperties": False}
        structured = client.submit("Give a number as JSON:", max_tokens=24, temperature=0,
                                   response_format={"type": "json_schema", "json_schema": {
                                       "name": "n", "schema": schema}})
        long_job = client.submit("Tell me a long story", max_tokens=400, temperature=0)
        too_long = client.submit("word " * 9000, max_tokens=4, temperature=0)
        for job_id, prompt in greedy.items():
            done = client.wait(job_id, timeout=120)
            assert done.finish_reason in ("length", "stop")
            assert done.text == reference(prompt, 12)
        done = client.wait(structured, timeout=120)
        assert isinstance(json.loads(done.text)["n"], int)
        first_token(client, long_job)
        client.cancel(long_job)
        done = client.wait(long_job, timeout=60)
        assert done.finish_reason == "cancelled" and done.usage.completion_tokens < 400
        final = events(client, too_long)[-1]
        assert final.kind == "error" and final.data["code"] == "invalid_request"
        assert "does not fit the context" in final.data["message"]
        heartbeat = json.loads(client.redis.get(KEYS.worker("ep")))
        assert heartbeat["kv_blocks_total"] > 0
    finally:
        worker.stop()


def test_a_dead_engine_process_ends_the_worker_with_75_and_another_finishes_its_job(
        redis_server, tmp_path):
    client = OrcdClient(redis_server.url)
    dying = WorkerProcess(redis_server.url, "dying", tmp_path, "--engine-process")
    other = None
    try:
        dying.wait_ready()
        job_id = client.submit("Once upon a time", max_tokens=200, temperature=0)
        first_token(client, job_id)
        (engine_pid,) = engine_processes(dying.process.pid)
        os.kill(engine_pid, 9)
        assert dying.process.wait(60) == EXIT_DEVICE_LOST
        assert "engine process is gone" in dying.log()
        other = WorkerProcess(redis_server.url, "other", tmp_path).wait_ready()
        done = client.wait(job_id, timeout=180)
        assert done.finish_reason in ("length", "stop")
        assert [e.kind for e in events(client, job_id)].count("done") == 1
    finally:
        dying.stop()
        if other is not None:
            other.stop()


def test_faults_in_the_engine_process_fail_one_job_or_end_the_worker(redis_server, tmp_path,
                                                                     reference):
    """NaN logits for one request (fault injection, in the engine's process): that job alone
    fails with engine_error. A lost device there: the worker exits 75 and hands its jobs over."""
    client = OrcdClient(redis_server.url)
    worker = WorkerProcess(redis_server.url, "epn", tmp_path, "--engine-process",
                           env={"ORCD_FAULT_INJECT": "nan=poisoned"})
    try:
        worker.wait_ready()
        ids = [client.submit(p, max_tokens=10, temperature=0) for p in PROMPTS]
        poisoned = client.submit(PROMPTS[0], max_tokens=10, temperature=0, job_id="poisoned")
        for job_id, prompt in zip(ids, PROMPTS, strict=True):
            assert client.wait(job_id, timeout=120).text == reference(prompt, 10)
        final = events(client, poisoned)[-1]
        assert final.kind == "error" and final.data["code"] == "engine_error"
        assert "not finite" in final.data["message"]
        assert worker.process.poll() is None
    finally:
        worker.stop()
    lost = WorkerProcess(redis_server.url, "epl", tmp_path, "--engine-process",
                         env={"ORCD_FAULT_INJECT": "device_lost_after=4"})
    other = None
    try:
        lost.wait_ready()
        job_id = client.submit(PROMPTS[1], max_tokens=10, temperature=0)
        assert lost.process.wait(120) == EXIT_DEVICE_LOST
        assert "worker.device_lost" in lost.log()
        other = WorkerProcess(redis_server.url, "epo", tmp_path).wait_ready()
        assert client.wait(job_id, timeout=120).text == reference(PROMPTS[1], 10)
    finally:
        lost.stop()
        if other is not None:
            other.stop()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("flag", [["--engine-process"], []], ids=["asked", "cuda-default"])
def test_an_engine_process_that_cannot_load_is_a_clear_error(redis_server, flag):
    """The cuda backend runs the engine in its own process by default, asked or not."""
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "worker", "--redis", redis_server.url,
         "--backend", "cuda", *flag],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "orcd worker: error: the engine process failed to start: CudaError: no CUDA" \
        in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_no_engine_process_loads_the_cuda_backend_in_the_worker(redis_server):
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "worker", "--redis", redis_server.url,
         "--backend", "cuda", "--no-engine-process"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "orcd worker: error:" in done.stderr
    assert "engine process" not in done.stderr


def test_sessions_and_sigterm_with_the_engine_process(redis_server, tmp_path, reference):
    """A session's second turn reuses its KV in the child, ending the session goes through the
    child, and SIGTERM drains the running jobs (the child ignores the signal) and exits 0."""
    client = OrcdClient(redis_server.url)
    worker = WorkerProcess(redis_server.url, "eps", tmp_path, "--engine-process", "--grace",
                           "60")
    try:
        worker.wait_ready()
        messages = [{"role": "user", "content": "Name a color."}]
        first = client.wait(client.submit(messages=messages, session_id="s1", max_tokens=8,
                                          temperature=0), timeout=120)
        messages += [{"role": "assistant", "content": first.text},
                     {"role": "user", "content": "And another?"}]
        second = client.wait(client.submit(messages=messages, session_id="s1", max_tokens=8,
                                           temperature=0), timeout=120)
        assert second.usage.cached_tokens > 0
        assert client.end_session("s1")
        deadline = time.monotonic() + 60
        while "session.ended" not in worker.log():
            assert time.monotonic() < deadline, worker.log()
            time.sleep(0.05)
        assert "its KV blocks are free" in worker.log()
        jobs = {client.submit(p, max_tokens=16, temperature=0): p for p in PROMPTS}
        while not all(any(e.kind == "token" for e in events(client, j)) for j in jobs):
            assert time.monotonic() < deadline + 60, worker.log()
            time.sleep(0.05)
        (engine_pid,) = engine_processes(worker.process.pid)
        worker.signal(signal.SIGTERM)
        assert worker.process.wait(120) == 0
        for job_id, prompt in jobs.items():
            assert client.wait(job_id, timeout=5).text == reference(prompt, 16)
        assert "worker.stopped" in worker.log()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{engine_pid}").exists():  # stopped by the worker, not left behind
            assert time.monotonic() < deadline, "the engine process outlived the worker"
            time.sleep(0.05)
    finally:
        worker.stop()


def test_a_stuck_engine_process_is_a_lost_device():
    """The child stopped mid-request (SIGSTOP, as a hung device would leave it): with nothing
    from it for the stall timeout, step() raises DeviceLostError instead of waiting forever."""
    from gpu.request import DeviceLostError, Request, SamplingParams
    from worker.engine_process import EngineProcess

    engine = EngineProcess({"name": "smollm2-135m", "kv_blocks": 64}, graph_warmup=False,
                           stall_timeout_s=1.0)
    try:
        engine.add(Request("r", [1, 2, 3], SamplingParams(temperature=0), max_tokens=500))
        outputs = []
        while not outputs:
            outputs = engine.step()
        os.kill(engine._process.pid, signal.SIGSTOP)  # noqa: SLF001 - the child under test
        started = time.monotonic()
        with pytest.raises(DeviceLostError, match="its step is stuck"):
            while time.monotonic() - started < 30:
                engine.step()
        assert time.monotonic() - started < 10
    finally:
        os.kill(engine._process.pid, signal.SIGCONT)  # noqa: SLF001
        engine.close()


def test_wake_ends_a_wait_for_the_engine_process_at_once():
    """`wake()` from another thread (the publisher's writer) ends the loop's wait for the
    child's next outputs: with the child stopped, a 5 s wait returns as soon as woken."""
    from gpu.request import Request, SamplingParams
    from worker.engine_process import EngineProcess

    engine = EngineProcess({"name": "smollm2-135m", "kv_blocks": 64}, graph_warmup=False)
    try:
        engine.add(Request("r", [1, 2, 3], SamplingParams(temperature=0), max_tokens=500))
        while not engine.step():
            pass
        os.kill(engine._process.pid, signal.SIGSTOP)  # noqa: SLF001 - nothing more comes
        engine._take(0.0)  # noqa: SLF001 - what was sent before the stop
        threading.Timer(0.2, engine.wake).start()
        started = time.monotonic()
        engine._take(5.0)  # noqa: SLF001 - the wait step() does, longer
        assert 0.15 < time.monotonic() - started < 2.0
        started = time.monotonic()
        engine._take(0.3)  # noqa: SLF001 - the wake was used up: a full wait again
        assert time.monotonic() - started >= 0.25
    finally:
        os.kill(engine._process.pid, signal.SIGCONT)  # noqa: SLF001
        engine.close()
    engine.wake()  # after close: nothing happens


def exited(pid: int) -> bool:
    """Gone, or a zombie no one has reaped yet (its parent was killed)."""
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) == "Z"
    except OSError:
        return True


def test_the_engine_process_ends_when_its_worker_is_killed_mid_step(redis_server, tmp_path):
    client = OrcdClient(redis_server.url)
    worker = WorkerProcess(redis_server.url, "epk", tmp_path, "--engine-process")
    try:
        worker.wait_ready()
        job_id = client.submit("Once upon a time", max_tokens=400, temperature=0)
        first_token(client, job_id)
        (engine_pid,) = engine_processes(worker.process.pid)
        worker.stop()  # SIGKILL: no drain, no "stop" to the child
        deadline = time.monotonic() + 10
        while not exited(engine_pid):  # its next send or read finds the pipe closed
            assert time.monotonic() < deadline, "the engine process outlived its worker"
            time.sleep(0.05)
    finally:
        worker.stop()


@pytest.mark.parametrize(("running", "replies", "wakes"), [
    ([], [[[["s", "1-0", ["job", "{}"], 1]], ["0-0"]]], 1),  # the admission claimed a job
    (["j"], [[None], [[["s", "1-0", ["job", "{}"], 1]], ["0-0"]]], 1),  # after the cancel MGET
    ([], [[[], ["0-0"]]], 0),  # nothing claimed: the loop keeps its pace
    (["j"], [[None], [[], ["0-0"]]], 0),
    ([], READS_LOST, 0),  # not sent (Redis away)
], ids=["claimed", "claimed-after-cancels", "empty", "empty-after-cancels", "lost"])
def test_an_admission_read_wakes_the_engine_wait_only_when_it_claimed_jobs(running, replies,
                                                                           wakes):
    """Waking the loop for every reply made a storm of admission reads (a turn, a read, its
    reply, a turn...) that took a 2-core machine's CPU from the engine: bench/soak.py ran 10x
    slower, and reclaimed live workers' jobs."""
    from worker.daemon import Worker, _PollPlan

    woken = []
    engine = SimpleNamespace(wake=lambda: woken.append(1))
    loop = SimpleNamespace(_poll_sent=_PollPlan(running, capacity=4, admit=True), engine=engine,
                           _watcher=None)
    Worker._reads_back(loop, replies)
    assert len(woken) == wakes
    loop._poll_sent = _PollPlan(running, capacity=0, admit=False)  # cancel flags only
    Worker._reads_back(loop, [[None]] if running else [])
    assert len(woken) == wakes
    # The queue watcher saw an entry after the read was planned: the read may have missed it,
    # so the next turn's read goes at once; an arrival the read already knew of wakes nothing.
    loop._watcher = SimpleNamespace(arrivals=3)
    loop._poll_sent = _PollPlan(running, capacity=4, admit=True, arrivals=3)
    Worker._reads_back(loop, replies)
    assert len(woken) == 2 * wakes
    loop._poll_sent = _PollPlan(running, capacity=4, admit=True, arrivals=2)
    Worker._reads_back(loop, replies)
    assert len(woken) == 2 * wakes + (replies is not READS_LOST)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux CPU affinity")
def test_the_engine_process_and_the_worker_get_separate_cpus():
    """`separate_cpus` gives a child the upper half of the CPUs and every thread of this
    process the lower half: on one shared CPU a CUDA engine's busy loop lost a quarter of its
    steps (bench/NOTES.md). One CPU: nothing to split."""
    from worker.engine_process import cpu_list, separate_cpus

    allowed = sorted(os.sched_getaffinity(0))
    tasks = [int(t) for t in os.listdir("/proc/self/task")]
    before = {task: os.sched_getaffinity(task) for task in tasks}
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        split = separate_cpus(child.pid)
        if len(allowed) < 2:
            assert split is None
            return
        mine, engine = split
        assert mine and engine and sorted(mine + engine) == allowed
        assert set(mine).isdisjoint(engine)
        assert os.sched_getaffinity(child.pid) == set(engine)
        for task in os.listdir("/proc/self/task"):
            assert os.sched_getaffinity(int(task)) == set(mine)
        seen = []  # a thread started after the split inherits the worker's half
        later = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0)))
        later.start()
        later.join()
        assert seen == [set(mine)]
        os.sched_setaffinity(0, {allowed[0]})  # one CPU left: nothing to split
        assert separate_cpus(child.pid) is None
    finally:
        child.kill()
        child.wait()
        for task, cpus in before.items():
            try:
                os.sched_setaffinity(task, cpus)
            except OSError:
                pass  # that thread has ended
    assert cpu_list([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8" and cpu_list([3]) == "3"


def test_step_outputs_cross_the_pipe_whole():
    """The child sends outputs as tuples (`pack_outputs`): every field of StepOutput must
    come back, a field added later included (this fails until the tuples carry it)."""
    import dataclasses
    import pickle

    from gpu.request import StepOutput, TokenLogprobs
    from worker.engine_process import pack_outputs, unpack_outputs

    values = {"request_id": "r1", "new_token_ids": [5, 6], "num_cached_tokens": 3,
              "logprobs": [TokenLogprobs(5, -0.5, [(5, -0.5), (9, -1.0)])],
              "finish_reason": "error", "error": "NaN logits", "engine_fault": True}
    names = [field.name for field in dataclasses.fields(StepOutput)]
    assert sorted(names) == sorted(values), "a new StepOutput field: give it a value here"
    output = StepOutput(**values)
    back = unpack_outputs(pickle.loads(pickle.dumps(pack_outputs([output, StepOutput("r2", [])]))))
    assert back == [output, StepOutput("r2", [])]
    assert back[0].finished and not back[1].finished
