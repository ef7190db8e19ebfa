"""`orcd worker --tensor-parallel N` on the torch backend: a TP=2 worker answers a greedy job with
the tokens a TP=1 worker gives; a dying rank ends the worker (EX_TEMPFAIL) with the job left
unacknowledged, for another worker to reclaim; the cuda backend and a bad size are refused by name."""

from __future__ import annotations

import json
import time

import fakeredis
import pytest
from gguf import GGMLQuantizationType

from gpu.backends.torch_tp import TensorParallelTorchBackend
from gpu.engine import Engine, make_backend
from gpu.request import RequestError
from gpu.tensor_parallel import TensorParallelError
from jobs import OrcdClient
from jobs.keys import GROUP, Keys
from loader.gguf_file import open_gguf
from loader.synth import write_synthetic_gguf
from tests.gpu.test_torch_tp import LLAMA, dies_at_first_forward
from worker.daemon import EXIT_DEVICE_LOST, Worker, WorkerConfig
from worker.loaded_model import load_model

KEYS = Keys()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp-worker") / "llama-narrow.gguf"
    write_synthetic_gguf(path, LLAMA, GGMLQuantizationType.Q8_0)
    return path


def start_worker(model) -> tuple[Worker, fakeredis.FakeRedis]:
    r = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    worker = Worker(model, WorkerConfig(worker_id="w1", block_ms=5), client=r)
    worker._setup_groups()
    worker.open()
    return worker, r


def events_of(r, job_id: str) -> list[dict]:
    return [{"event": f[b"event"].decode(), **json.loads(f[b"data"])}
            for _, f in r.xrange(KEYS.out(job_id))]  # fmt: skip


def submit(r, model) -> str:
    return OrcdClient(connection=r).submit("The capital of France is", model=model.name,
                                           max_tokens=6, temperature=0)  # fmt: skip


def test_a_tp2_worker_answers_as_a_tp1_worker(model_path):
    answers = []
    for tensor_parallel in (1, 2):
        model = load_model("llama-narrow", models_dir=model_path.parent, backend="torch",
                           dtype="float32", kv_blocks=64, progress=False,
                           tensor_parallel=tensor_parallel)  # fmt: skip
        try:
            worker, r = start_worker(model)
            job_id = submit(r, model)
            deadline = time.monotonic() + 60
            while not (events := events_of(r, job_id)) or events[-1]["event"] != "done":
                assert time.monotonic() < deadline, f"job not done in time: {events[-1:]}"
                worker.iteration()
            worker.close()
        finally:
            if tensor_parallel > 1:
                model.engine.backend.close()
        answers.append([t for e in events if e["event"] == "token" for t in e["token_ids"]])
    assert answers[0] == answers[1] and len(answers[0]) == 6


def test_a_dying_rank_ends_the_worker_with_its_job_handed_over(model_path):
    backend = TensorParallelTorchBackend(model_path, 2, threads_per_rank=1, timeout_s=60,
                                         rank_main=dies_at_first_forward)  # fmt: skip
    model = load_model("llama-narrow", models_dir=model_path.parent, backend=backend,
                       kv_blocks=64, progress=False)  # fmt: skip
    r = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    worker = Worker(model, WorkerConfig(worker_id="w1", block_ms=5), client=r)
    worker._setup_groups()
    job_id = submit(r, model)
    assert worker.run() == EXIT_DEVICE_LOST
    # No final event: the job stays pending in the group, for another worker to reclaim.
    assert not {"done", "error"} & {e["event"] for e in events_of(r, job_id)}
    assert r.xpending(KEYS.jobs(model.name), GROUP)["pending"] == 1
    assert not any(p.is_alive() for p in backend._ranks)


def test_the_cuda_backend_and_bad_sizes_are_refused_by_name(model_path):
    with open_gguf(model_path) as gguf:
        with pytest.raises(RequestError, match="only on the torch backend.*--backend torch"):
            make_backend("cuda", gguf, tensor_parallel=2)
        with pytest.raises(RequestError, match="at least 1"):
            make_backend("torch", gguf, tensor_parallel=0)
        with pytest.raises(TensorParallelError, match="does not divide its 4 KV heads"):
            Engine(gguf, backend="torch", tensor_parallel=3)


def test_orcd_worker_refuses_tensor_parallel_on_cuda_in_one_line(model_path, capsys):
    from worker.cli import main

    code = main(["worker", "--model", "llama-narrow", "--models-dir", str(model_path.parent),
                 "--backend", "cuda", "--tensor-parallel", "2"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("orcd worker: error: tensor parallelism (2) exists only on the torch")
