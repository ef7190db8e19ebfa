"""Token ids to streamed text for one request: incremental detokenizing plus stop strings.

Stop strings are matched across token boundaries and never emitted: text that could still be
the start of a stop string is held back until the next token decides. Used by the worker for
`token` events and by `orcd generate` for the terminal.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizer.tokenizer import GGUFTokenizer


class TextStream:
    """Feed token ids, get the text deltas that are safe to show; `stopped` once a stop matched."""

    def __init__(
        self,
        tokenizer: GGUFTokenizer,
        stop: Iterable[str] = (),
        *,
        skip_special_tokens: bool = True,
    ) -> None:
        self._detokenizer = tokenizer.detokenizer(skip_special_tokens=skip_special_tokens)
        self._stops = [s for s in dict.fromkeys(stop) if s]
        self._held = ""  # decoded text not yet emitted: a possible stop-string prefix
        self.text = ""  # everything emitted so far
        self.stopped = False
        self.stop_reason: str | None = None  # the stop string that matched

    def push(self, token_ids: Iterable[int]) -> str:
        """Text that became final with these tokens (may be ""); nothing after a stop."""
        if self.stopped:
            return ""
        for token_id in token_ids:
            self._held += self._detokenizer.push(token_id)
        return self._release(final=False)

    def resume(self, token_ids: Iterable[int], shown: str) -> None:
        """Continue a stream an earlier attempt began: `token_ids` were generated and `shown`
        (a prefix of their text) was emitted; what follows it is held back as it would be."""
        self.push(token_ids)
        decoded = self.text + self._held
        if not decoded.startswith(shown):
            raise ValueError("the text shown does not begin the tokens' text")
        self.text, self._held = shown, decoded[len(shown):]
        if self.stopped:  # a stop string inside the replayed text: the earlier attempt ended
            self._held = ""

    def finish(self) -> str:
        """Flush what was held back once the request has ended (no more tokens will come)."""
        if self.stopped:
            return ""
        self._held += self._detokenizer.finish()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        held = self._held
        cut = None
        for stop in self._stops:
            index = held.find(stop)
            if index != -1 and (cut is None or index < cut):
                cut, self.stop_reason = index, stop
        if cut is not None:
            self.stopped = True
            out, self._held = held[:cut], ""
        elif final:
            out, self._held = held, ""
        else:
            keep = self._partial_stop_suffix(held)
            out, self._held = held[: len(held) - keep], held[len(held) - keep :]
        self.text += out
        return out

    def _partial_stop_suffix(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
