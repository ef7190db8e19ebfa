"""`orcd status`: workers, job streams, pending entries per consumer, dead letters, sessions."""

from __future__ import annotations

import argparse
import json
import time

import redis

from jobs import OrcdClient
from jobs.keys import GROUP
from worker.commands.submit import add_redis_arguments, redis_client


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON object")
    add_redis_arguments(parser)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def collect(client: OrcdClient) -> dict:
    r, keys = client.redis, client.keys
    workers = {}
    for raw_id, raw_info in r.hgetall(keys.workers).items():
        worker_id = _text(raw_id)
        info = json.loads(raw_info)
        info["alive"] = bool(r.exists(keys.worker(worker_id)))
        workers[worker_id] = info
    streams = {}
    for key in sorted(_text(k) for k in r.scan_iter(match=keys.jobs("*"), count=1000)):
        entry = {"length": r.xlen(key), "consumers": {}}
        try:
            for consumer in r.xinfo_consumers(key, GROUP):
                entry["consumers"][_text(consumer["name"])] = {
                    "pending": consumer["pending"], "idle_ms": consumer["idle"]}
        except redis.ResponseError:
            entry["consumers"] = None  # no group yet
        streams[key] = entry
    sessions = {}
    for key in r.scan_iter(match=keys.session_pattern(), count=1000):
        sessions[_text(key).rsplit(":", 1)[-1]] = _text(r.get(key) or b"")
    dead = [{"id": _text(i), **{_text(k): _text(v)[:200] for k, v in f.items()}}
            for i, f in r.xrevrange(keys.dead, count=5)]
    return {"workers": workers, "streams": streams, "dead_letters": r.xlen(keys.dead),
            "recent_dead": dead, "sessions": sessions}


def run(args: argparse.Namespace) -> int:
    with redis_client(args) as client:
        status = collect(client)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"workers ({len(status['workers'])}):")
    for worker_id, w in sorted(status["workers"].items()):
        age = time.time() - w.get("at", 0)
        state = w.get("state", "?") if w["alive"] else f"DEAD (last beat {age:.0f} s ago)"
        print(f"  {worker_id:24} {state:10} {w.get('model')} on {w.get('backend')}/"
              f"{w.get('device')}  jobs {w.get('active_jobs')}/{w.get('max_jobs')}  KV "
              f"{w.get('kv_blocks_used')}/{w.get('kv_blocks_total')}  sessions "
              f"{w.get('sessions')}  done {w.get('jobs_done')}  v{w.get('version')}")
    print("streams:")
    for key, s in status["streams"].items():
        pending = ", ".join(f"{c} {p['pending']}" for c, p in (s["consumers"] or {}).items())
        print(f"  {key:40} length {s['length']:<6} pending: {pending or '-'}")
    print(f"dead letters: {status['dead_letters']}")
    for letter in status["recent_dead"]:
        print(f"  {letter['id']} job {letter.get('job_id') or '?'}: {letter.get('reason')}")
    print(f"sessions ({len(status['sessions'])}):")
    for session_id, holder in sorted(status["sessions"].items()):
        print(f"  {session_id} -> {holder}")
    return 0
