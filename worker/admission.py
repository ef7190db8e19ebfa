"""Admission: which queued jobs a worker starts next, chosen in Redis by priority with aging.

A worker with room for n jobs (`--max-jobs` less those it runs) takes exactly n, never more:
XREADGROUP's COUNT applies per stream, so reading the shared and the routed stream at once
could bring 2n. One script (`_ADMIT`) does the choosing atomically:

1. entries not yet delivered are first read into the group's *queue* consumer (`QUEUE`), up to
   `window` per stream: they are queued jobs every worker of the model can see and choose from;
2. each queued entry gets a score, its `priority` plus one level per `aging_s` seconds waited
   (a stream id starts with the enqueue time in ms), so a low priority is never starved;
3. the n best (routed before shared on a tie, then oldest) are XCLAIMed to this worker with
   their delivery count unchanged; so are, whatever n, control messages and jobs whose deadline
   has passed (the worker answers those with `deadline_exceeded` without starting them).

Jobs past the window are seen as the window drains. Entries of the queue consumer are never
reclaimed as a dead worker's: the queue consumer has no heartbeat and needs none. Entries whose
JSON does not parse score as priority 0 and are rejected by the worker as usual.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from jobs.keys import GROUP
from jobs.keys import QUEUE_CONSUMER as QUEUE
from jobs.protocol import as_text
from worker.consumer import Entry
from worker.scripts import ScriptSet

DEFAULT_AGING_S = 1.0  # seconds of waiting worth one priority level
DEFAULT_WINDOW = 128  # queued entries per stream the script chooses from

# KEYS: job streams, routed first. ARGV: group, consumer, queue consumer, capacity, window,
# now (unix ms), aging (ms per level), 1 to return each stream's last-delivered id (an idle
# worker's wait starts there). Returns {claimed entries, last-delivered ids (or {})}.
# Priority, deadline and timeout_s are read only from jobs whose JSON names them (cjson only
# then: most jobs are decoded by nobody but the worker).
_ADMIT = """
local group, me, queue = ARGV[1], ARGV[2], ARGV[3]
local capacity, window = tonumber(ARGV[4]), tonumber(ARGV[5])
local now, aging = tonumber(ARGV[6]), tonumber(ARGV[7])
local candidates, free = {}, {}
local function field(fields, name)
  for i = 1, #fields, 2 do
    if fields[i] == name then return fields[i + 1] end
  end
  return nil
end
local function describe(raw, enqueued)
  local priority, deadline = 0, nil
  if string.find(raw, '"priority"', 1, true) or string.find(raw, '"deadline"', 1, true)
      or string.find(raw, '"timeout_s"', 1, true) then
    local ok, job = pcall(cjson.decode, raw)
    if ok and type(job) == 'table' then
      if type(job.priority) == 'number' then priority = job.priority end
      if type(job.deadline) == 'number' then deadline = job.deadline end
      if type(job.timeout_s) == 'number' then
        local by = enqueued + job.timeout_s * 1000
        if deadline == nil or by < deadline then deadline = by end
      end
    end
  end
  return priority, deadline
