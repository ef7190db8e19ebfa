"""Resuming a reclaimed job where its last attempt stopped, instead of starting it over.

A job taken over from a dead worker already has `token` events in its output stream. The new
attempt reads them (`streamed_so_far`), prefills prompt + those tokens (`resumed_request`),
continues at the next index and keeps the text shown so far (`ActiveJob.resume`), so the
stream never repeats or retracts text: `started` says `resumed_from: N`. Under greedy decoding
the continuation is what the first attempt would have produced (the engine is batch-
invariant); under sampling it is a valid sample given the prefix. Index by index, the first
event written wins, as it does for a client reading the stream.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from gpu.request import Request
from jobs.keys import DATA_FIELD, EVENT_FIELD


@dataclass(slots=True, frozen=True)
class Streamed:
    """What earlier attempts streamed, contiguous from index 0."""

    token_ids: list[int]
    text: str

    @property
    def next_index(self) -> int:
        return len(self.token_ids)


def streamed_so_far(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> Streamed:
    """The tokens and text of an output stream's `token` events (XRANGE entries), in index
    order from 0, up to the first gap."""
    by_index: dict[int, tuple[list[int], str]] = {}
    for _, fields in entries:
        if fields.get(EVENT_FIELD.encode()) != b"token":
            continue
        try:
            data = json.loads(fields[DATA_FIELD.encode()])
            index, ids, text = int(data["index"]), list(data["token_ids"]), str(data["text"])
        except (KeyError, TypeError, ValueError):
            continue  # not ours to interpret: resume from what precedes it
        by_index.setdefault(index, (ids, text))
    token_ids: list[int] = []
    parts: list[str] = []
    while len(token_ids) in by_index:
        ids, text = by_index[len(token_ids)]
        if not ids:
            break
        token_ids += ids
        parts.append(text)
    return Streamed(token_ids, "".join(parts))


def resumed_request(request: Request, streamed: Streamed) -> Request:
    """The request that continues after `streamed`: its tokens appended to the prompt, the
    output budget less what was generated."""
    return dataclasses.replace(
        request,
        prompt_token_ids=[*request.prompt_token_ids, *streamed.token_ids],
        max_tokens=request.max_tokens - len(streamed.token_ids),
    )
