"""`sampling.response_format` on the wire: OpenAI's shapes plus regex and grammar are accepted,
and every schema, regex or grammar the library cannot use is refused at validation, with a
message that names the problem and the code `invalid_request`; a malformed response_format is
`invalid_job` like any other malformed field. The compile cache hands out independent matchers.
"""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from jobs.schema import (
    GenerationJob,
    describe_validation_error,
    grammar_spec,
    validation_error_code,
)
from structured import GrammarCompiler, GrammarSpec
from worker.consumer import Entry, Rejection, parse_entry

PERSON = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


def job(response_format, **sampling) -> dict:
    return {"v": 1, "job_id": "j1", "model": "m", "prompt": "hi",
            "sampling": {"response_format": response_format, **sampling}}


@pytest.mark.parametrize("response_format, kind", [
    ({"type": "text"}, None),
    ({"type": "json_object"}, "json_object"),
    ({"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                             "strict": True}}, "json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "any", "schema": True}}, "json_schema"),
    ({"type": "regex", "pattern": r"\d{3}-[a-z]+"}, "regex"),
    ({"type": "grammar", "ebnf": 'start: "a" b\nb: "b"+'}, "grammar"),
    ({"type": "grammar", "gbnf": 'root ::= "yes" | "no"'}, "grammar"),
])
def test_accepted_shapes_round_trip(response_format, kind):
    parsed = GenerationJob.model_validate_json(json.dumps(job(response_format)))
    spec = grammar_spec(parsed.sampling.response_format)
    assert (spec.kind if spec else None) == kind
    assert GenerationJob.model_validate_json(parsed.model_dump_json()) == parsed
    dumped = json.loads(parsed.model_dump_json())["sampling"]["response_format"]
    if kind == "json_schema":  # OpenAI's key, not our attribute's name
        assert dumped["json_schema"]["schema"] == response_format["json_schema"]["schema"]


@pytest.mark.parametrize("response_format, code, needle", [
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "strin"}}},
     "invalid_request", "Invalid type: strin"),
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": {"$ref": "#/nowhere"}}},
     "invalid_request", "/nowhere"),
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": {
        "type": "string", "pattern": "[a-"}}}, "invalid_request", "unclosed character class"),
    ({"type": "regex", "pattern": "(?=lookahead)"}, "invalid_request", "look-around"),
    ({"type": "grammar", "gbnf": "root ::= undefined-rule"}, "invalid_request",
     "undefined-rule"),
    ({"type": "grammar", "ebnf": 'start: "a" | b'}, "invalid_request", "unknown name"),
    ({"type": "grammar", "gbnf": 'root ::= "a" ('}, "invalid_request", "Expected ')'"),
    ({"type": "grammar"}, "invalid_job", "exactly one of 'ebnf' and 'gbnf'"),
    ({"type": "grammar", "ebnf": "start: a", "gbnf": "root ::= a"}, "invalid_job",
     "exactly one"),
    ({"type": "xml"}, "invalid_job", "does not match any of the expected tags"),
    ({"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}},
     "invalid_job", "json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": "object"}},
     "invalid_job", "schema"),
    ({"type": "regex", "pattern": ""}, "invalid_job", "at least 1 character"),
])
def test_refused_with_a_clear_message_and_code(response_format, code, needle):
    with pytest.raises(ValidationError) as caught:
        GenerationJob.model_validate_json(json.dumps(job(response_format)))
    message = describe_validation_error(caught.value)
    assert needle in message and "sampling.response_format" in message, message
    assert validation_error_code(caught.value) == code
    entry = Entry("orcd:jobs:m", "1-0", {"job": json.dumps(job(response_format)).encode()})
    rejection = parse_entry(entry)
    assert isinstance(rejection, Rejection) and rejection.code == code
    assert rejection.job_id == "j1" and needle in rejection.message


def test_compile_cache_gives_each_request_its_own_matcher(default_model_path):
    from tokenizer import load_tokenizer

    tokenizer = load_tokenizer(default_model_path)
    compiler = GrammarCompiler(tokenizer, cache_size=1)
    spec = GrammarSpec("regex", "(ab)+")
    first, second = compiler.compile(spec), compiler.compile(spec)
    for token_id in tokenizer.encode("abab", add_special_tokens=False):
        first.consume(token_id)
    assert first.accepting and not second.accepting  # second has consumed nothing
    assert compiler.compile(GrammarSpec("regex", "x")) is not None  # evicts (ab)+
    assert compiler.compile(spec) is not None
    compiler.close()
