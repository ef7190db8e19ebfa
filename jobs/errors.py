"""The root of orcd's error hierarchy, and the errors of the jobs contract and its clients.

`OrcdError` lives here, in a module that imports nothing of ours, so that every package may
import it: `jobs/` is the contract at the bottom of the import graph.
"""

from __future__ import annotations


class OrcdError(Exception):
    """Any error orcd raises on purpose; its message names the thing and the reason in one line."""


class JobError(OrcdError):
    """A job cannot be submitted or read (bad arguments, no worker for the model, timeout)."""


class JobFailed(JobError):
    """The worker answered a job with an `error` event."""

    def __init__(self, job_id: str, code: str, message: str) -> None:
        super().__init__(f"job {job_id} failed: {code}: {message}")
        self.job_id, self.code, self.message = job_id, code, message


class JobTimeout(JobError):
    """No `done` or `error` came within the time the caller allowed."""


class NoWorker(JobError):
    """No live worker serves the job's model (`submit(..., require_worker=True)`)."""

    def __init__(self, model: str, others: dict[str, str] | None = None) -> None:
        elsewhere = ", ".join(f"{w} ({what})" for w, what in sorted((others or {}).items()))
        super().__init__(f"no live worker serves model {model}"
                         + (f"; live workers: {elsewhere}" if elsewhere else ""))
        self.model = model
