"""GGUF vocabulary -> `tokenizers.Tokenizer`: the Rust engine does the work, we only map.

Byte-level (`gpt2`) files carry their merges; SentencePiece (`llama`) files carry scores, from
which we derive merges the way SentencePiece's BPE ranks them (a higher score merges first).
Tokens the file marks CONTROL, UNKNOWN or USER_DEFINED become added tokens, matched whole in
the text before the model runs, as llama.cpp's `tokenizer_st_partition` does.
"""

from __future__ import annotations

from functools import cache

from gguf import TokenType
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

from tokenizer.errors import TokenizerError
from tokenizer.pretokenizers import byte_level_pre_tokenizer, pre_tokenizer_spec
from tokenizer.vocab import BYTE_LEVEL, GGUFVocab

SPIECE_UNDERLINE = "\u2581"  # "▁", SentencePiece's visible space
ADDED_TYPES = (TokenType.CONTROL, TokenType.UNKNOWN, TokenType.USER_DEFINED)
SPECIAL_TYPES = (TokenType.CONTROL, TokenType.UNKNOWN)


@cache
def byte_to_char() -> dict[int, str]:
    """GPT-2's byte alphabet: printable Latin-1 bytes stand for themselves, the other 68 bytes
    for the characters U+0100 onwards, in byte order (so the space, 0x20, is "Ġ", U+0120)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def build_backend(vocab: GGUFVocab) -> Tokenizer:
    """A `tokenizers.Tokenizer` equivalent to llama.cpp's tokenizer for this vocabulary."""
    if vocab.model == BYTE_LEVEL:
        tokenizer = _byte_level(vocab)
    else:
        tokenizer = _sentencepiece(vocab)
    _add_tokens(tokenizer, vocab)
    _set_post_processor(tokenizer, vocab)
    return tokenizer


def _byte_level(vocab: GGUFVocab) -> Tokenizer:
    spec = pre_tokenizer_spec(vocab.pre)
    token_ids = _byte_level_token_ids(vocab)
    merges = _split_merges(vocab.merges or [])
    try:
        model = models.BPE(
            vocab=token_ids,
            merges=merges,
            ignore_merges=spec.ignore_merges,
            fuse_unk=False,
            byte_fallback=False,
        )
    except Exception as exc:  # tokenizers raises a bare Exception naming the bad merge
        raise TokenizerError(f"byte-level vocabulary rejected by tokenizers: {exc}") from None
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = byte_level_pre_tokenizer(vocab.pre)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _byte_level_token_ids(vocab: GGUFVocab) -> dict[str, int]:
    alphabet = frozenset(byte_to_char().values())
    if alphabet.issuperset("".join(vocab.tokens)):  # the usual case, checked in one pass
        return _unique_ids(vocab.tokens)
    keys = []
    for token, kind in zip(vocab.tokens, vocab.token_types.tolist(), strict=True):
        if kind not in ADDED_TYPES and not alphabet.issuperset(token):
            # A normal token written in plain text instead of the byte alphabet (seen in some
            # converted files): respell it, or text could never reach it. transformers does too.
            token = "".join(byte_to_char()[b] for b in token.encode("utf-8"))
        keys.append(token)
    return _unique_ids(keys)


def _split_merges(lines: list[str]) -> list[tuple[str, str]]:
    # llama.cpp looks for the separator from the second character, so a left half that is
    # itself a space still splits right.
    pairs = [(line[:cut], line[cut + 1 :]) for line in lines if (cut := line.find(" ", 1)) > 0]
    if len(pairs) != len(lines):
        index, line = next((i, m) for i, m in enumerate(lines) if m.find(" ", 1) <= 0)
        raise TokenizerError(f"tokenizer.ggml.merges[{index}] {line!r} has no space separator")
    return pairs