end
for s, key in ipairs(KEYS) do
  local held = redis.call('XPENDING', key, group, '-', '+', window, queue)
  if #held < window then
    local read = redis.call('XREADGROUP', 'GROUP', group, queue, 'COUNT', window - #held,
                            'STREAMS', key, '>')
    if read then
      held = redis.call('XPENDING', key, group, '-', '+', window, queue)
    end
  end
  for _, row in ipairs(held) do
    local id = row[1]
    local entry = redis.call('XRANGE', key, id, id)[1]
    if entry == nil then
      redis.call('XACK', key, group, id)  -- deleted while queued
    else
      local enqueued = tonumber(string.match(id, '^(%d+)'))
      local raw = field(entry[2], 'job')
      local item = {key = key, id = id, count = row[4], s = s, enqueued = enqueued}
      if raw == nil then
        free[#free + 1] = item  -- a control message (or junk the worker dead-letters)
      else
        local priority, deadline = describe(raw, enqueued)
        if deadline ~= nil and now >= deadline then
          free[#free + 1] = item
        else
          item.score = priority + (now - enqueued) / aging
          candidates[#candidates + 1] = item
        end
      end
    end
  end
end
table.sort(candidates, function(a, b)
  if a.score ~= b.score then return a.score > b.score end
  if a.s ~= b.s then return a.s < b.s end
  return a.enqueued < b.enqueued
end)
for i = 1, math.min(capacity, #candidates) do
  free[#free + 1] = candidates[i]
end
table.sort(free, function(a, b)  -- handed over in enqueue order
  if a.enqueued ~= b.enqueued then return a.enqueued < b.enqueued end
  return tonumber(string.match(a.id, '-(%d+)$')) < tonumber(string.match(b.id, '-(%d+)$'))
end)
local claimed = {}
for _, item in ipairs(free) do
  local got = redis.call('XCLAIM', item.key, group, me, 0, item.id, 'RETRYCOUNT', item.count)
  if got[1] then
    claimed[#claimed + 1] = {item.key, got[1][1], got[1][2], item.count}
  end
end
local last = {}
for _, key in ipairs(ARGV[8] == '1' and KEYS or {}) do
  local info = redis.call('XINFO', 'GROUPS', key)
  for _, g in ipairs(info) do
    if field(g, 'name') == group then last[#last + 1] = field(g, 'last-delivered-id') end
  end
end
return {claimed, last}
"""


@dataclass(slots=True)
class Admitted:
    """What one admission call brought: entries now this worker's, and each stream's
    last-delivered id (where an idle worker's blocking wait for new entries starts)."""

    entries: list[Entry]
    last_ids: dict[str, str]


class Admission:
    """The admission script over one worker's streams (routed first, then shared)."""

    def __init__(self, client: redis.Redis, streams: list[str], worker_id: str, *,
                 window: int = DEFAULT_WINDOW, aging_s: float = DEFAULT_AGING_S,
                 scripts: ScriptSet | None = None) -> None:
        if aging_s <= 0:
            raise ValueError("priority aging must be a positive number of seconds per level")
        self.redis = client
        self.streams = streams
        self.worker_id = worker_id
        self.window = window
        self.aging_ms = aging_s * 1000
        self._script = (scripts if scripts is not None else ScriptSet(client)).add(_ADMIT)

    def queue(self, pipe: redis.client.Pipeline, capacity: int, now_ms: int, *,
              idle: bool = False) -> None:
        """Queue the admission of up to `capacity` jobs on `pipe` (read with `parse`); `idle`:
        also the streams' last-delivered ids, for `wait`. Loads the script first if Redis may
        lack it (worker/scripts.py): a connection error can come from here."""
        self._script.queue(pipe, self.streams, [GROUP, self.worker_id, QUEUE, capacity,
                                                self.window, now_ms, self.aging_ms, int(idle)])

    @staticmethod
    def claimed_any(reply) -> bool:
        """Whether an admission reply (as `parse` takes it; an error reply is not) holds
        entries, without parsing them: the publisher's thread asks."""
        return isinstance(reply, (list, tuple)) and bool(reply) and bool(reply[0])

    def parse(self, reply) -> Admitted:
        claimed, last = reply
        entries = []
        for stream, entry_id, flat, count in claimed:
            fields = {as_text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}
            entries.append(Entry(as_text(stream), as_text(entry_id), fields, int(count)))
        return Admitted(entries, {s: as_text(i) for s, i in zip(self.streams, last, strict=False)})

    def wait(self, last_ids: dict[str, str], block_ms: int, count: int = 1) -> dict[str, str]:
        """Block up to `block_ms` until entries newer than `last_ids` arrive (`$` for a stream
        not named); the newest id seen on each stream that had some, {} when none came (they
        are not read: the next admission call takes them; `count` caps the ids looked at)."""
        reply = self.redis.xread({s: last_ids.get(s, "$") for s in self.streams},
                                 count=count, block=block_ms)
        pairs = reply.items() if isinstance(reply, dict) else reply or ()
        return {as_text(key): as_text(entries[-1][0]) for key, entries in pairs if entries}

    def tails(self) -> dict[str, str]:
        """Each stream's newest id now ("0-0" while it has none): where a `wait` that must not
        miss what comes between two of its reads starts (a read from `$` would)."""
        pipe = self.redis.pipeline(transaction=False)
        for stream in self.streams:
            pipe.xrevrange(stream, count=1)
        return {stream: as_text(newest[0][0]) if newest else "0-0"
                for stream, newest in zip(self.streams, pipe.execute(), strict=True)}
