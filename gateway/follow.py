"""Following a request's jobs: their output streams as text deltas, never repeating text.

A job can run twice (a worker died mid-answer and another took it over). A new attempt that
carries `resumed_from` goes on at the next token index, and `EventFollower` already drops
what was seen. A new attempt that starts over (no `resumed_from`: an older worker, or an
expired output stream) would repeat the answer from its start: `ReplayGuard` swallows the
new attempt's text while it retraces what the client already has (greedy or seeded
sampling), and ends the choice with an error when it diverges, since sent text cannot be
taken back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from jobs.async_client import AsyncOrcdClient
from jobs.events import Done
from jobs.protocol import EventFollower

DIVERGED = "attempt_diverged"


@dataclass(slots=True)
class Delta:
    """New text of one choice, and the logprobs of the tokens it came from."""

    text: str
    logprobs: list[dict] = field(default_factory=list)


@dataclass(slots=True)
class Finished:
    done: Done
    tail: str = ""  # text the last token events had not carried (a replay ending early)


@dataclass(slots=True)
class Failed:
    code: str
    message: str


Update = Delta | Finished | Failed


class Diverged(Exception):
    """A restarted attempt wrote text other than what the client already has."""


@dataclass(slots=True)
class ReplayGuard:
    """What the client has been sent of one choice, and the replay of a restarted attempt."""

    sent_text: str = ""
    sent_logprobs: int = 0
    replaying: bool = False
    replay_text: str = ""
    replay_logprobs: list[dict] = field(default_factory=list)

    def restart(self) -> None:
        """A new attempt starts over from its first token."""
        self.replaying, self.replay_text, self.replay_logprobs = True, "", []

    def token(self, text: str, logprobs: list[dict]) -> Delta | None:
        """What to send of a token event; raises Diverged if a replay departs from it."""
        if not self.replaying:
            self.sent_text += text
            self.sent_logprobs += len(logprobs)
            return Delta(text, logprobs) if text or logprobs else None
        self.replay_text += text
        self.replay_logprobs += logprobs
        if len(self.replay_text) < len(self.sent_text):
            if not self.sent_text.startswith(self.replay_text):
                raise Diverged(self._why())
            return None
        if not self.replay_text.startswith(self.sent_text):
            raise Diverged(self._why())
        delta = Delta(self.replay_text[len(self.sent_text):],
                      self.replay_logprobs[self.sent_logprobs:])
        self.replaying = False
        self.sent_text, self.sent_logprobs = self.replay_text, len(self.replay_logprobs)
        return delta if delta.text or delta.logprobs else None

    def done(self, text: str) -> str:
        """Text of the final answer the client has not been sent yet."""
        if not text.startswith(self.sent_text):
            if self.replaying:
                raise Diverged(self._why())
            return ""  # the token events were the answer (a stream cut by a stop string)
        return text[len(self.sent_text):]

    def _why(self) -> str:
        return (f"the job was restarted on another worker and its new answer differs from the "
                f"{len(self.sent_text)} characters already sent")


async def follow_job(client: AsyncOrcdClient, job_id: str, timeout: float | None
                     ) -> AsyncIterator[Update]:
    """One job's updates until it ends; JobTimeout past `timeout` seconds."""
    follower, guard = EventFollower(), ReplayGuard()
    async for event in client.events(job_id, timeout=timeout):
        shown = follower.feed(event)
        if shown is None:
            continue
        if shown.kind == "started" and shown.restart:
            guard.restart()
        elif shown.kind == "token":
            try:
                delta = guard.token(shown.data.get("text", ""), shown.data.get("logprobs") or [])
            except Diverged as exc:
                yield Failed(DIVERGED, str(exc))
                return
            if delta is not None:
                yield delta
        elif shown.kind == "done":
            done = Done.model_validate(shown.data)
            try:
                tail = guard.done(done.text)
            except Diverged as exc:
                yield Failed(DIVERGED, str(exc))
                return
            yield Finished(done, tail)
            return
        elif shown.kind == "error":
            yield Failed(shown.data.get("code", "error"), shown.data.get("message", ""))
            return


async def follow_jobs(client: AsyncOrcdClient, job_ids: Sequence[str], timeout: float | None
                      ) -> AsyncIterator[tuple[int, Update]]:
    """The updates of several jobs as they come, tagged with the job's position; ends when
    every job has finished or failed. One reader task per job."""
    if len(job_ids) == 1:
        async for update in follow_job(client, job_ids[0], timeout):
            yield 0, update
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(position: int, job_id: str) -> None:
        try:
            async for update in follow_job(client, job_id, timeout):
                await queue.put((position, update))
        except Exception as exc:  # noqa: BLE001 - re-raised by the consumer below
            await queue.put((position, exc))
        await queue.put((position, end))

    tasks = [asyncio.create_task(pump(i, job_id)) for i, job_id in enumerate(job_ids)]
    try:
        running = len(tasks)
        while running:
            position, item = await queue.get()
            if item is end:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield position, item
    finally:
        for task in tasks:
            task.cancel()