def _sentencepiece(vocab: GGUFVocab) -> Tokenizer:
    unk = vocab.tokens[vocab.unk_id] if vocab.unk_id is not None else None
    token_ids = _unique_ids(vocab.tokens)
    merges = sentencepiece_merges(vocab)
    try:
        model = models.BPE(
            vocab=token_ids,
            merges=merges,
            unk_token=unk,
            fuse_unk=True,  # SentencePiece writes a run of unknown characters as one <unk>
            byte_fallback=True,  # characters outside the vocabulary become <0xNN> tokens
        )
    except Exception as exc:  # tokenizers raises a bare Exception naming the problem
        raise TokenizerError(f"SentencePiece vocabulary rejected by tokenizers: {exc}") from None
    tokenizer = Tokenizer(model)
    # A normalizer, not the Metaspace pre-tokenizer transformers uses: Metaspace skips the
    # prefix when the text already starts with a space, so "  hi" would become "▁▁hi" where
    # SentencePiece and llama.cpp write "▁▁▁hi". The normalizer also runs on each stretch of
    # text after an added token, which matches llama.cpp adding the prefix after every special.
    steps = [normalizers.Replace(" ", SPIECE_UNDERLINE)]
    if vocab.add_space_prefix:
        steps.insert(0, normalizers.Prepend(SPIECE_UNDERLINE))
    tokenizer.normalizer = normalizers.Sequence(steps)
    decode_steps = [
        decoders.Replace(SPIECE_UNDERLINE, " "),
        decoders.ByteFallback(),
        decoders.Fuse(),
    ]
    if vocab.add_space_prefix:
        decode_steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(decode_steps)
    return tokenizer


def sentencepiece_merges(vocab: GGUFVocab) -> list[tuple[str, str]]:
    """BPE merges implied by SentencePiece scores: every way to cut a token into two tokens,
    ranked by the token's score, best first.

    SentencePiece's BPE merges the adjacent pair whose concatenation is the best-scoring piece;
    a merge list sorted by the result's score makes the same choice. Only NORMAL tokens take
    part: SentencePiece never forms control, byte or user-defined pieces by merging.
    """
    types = vocab.token_types.tolist()
    scores = vocab.scores.tolist()
    normal = {t for t, kind in zip(vocab.tokens, types, strict=True) if kind == TokenType.NORMAL}
    ranked: list[tuple[float, int, str, str]] = []
    for token_id, token in enumerate(vocab.tokens):
        if types[token_id] != TokenType.NORMAL or len(token) < 2:
            continue
        score = scores[token_id]
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in normal and right in normal:
                # Ties (equal scores) go to the longer left half, as transformers orders them.
                ranked.append((-score, -cut, left, right))
    ranked.sort()
    return [(left, right) for _, _, left, right in ranked]


def _unique_ids(tokens: list[str]) -> dict[str, int]:
    token_to_id = dict(zip(tokens, range(len(tokens)), strict=True))
    if len(token_to_id) != len(tokens):
        # llama.cpp refuses such a file too (its token-to-id map would lose an id).
        first = next(i for i, token in enumerate(tokens) if token_to_id[token] != i)
        later = token_to_id[tokens[first]]
        raise TokenizerError(f"tokens {first} and {later} are both {tokens[later]!r}")
    return token_to_id


def _add_tokens(tokenizer: Tokenizer, vocab: GGUFVocab) -> None:
    """Added tokens are matched in the raw text: control and unknown ones only when parsing
    special tokens, user-defined ones always (llama.cpp's rule). In a SentencePiece vocabulary
    the space prefix then goes on each stretch of text after one, as in llama.cpp and with the
    Prepend normalizer of the tokenizer.json Llama 2, Mistral and TinyLlama ship. SentencePiece's
    own encoder puts none after a user-defined token ("a<think>b": "▁a <think> b", here
    "▁a <think> ▁b")."""
    types = vocab.token_types.tolist()
    added = [
        AddedToken(token, special=kind in SPECIAL_TYPES, normalized=False)
        for token, kind in zip(vocab.tokens, types, strict=True)
        if kind in ADDED_TYPES
    ]
    if added:
        tokenizer.add_special_tokens([token for token in added if token.special])
        tokenizer.add_tokens([token for token in added if not token.special])


def _set_post_processor(tokenizer: Tokenizer, vocab: GGUFVocab) -> None:
    """BOS/EOS added in Rust when encoding with add_special_tokens (the file's add_* flags)."""
    template: list[str] = []
    special: list[tuple[str, int]] = []
    if vocab.add_bos:
        template.append(vocab.tokens[vocab.bos_id])
        special.append((vocab.tokens[vocab.bos_id], vocab.bos_id))
    template.append("$A")
    if vocab.add_eos:
        template.append(vocab.tokens[vocab.eos_id])
        special.append((vocab.tokens[vocab.eos_id], vocab.eos_id))
    if special:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=list(dict.fromkeys(special))
        )
