"""llguidance against xgrammar on the default model's vocabulary: import cost, what each pulls
in, grammar compile time and per-token mask time on a few JSON Schemas.

    python -m bench.grammar_libs    # only llguidance is a dependency: `pip install xgrammar`
                                    # to compare (a library not installed is left out)

Each schema is walked along one valid instance, tokenized by our tokenizer: every step computes
the next-token bitmask and then consumes the instance's token, so both libraries do the same
work. Compile times are cold (first compile of that schema), per-token times the mean over the
walk. Writes bench/results/grammar_libs-<time>.json.
"""

from __future__ import annotations

import importlib
import json
import sys
import time

import numpy as np

from bench.results_io import write_result
from loader.registry import resolve_model
from tokenizer import load_tokenizer

SCHEMAS = {
    "flat": (
        {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
         "required": ["name", "age"], "additionalProperties": False},
        {"name": "Ada Lovelace", "age": 36},
    ),
    "nested": (
        {"type": "object", "properties": {
            "user": {"type": "object", "properties": {
                "id": {"type": "integer", "minimum": 1},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
                "required": ["id", "tags"]},
            "active": {"type": "boolean"}}, "required": ["user", "active"]},
        {"user": {"id": 42, "tags": ["alpha", "beta"]}, "active": True},
    ),
    "enum_array": (
        {"type": "array", "minItems": 2, "maxItems": 4,
         "items": {"enum": ["red", "green", "blue", "cyan"]}},
        ["red", "blue", "cyan"],
    ),
    "pattern_anyof": (
        {"type": "object", "properties": {
            "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
            "value": {"anyOf": [{"type": "number", "minimum": 0, "maximum": 100},
                                {"type": "null"}]}},
         "required": ["date", "value"], "additionalProperties": False},
        {"date": "2026-12-07", "value": 12.5},
    ),
}


def _llguidance(tokenizer, pieces, special, eos):
    import llguidance
    import llguidance.numpy as llnp

    class _Vocab:
        tokens = pieces
        special_token_ids = special
        eos_token_id = eos
        bos_token_id = tokenizer.bos_id

        def __call__(self, text):
            return tokenizer.encode(text.decode("utf-8", "replace"), add_special_tokens=False,
                                    parse_special=False)

    started = time.perf_counter()
    lltok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocab()))
    setup_s = time.perf_counter() - started
    mask = llnp.allocate_token_bitmask(1, len(pieces))

    def run(schema, ids):
        started = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
        matcher = llguidance.LLMatcher(lltok, grammar)
        compile_s = time.perf_counter() - started
        assert not matcher.is_error(), matcher.get_error()
        mask_s = 0.0
        for token in ids:
            started = time.perf_counter()
            llnp.fill_next_token_bitmask(matcher, mask, 0)
            mask_s += time.perf_counter() - started
            assert matcher.consume_token(token), matcher.get_error()
        return compile_s, mask_s / len(ids)

    return setup_s, run


def _xgrammar(tokenizer, pieces, special, eos):
    import xgrammar

    started = time.perf_counter()
    info = xgrammar.TokenizerInfo(pieces, xgrammar.VocabType.RAW, stop_token_ids=[eos])
    compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
    setup_s = time.perf_counter() - started
    mask = xgrammar.allocate_token_bitmask(1, info.vocab_size)

    def run(schema, ids):
        started = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(schema), strict_mode=True)
        matcher = xgrammar.GrammarMatcher(compiled)
        compile_s = time.perf_counter() - started
        mask_s = 0.0
        for token in ids:
            started = time.perf_counter()
            matcher.fill_next_token_bitmask(mask, 0)
            mask_s += time.perf_counter() - started
            assert matcher.accept_token(token), token
        return compile_s, mask_s / len(ids)

    return setup_s, run


def main() -> int:
    tokenizer = load_tokenizer(resolve_model("smollm2-135m"))
    table = tokenizer.decode_table
    pieces = list(table.pieces)
    special = [i for i, flag in enumerate(table.special) if flag]
    result = {"vocab_size": len(pieces), "libraries": {}}
    for name, make in (("llguidance", _llguidance), ("xgrammar", _xgrammar)):
        before = set(sys.modules)
        started = time.perf_counter()
        try:
            module = importlib.import_module(name)
        except ImportError:
            print(f"{name} is not installed (pip install {name}): left out", file=sys.stderr)
            continue
        import_s = time.perf_counter() - started
        pulled = sorted(_third_party(set(sys.modules) - before) - {name})
        setup_s, run = make(tokenizer, pieces, special, tokenizer.eos_id)
        per_schema = {}
        for schema_name, (schema, instance) in SCHEMAS.items():
            ids = tokenizer.encode(json.dumps(instance), add_special_tokens=False)
            compile_s, mask_s = run(schema, ids)
            per_schema[schema_name] = {"compile_ms": round(compile_s * 1e3, 2),
                                       "mask_us_per_token": round(mask_s * 1e6, 1),
                                       "tokens": len(ids)}
        result["libraries"][name] = {
            "version": getattr(module, "__version__", None) or _version(name),
            "import_s": round(import_s, 3),
            "tokenizer_setup_ms": round(setup_s * 1e3, 1),
            "imports_pulled": pulled,
            "schemas": per_schema,
            "mean_mask_us": round(float(np.mean(
                [s["mask_us_per_token"] for s in per_schema.values()])), 1),
        }
    print(json.dumps(result, indent=2))
    write_result("grammar_libs", result)
    return 0


def _third_party(modules: set[str]) -> set[str]:
    """Top-level packages among `modules` that live in site-packages (not the standard library)."""
    tops = {name.split(".")[0] for name in modules}
    return {top for top in tops
            if "site-packages" in (getattr(sys.modules.get(top), "__file__", None) or "")}


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    raise SystemExit(main())
