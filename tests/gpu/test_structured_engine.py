"""Grammar-constrained generation in the engine's batch, on the real SmolLM2 file: 30 JSON
Schemas greedy and at temperature 1 with 5 seeds (180 generations), regex, GBNF and Lark cases,
and free sequences, all in ONE batch (the torch backend runs it with int8 weights: ~3x faster on
a CPU, and the grammar does not care). Every constrained output must parse and validate with
`jsonschema` / match with Python's `re` / parse with an independent checker. A smaller mixed
batch on float32 weights checks that free sequences give the tokens they give alone and that
constrained ones reproduce in another batch.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import Future

import pytest
import torch

from gpu.engine import Engine
from gpu.request import Request, SamplingParams
from loader.registry import resolve_model
from structured import GrammarCompiler, GrammarError, GrammarSpec
from tests.gpu.test_engine import assert_same_or_near_tie
from tests.structured.schemas import SCHEMAS
from tokenizer import load_tokenizer

# One xdist worker runs the module: its batch is built once (~15 s on a quiet 2-core CPU).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("structured-engine")]
SEEDS = (1, 2, 3, 4, 5)
MAX_TOKENS = 64  # the longest of the 180 JSON outputs is ~40 tokens
SYSTEM = "You are a JSON API. Reply with one JSON value only."
REGEXES = [r"(yes|no), [0-9]{3}", r"[A-Z][a-z]{2,6} [0-9]{1,2}(am|pm)", r"#[0-9a-f]{6}"]
# (kind, grammar, Python check of the whole output)
GRAMMARS = [
    ("gbnf", 'root ::= "The answer is " ("yes" | "no") "."',
     lambda text: re.fullmatch(r"The answer is (yes|no)\.", text) is not None),
    # Bounded (4 items, 2 levels): an unbounded list let a greedy model count digits until
    # max_tokens ("1,2,...,9,1,2,...") on one machine's int8 numerics and not on another's.
    ("gbnf", 'root ::= list\nlist ::= "[" (item ("," item){0,3})? "]"\nitem ::= [0-9] | inner\n'
             'inner ::= "[" ([0-9] ("," [0-9]){0,3})? "]"',
     lambda text: _nested_digit_list(json.loads(text))),
    ("ebnf", 'start: word (" " word)~1..3 "!"\nword: /[a-z]{1,6}/',
     lambda text: re.fullmatch(r"[a-z]{1,6}( [a-z]{1,6}){1,3}!", text) is not None),
]
FREE_TOKENS = 16


def _nested_digit_list(value) -> bool:
    return isinstance(value, list) and all(
        (isinstance(v, int) and 0 <= v <= 9) or _nested_digit_list(v) for v in value
    )


def _params(seed: int | None) -> SamplingParams:
    return SamplingParams(temperature=0.0) if seed is None else SamplingParams(seed=seed)


@pytest.fixture(scope="module", params=["torch", pytest.param("cuda", marks=pytest.mark.gpu)])
def backend(request, default_model_path):
    if request.param == "torch":
        from gpu.backends.torch_backend import TorchBackend

        return TorchBackend(default_model_path, dtype=torch.int8)
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from gpu.backends.cuda_backend import CudaBackend

    return CudaBackend(default_model_path)


@pytest.fixture(scope="module")
def tokenizer(default_model_path):
    return load_tokenizer(default_model_path)


def make_engine(backend, **kwargs) -> Engine:
    return Engine(resolve_model("smollm2-135m"), backend=backend, **kwargs)


def run(engine: Engine, requests: list[Request]):
    """Run to completion: ({id: tokens}, {id: finish_reason}, {id: error})."""
    for request in requests:
        engine.add(request)
    tokens = {r.request_id: [] for r in requests}
    reasons, errors = {}, {}
    while engine.has_work():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                reasons[out.request_id], errors[out.request_id] = out.finish_reason, out.error
    return tokens, reasons, errors


def free_requests(prompt: list[int]) -> list[Request]:
    return [Request(f"free-{seed}", prompt, _params(seed), max_tokens=FREE_TOKENS,
                    ignore_eos=True) for seed in (None, 7)]  # fmt: skip


@pytest.fixture(scope="module")
def prompt(tokenizer) -> list[int]:
    return tokenizer.encode_chat(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "An example."}]
    )[1]


@pytest.fixture(scope="module")
def big_batch(backend, tokenizer, prompt):
    """The one batch: every constrained case, a case that runs out of tokens, and the free
    sequences; the prompt's blocks are cached first so that 190 prefills cost one."""
    engine = make_engine(backend, kv_blocks=2048, max_num_seqs=256, max_batch_tokens=1024)
    compiler = GrammarCompiler(tokenizer, engine.config.vocab_size)
    run(engine, [Request("warm", prompt, _params(None), max_tokens=1)])
    stop = tokenizer.end_of_generation_ids
    requests, cases = [], {}

    def add(rid, spec, seed, check, max_tokens=MAX_TOKENS):
        requests.append(Request(rid, prompt, _params(seed), max_tokens=max_tokens,
                                stop_token_ids=stop, grammar=compiler.submit(spec)))
        cases[rid] = check

    for i, schema in enumerate(SCHEMAS):
        spec = GrammarSpec.from_response_format(
            {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}})
        for seed in (None, *SEEDS):
            add(f"schema{i}-{seed}", spec, seed, schema)
    for i, pattern in enumerate(REGEXES):
        for seed in (None, 1):
            add(f"regex{i}-{seed}", GrammarSpec("regex", pattern), seed, pattern)
    for i, (_, grammar, check) in enumerate(GRAMMARS):
        for seed in (None, 1):
            add(f"grammar{i}-{seed}", GrammarSpec("grammar", grammar), seed, check)
    add("short", GrammarSpec("json_schema", json.dumps(SCHEMAS[12])), None, None, max_tokens=4)
    failed: Future = Future()
    failed.set_exception(GrammarError("grammar rejected: made to fail"))
    requests.append(Request("failed", prompt, _params(None), grammar=failed))
    requests += free_requests(prompt)  # (their tokens are checked on exact_backend)
    tokens, reasons, errors = run(engine, requests)
    texts = {rid: tokenizer.decode(ids, skip_special_tokens=True) for rid, ids in tokens.items()}
    compiler.close()
    return prompt, cases, tokens, texts, reasons, errors, engine


