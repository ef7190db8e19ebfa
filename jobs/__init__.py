"""The public contract of orcd: job schemas, Redis key names, clients. Never imports torch.

    from jobs import OrcdClient
    done = OrcdClient("redis://localhost:6379/0").generate("Hello", max_tokens=16)
"""

from jobs.async_client import AsyncOrcdClient
from jobs.client import OrcdClient
from jobs.errors import JobError, JobFailed, JobTimeout
from jobs.events import Done, Error, Queued, Started, Token
from jobs.keys import GROUP, Keys
from jobs.protocol import EventFollower, JobEvent, build_job
from jobs.schema import GenerationJob, Message, Sampling

__all__ = [
    "GROUP",
    "AsyncOrcdClient",
    "Done",
    "Error",
    "EventFollower",
    "GenerationJob",
    "JobError",
    "JobEvent",
    "JobFailed",
    "JobTimeout",
    "Keys",
    "Message",
    "OrcdClient",
    "Queued",
    "Sampling",
    "Started",
    "Token",
    "build_job",
]
