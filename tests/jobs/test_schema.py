"""The job schema refuses every class of bad input, and accepts the documented defaults."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from jobs.schema import MAX_PROMPT_CHARS, EndSession, GenerationJob, describe_validation_error


def job(**fields) -> dict:
    base = {"v": 1, "job_id": "j1", "model": "smollm2-135m", "prompt": "Hello"}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


def parse(document) -> GenerationJob:
    return GenerationJob.model_validate_json(json.dumps(document))


def test_defaults_follow_openai():
    parsed = parse(job())
    s = parsed.sampling
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.max_tokens) == (1.0, 1.0, 0, 0.0, 256)
    assert (s.repetition_penalty, s.presence_penalty, s.frequency_penalty) == (1.0, 0.0, 0.0)
    assert s.stop == [] and s.seed is None and s.logprobs is None
    assert parsed.stream is True and parsed.stream_interval == 1 and parsed.metadata == {}


def test_messages_job_is_valid():
    parsed = parse(job(prompt=..., messages=[{"role": "user", "content": "Hi"}]))
    assert parsed.message_dicts() == [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    "document, where",
    [
        (job(v=2), "v"),
        (job(v=...), "v"),
        (job(job_id=...), "job_id"),
        (job(job_id="has space"), "job_id"),
        (job(job_id="x" * 129), "job_id"),
        (job(job_id="a*"), "job_id"),
        (job(prompt=5), "prompt"),
        (job(prompt=""), "prompt"),
        (job(prompt=None), "exactly one"),
        (job(prompt=...), "exactly one"),
        (job(messages=[{"role": "user", "content": "x"}]), "exactly one"),
        (job(prompt=..., messages=[]), "messages"),
        (job(prompt=..., messages=[{"role": "robot", "content": "x"}]), "role"),
        (job(prompt=..., messages=[{"role": "user", "content": "x", "name": "n"}]), "name"),
        (job(prompt=..., messages=["hi"]), "messages"),
        (job(sampling={"max_tokens": 0}), "max_tokens"),
        (job(sampling={"max_tokens": 10**9}), "max_tokens"),
        (job(sampling={"max_tokens": "16"}), "max_tokens"),
        (job(sampling={"max_tokens": 16.0}), "max_tokens"),
        (job(sampling={"max_tokens": True}), "max_tokens"),
        (job(sampling={"temperature": 2.5}), "temperature"),
        (job(sampling={"temperature": -0.1}), "temperature"),
        (job(sampling={"temperature": "hot"}), "temperature"),
        (job(sampling={"top_p": 0}), "top_p"),
        (job(sampling={"presence_penalty": 3}), "presence_penalty"),
        (job(sampling={"logprobs": 21}), "logprobs"),
        (job(sampling={"stop": "x"}), "stop"),
        (job(sampling={"stop": [""]}), "stop"),
        (job(sampling={"stop": ["s"] * 17}), "stop"),
        (job(sampling={"best_of": 2}), "best_of"),
        (job(stream_interval=0), "stream_interval"),
        (job(stream="yes"), "stream"),
        (job(metadata=[1]), "metadata"),
        (job(metadata={"blob": "x" * 70_000}), "metadata"),
        (job(unknown_field=1), "unknown_field"),
        (job(prompt="x" * (MAX_PROMPT_CHARS + 1)), "prompt"),
        (job(prompt=..., messages=[{"role": "user", "content": "x" * 600_000}] * 2), "characters"),
        (job(session_id="a b"), "session_id"),
        (job(model=""), "model"),
    ],
)
def test_bad_jobs_are_rejected_naming_the_field(document, where):
    with pytest.raises(ValidationError) as info:
        parse(document)
    assert where in describe_validation_error(info.value)


def test_malformed_json_is_rejected():
    with pytest.raises(ValidationError):
        GenerationJob.model_validate_json('{"v": 1, "job_id": ')


def test_description_is_one_line_and_bounded():
    with pytest.raises(ValidationError) as info:
        parse({"a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "f": 6, "g": 7})
    text = describe_validation_error(info.value)
    assert "\n" not in text and "more" in text


def test_end_session_control_message():
    assert EndSession.model_validate_json(
        '{"v": 1, "op": "end_session", "session_id": "s1"}').session_id == "s1"
    with pytest.raises(ValidationError):
        EndSession.model_validate_json('{"v": 1, "op": "drop_tables", "session_id": "s1"}')


def test_parse_special_is_an_explicit_opt_in():
    from jobs.protocol import build_job, encode_job

    assert parse(job()).parse_special is False
    assert parse(job(parse_special=True)).parse_special is True
    with pytest.raises(ValidationError):
        parse(job(parse_special="true"))
    # Written only when true: workers that predate the field read the other jobs.
    plain = build_job(model="smollm2-135m", prompt="Hi")
    assert "parse_special" not in json.loads(encode_job(plain))
    assert "response_format" not in json.loads(encode_job(plain))["sampling"]
    opted = build_job(model="smollm2-135m", prompt="Hi", parse_special=True)
    assert json.loads(encode_job(opted))["parse_special"] is True
    assert GenerationJob.model_validate_json(encode_job(opted)) == opted


def test_deadline_and_timeout_fields():
    import json

    from jobs.protocol import build_job, encode_job
    from jobs.schema import GenerationJob

    plain = build_job(model="m", prompt="hi")
    assert not {"deadline", "timeout_s", "priority"} & set(json.loads(encode_job(plain)))
    job = build_job(model="m", prompt="hi", deadline=2_000, timeout_s=1.5, priority=3)
    wire = json.loads(encode_job(job))
    assert (wire["deadline"], wire["timeout_s"], wire["priority"]) == (2_000, 1.5, 3)
    assert GenerationJob.model_validate_json(encode_job(job)) == job
    assert job.deadline_ms(enqueued_ms=1_000) == 2_000  # the earlier of the two
    assert job.deadline_ms(enqueued_ms=100) == 1_600
    assert plain.deadline_ms(enqueued_ms=100) is None
    for bad in ({"timeout_s": 0}, {"timeout_s": -1}, {"deadline": -5}, {"deadline": "5"}):
        with pytest.raises(ValueError):
            GenerationJob.model_validate_json(json.dumps(
                {"v": 1, "job_id": "j", "model": "m", "prompt": "x", **bad}))
