"""Every Redis key orcd uses, in one place: nobody else formats `"orcd:..."` strings.

The prefix (default `orcd`) lets several deployments share one Redis. Keys hold ids that
users choose (job ids, session ids, model names); `jobs.schema` restricts those to
`[A-Za-z0-9._:-]`, so a key can never be forged by an id containing spaces or wildcards.
"""

from __future__ import annotations

from dataclasses import dataclass

# Consumer group every worker of a model joins, on the shared and on the routed streams.
GROUP = "workers"
# The group's consumer holding queued jobs: delivered to the group, started by no worker yet
# (workers choose among them by priority; see worker/admission.py).
QUEUE_CONSUMER = "queued"
# Stream entry fields.
JOB_FIELD = "job"  # a job stream entry: GenerationJob JSON
CONTROL_FIELD = "control"  # a routed stream entry: a control message for that worker (JSON)
EVENT_FIELD = "event"  # an output stream entry: the event kind
DATA_FIELD = "data"  # an output stream entry: the event payload (JSON)


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names under one prefix; see the README's wire contract for what each holds."""

    prefix: str = "orcd"

    def jobs(self, model: str) -> str:
        """Shared job stream of a model (consumer group `workers`)."""
        return f"{self.prefix}:jobs:{model}"

    def routed(self, model: str, worker_id: str) -> str:
        """Jobs (and control messages) for the worker holding their session."""
        return f"{self.prefix}:jobs:{model}:{worker_id}"

    def out(self, job_id: str) -> str:
        """A job's event stream: queued, started, token, done, error."""
        return f"{self.prefix}:out:{job_id}"

    def cancel(self, job_id: str) -> str:
        return f"{self.prefix}:cancel:{job_id}"

    def session(self, session_id: str) -> str:
        """Worker id holding the session's KV cache (TTL = the session's idle TTL)."""
        return f"{self.prefix}:session:{session_id}"

    def session_pattern(self) -> str:
        return f"{self.prefix}:session:*"

    @property
    def workers(self) -> str:
        """Hash: worker id -> last heartbeat JSON (stays after a crash; see `worker`)."""
        return f"{self.prefix}:workers"

    def worker(self, worker_id: str) -> str:
        """A worker's heartbeat key; present (TTL a few heartbeats) while the worker lives."""
        return f"{self.prefix}:worker:{worker_id}"

    @property
    def narration(self) -> str:
        return f"{self.prefix}:narration"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    # ----- the HTTP gateway (`orcd gateway`) ------------------------------------------------

    def gateway_rate(self, key_id: str, what: str, window: int) -> str:
        """A per-API-key counter (`requests` or `tokens`) of one 60-second window."""
        return f"{self.prefix}:gw:rate:{key_id}:{what}:{window}"

    def gateway_streams(self, key_id: str) -> str:
        """Sorted set: an API key's open streams, scored by when their lease runs out."""
        return f"{self.prefix}:gw:streams:{key_id}"

    def gateway_file(self, file_id: str) -> str:
        """Hash: an uploaded or generated file's metadata (`meta`) and, in Redis, `content`."""
        return f"{self.prefix}:gw:file:{file_id}"

    @property
    def gateway_files(self) -> str:
        """Sorted set of file ids by creation time."""
        return f"{self.prefix}:gw:files"

    def gateway_batch(self, batch_id: str) -> str:
        """Hash: a batch's state (`object` JSON, counters, submitted lines)."""
        return f"{self.prefix}:gw:batch:{batch_id}"

    def gateway_batch_results(self, batch_id: str) -> str:
        """Hash: line index -> its result line (output or error file format), set once."""
        return f"{self.prefix}:gw:batch:{batch_id}:results"

    def gateway_batch_lease(self, batch_id: str) -> str:
        """Key with TTL: the gateway driving the batch now."""
        return f"{self.prefix}:gw:batch:{batch_id}:lease"

    @property
    def gateway_batches(self) -> str:
        """Sorted set of batch ids by creation time."""
        return f"{self.prefix}:gw:batches"

    @property
    def gateway_active_batches(self) -> str:
        """Set of batch ids not yet in a final state: what drivers look for."""
        return f"{self.prefix}:gw:batches:active"