def test_every_json_schema_output_validates(big_batch):
    jsonschema = pytest.importorskip("jsonschema")  # a test dependency; carry it to the device
    _, cases, _, texts, reasons, _, _ = big_batch
    checked = 0
    for rid, schema in cases.items():
        if not rid.startswith("schema"):
            continue
        assert reasons[rid] == "stop", f"{rid} ended {reasons[rid]}: {texts[rid]!r}"
        try:
            jsonschema.validate(json.loads(texts[rid]), schema)
        except (ValueError, jsonschema.ValidationError) as exc:
            pytest.fail(f"{rid}: {texts[rid]!r} does not validate: {exc}")
        checked += 1
    assert checked == 30 * 6


def test_regex_and_grammar_outputs_match(big_batch):
    _, cases, _, texts, reasons, _, _ = big_batch
    for rid, check in cases.items():
        if rid.startswith("regex"):
            assert reasons[rid] in ("stop", "length") and re.fullmatch(check, texts[rid]), (
                rid, texts[rid], reasons[rid])
        elif rid.startswith("grammar"):
            assert reasons[rid] == "stop" and check(texts[rid]), (rid, texts[rid])


def test_grammar_complete_stops_and_length_is_partial(big_batch):
    _, _, tokens, texts, reasons, errors, engine = big_batch
    # The grammar's end stops a sequence by itself: no end-of-generation token follows.
    assert not set(tokens["schema0-None"]) & engine.eos_token_ids
    assert reasons["short"] == "length" and len(tokens["short"]) == 4
    with pytest.raises(ValueError):
        json.loads(texts["short"])
    assert reasons["failed"] == "error" and "made to fail" in errors["failed"]
    assert tokens["failed"] == []
    assert engine.masks.steps > 0 and engine.overlapped_steps > 0


@pytest.fixture(scope="module")
def exact_backend(request, backend):
    """Where batches of other shapes must give the same tokens: float32 on the torch backend
    (bfloat16 activations, as int8 weights use, round differently per batch shape)."""
    if backend.device.type == "cpu":
        return request.getfixturevalue("smollm2_backend")
    return backend


def constrained_requests(prompt, tokenizer, compiler, picked) -> list[Request]:
    return [
        Request(f"schema{i}-{seed}", prompt, _params(seed), max_tokens=MAX_TOKENS,
                stop_token_ids=tokenizer.end_of_generation_ids,
                grammar=compiler.submit(GrammarSpec("json_schema", json.dumps(SCHEMAS[i]))))
        for i, seed in picked
    ]


def test_mixed_batch_free_rows_unchanged_constrained_rows_reproduce(exact_backend, tokenizer,
                                                                    prompt):
    """Free sequences batched with constrained ones give the tokens they give alone; the
    constrained ones give the same tokens in another batch (other neighbours, no overlap)."""
    engine = make_engine(exact_backend, kv_blocks=256)
    compiler = GrammarCompiler(tokenizer, engine.config.vocab_size)
    picked = [(0, None), (24, 3)]
    mixed, _, _ = run(engine, constrained_requests(prompt, tokenizer, compiler, picked)
                      + free_requests(prompt))
    assert engine.masks.steps > 0
    alone, _, _ = run(make_engine(exact_backend, kv_blocks=64), free_requests(prompt))
    assert len(alone["free-None"]) == FREE_TOKENS
    assert_same_or_near_tie(exact_backend, prompt, mixed["free-None"], alone["free-None"])
    assert mixed["free-7"] == alone["free-7"]
    again, _, _ = run(make_engine(exact_backend, kv_blocks=256, overlap=False),
                      constrained_requests(prompt, tokenizer, compiler, reversed(picked)))
    compiler.close()
    for rid, ids in again.items():
        if rid.endswith("None"):
            assert_same_or_near_tie(exact_backend, prompt, ids, mixed[rid])
        else:
            assert ids == mixed[rid], rid


def test_abort_while_compiling(backend):
    engine = make_engine(backend, kv_blocks=16)
    never: Future = Future()
    engine.add(Request("waits", [1, 2, 3], _params(None), grammar=never))
    assert engine.has_work() and engine.step() == []
    assert engine.abort("waits")
    [out] = engine.step()
    assert out.finish_reason == "abort" and not engine.has_work()
