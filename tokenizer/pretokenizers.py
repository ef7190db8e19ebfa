"""Byte-level BPE pre-tokenizers, one per `tokenizer.ggml.pre` value.

A byte-level vocabulary's merges were learned on text cut by one particular regex; the same
cut must be made before merging or the ids differ. llama.cpp names the cut in
`tokenizer.ggml.pre` and keeps the regexes in `llama-vocab.cpp` (`llm_tokenizer_bpe`); we apply
them with the same `Split(..., "isolated")` steps, in the same order, then map bytes to the
GPT-2 byte alphabet.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Regex, pre_tokenizers

from tokenizer.errors import TokenizerError

# GPT-2's regex. llama.cpp's copy lacks the final `|\s+`, but it keeps unmatched text as its own
# piece, which is what that alternative matches: the splits are the same.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Llama 3's regex as its tokenizer.json has it. llama.cpp spells `(?i:'s|...)` as `'[sS]|...`
# because std::regex has no inline flags; Onig (inside `tokenizers`) and the Rust regex crate the
# model was trained with both fold case with Unicode rules, so we keep the original.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2's: Llama 3's with single digits (`\p{N}`, not `\p{N}{1,3}`).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's fallback for byte-level files without a known `pre` (LLAMA_VOCAB_PRE_TYPE_DEFAULT):
# punctuation runs, then GPT-2, then digit runs, then groups of three ASCII digits.
DEFAULT_SPLITS = (r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]")


@dataclass(slots=True, frozen=True)
class PreTokenizerSpec:
    """How one `pre` value cuts text, and the llama.cpp flags that come with it."""

    splits: tuple[str, ...]  # regexes applied one after the other, matches kept as pieces
    ignore_merges: bool = False  # a piece that is itself a token is taken whole (Llama 3)
    add_bos: bool = False  # llama.cpp's default for add_bos_token when the file is silent


_GPT2 = PreTokenizerSpec((GPT2_SPLIT,))
# SmolLM2 and StarCoder isolate every digit before the GPT-2 regex runs (their tokenizer.json:
# Digits(individual_digits=True) then ByteLevel). transformers' GGUF loader leaves this step out;
# SmolLM2's vocabulary holds no token mixing a digit with anything, so its ids agree anyway.
_SMOLLM = PreTokenizerSpec((r"\p{N}", GPT2_SPLIT))
_LLAMA3 = PreTokenizerSpec((LLAMA3_SPLIT,), ignore_merges=True, add_bos=True)
_QWEN2 = PreTokenizerSpec((QWEN2_SPLIT,))

PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {
    "default": PreTokenizerSpec(DEFAULT_SPLITS),
    "gpt-2": _GPT2,  # llama.cpp's spelling
    "gpt2": _GPT2,
    "smollm": _SMOLLM,
    "starcoder": _SMOLLM,
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "qwen2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
}


def pre_tokenizer_spec(pre: str) -> PreTokenizerSpec:
    """The spec for a `tokenizer.ggml.pre` value; an unknown one is a `TokenizerError`."""
    spec = PRE_TOKENIZERS.get(pre)
    if spec is None:
        supported = ", ".join(sorted(PRE_TOKENIZERS))
        raise TokenizerError(f"unsupported tokenizer.ggml.pre {pre!r}; supported: {supported}")
    return spec


def default_add_bos(pre: str) -> bool:
    """llama.cpp's add-BOS default for a byte-level vocabulary with `pre` (False if unknown)."""
    spec = PRE_TOKENIZERS.get(pre)
    return spec is not None and spec.add_bos


def byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """Regex splits for `pre`, then the GPT-2 byte-to-character mapping."""
    spec = pre_tokenizer_spec(pre)
    if spec.splits == (GPT2_SPLIT,):
        # ByteLevel's built-in regex is GPT-2's: one step, and exactly transformers' setup.
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    steps = [pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in spec.splits]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps)
