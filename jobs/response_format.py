"""What a job's `sampling.response_format` constrains its output to, as plain data
(`GrammarSpec`), and its llguidance grammar: the contract checks it at validation (`check`, no
vocabulary needed), `structured/` compiles it for a model's vocabulary.

Kinds, from the wire's `sampling.response_format` (OpenAI's shapes plus two of ours):
  json_object  any JSON object;
  json_schema  a JSON Schema (llguidance's subset: objects, arrays with min/maxItems, enums,
               consts, numbers with ranges, strings with lengths, patterns and formats, anyOf,
               oneOf, allOf, $ref/$defs; an unsupported keyword is an error, not ignored);
  regex        Rust `regex` syntax, the whole output matches it (no look-around);
  grammar      Lark-style EBNF (`start: ...`) or llama.cpp GBNF (`root ::= ...`).

JSON is written compactly, as `json.dumps` writes it (", " and ": ", no other whitespace): a
small model given flexible whitespace can emit blanks until max_tokens runs out.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from jobs.errors import OrcdError

KINDS = ("json_object", "json_schema", "regex", "grammar")
# llguidance's JSON options (JsonCompileOptions): the separators json.dumps writes, no free
# whitespace between tokens.
JSON_OPTIONS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


class GrammarError(OrcdError):
    """A schema, regex or grammar that cannot constrain generation; the message says why."""


@dataclass(slots=True, frozen=True)
class GrammarSpec:
    """One output constraint: its kind and its source text (a schema as canonical JSON)."""

    kind: str
    source: str

    @classmethod
    def from_response_format(cls, response_format: dict[str, Any]) -> GrammarSpec | None:
        """The spec of a wire `response_format` (already shaped by the schema's models); None
        for `{"type": "text"}`, which constrains nothing."""
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return cls("json_object", "")
        if kind == "json_schema":
            schema = response_format["json_schema"]["schema"]
            if schema is True:  # JSON Schema's "anything": llguidance takes only objects
                schema = {}
            # Key order kept: properties are generated in the order the schema lists them.
            return cls("json_schema", json.dumps(schema, separators=(",", ":")))
        if kind == "regex":
            return cls("regex", response_format["pattern"])
        if kind == "grammar":
            text = response_format.get("ebnf") or response_format.get("gbnf")
            return cls("grammar", text)
        raise GrammarError(f"response_format type {kind!r} is not one of text, {', '.join(KINDS)}")

    @property
    def key(self) -> str:
        """The compile cache's key: a hash of kind and source."""
        return hashlib.sha256(f"{self.kind}\0{self.source}".encode()).hexdigest()

    def llguidance_grammar(self) -> str:
        """The grammar in llguidance's own form (what `LLMatcher` compiles); GrammarError when
        the source does not parse."""
        from llguidance import LLMatcher
        from llguidance.gbnf_to_lark import any_to_lark

        try:
            if self.kind == "json_object":
                return LLMatcher.grammar_from_json_schema({"type": "object"}, JSON_OPTIONS)
            if self.kind == "json_schema":
                return LLMatcher.grammar_from_json_schema(self.source, JSON_OPTIONS)
            if self.kind == "regex":
                return LLMatcher.grammar_from_regex(self.source)
            return LLMatcher.grammar_from_lark(any_to_lark(self.source))
        except Exception as exc:  # noqa: BLE001 - the GBNF converter raises bare Exception
            raise GrammarError(f"{self._what()}: {_one_line(str(exc))}") from None

    def check(self) -> str:
        """Parse and validate without a vocabulary (no token tables); returns the llguidance
        grammar, raises GrammarError with llguidance's reason. Valid specs are remembered: a
        batch sending one schema with every job pays its check once (~0.5 ms for a small
        schema, ~100 ms for a 150 KB one on a 2-core CPU)."""
        return _checked(self)

    def _validated(self) -> str:
        from llguidance import LLMatcher

        grammar = self.llguidance_grammar()
        failed, messages = LLMatcher.validate_grammar_with_warnings(grammar)
        if failed:
            raise GrammarError(f"{self._what()}: {_one_line(messages[0])}")
        return grammar

    def _what(self) -> str:
        return {"json_object": "JSON object", "json_schema": "JSON Schema", "regex": "regex",
                "grammar": "grammar"}[self.kind] + " rejected"  # fmt: skip


@functools.lru_cache(maxsize=256)
def _checked(spec: GrammarSpec) -> str:
    return spec._validated()


def _one_line(message: str) -> str:
    """llguidance's messages quote the source over several lines: keep them on one."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return " | ".join(lines)[:500]
