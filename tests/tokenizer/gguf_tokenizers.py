"""Small GGUF files holding only a tokenizer (plus the few llama keys and the one tensor that
transformers' GGUF loader wants), and vocabularies trained in memory to put in them."""

from __future__ import annotations

import io
import json
import random
from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np
import sentencepiece as spm
from gguf import TokenType
from tokenizers import Tokenizer, models, trainers
from tokenizers.pre_tokenizers import ByteLevel

from tokenizer.pretokenizers import byte_level_pre_tokenizer


def write_tokenizer_gguf(
    path: Path,
    *,
    model: str,
    tokens: Sequence[str],
    token_types: Sequence[int] | None = None,
    scores: Sequence[float] | None = None,
    merges: Sequence[str] | None = None,
    pre: str | None = None,
    bos_id: int | None = None,
    eos_id: int | None = None,
    unk_id: int | None = None,
    pad_id: int | None = None,
    add_bos: bool | None = None,
    add_space_prefix: bool | None = None,
    chat_template: str | None = None,
) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    # The llama hyperparameters transformers reads to build a config; the values do not matter.
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(4)
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(list(tokens))
    if token_types is not None:
        writer.add_token_types([int(t) for t in token_types])
    if scores is not None:
        writer.add_token_scores([float(s) for s in scores])
    if merges is not None:
        writer.add_token_merges(list(merges))
    for value, add in (
        (bos_id, writer.add_bos_token_id),
        (eos_id, writer.add_eos_token_id),
        (unk_id, writer.add_unk_token_id),
        (pad_id, writer.add_pad_token_id),
        (add_bos, writer.add_add_bos_token),
        (add_space_prefix, writer.add_add_space_prefix),
        (chat_template, writer.add_chat_template),
    ):
        if value is not None:
            add(value)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _syllable_text(rng: random.Random, n_sentences: int) -> list[str]:
    """Made-up words over several scripts, plus a sprinkling of rare characters."""
    syllables = ["ka", "to", "ri", "mu", "sen", "lo", "pra", "qui", "dex", "ban", "or", "el",
                 "ing", "tion", "ver", "sta", "the", "and", "ße", "çe", "œu", "ἀλ", "φι", "мо",
                 "ра", "ни", "カ", "タ", "本", "語", "中", "한", "국", "12", "7", "'s", "n't"]  # fmt: skip
    rare = ["ǅ", "ꙮ", "𓂀", "🙂", "€", "¶", "ℵ", "Ω", "ž", "ő"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    sentences = []
    for _ in range(n_sentences):
        chosen = [rng.choice(words) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.05:
            chosen.append(rng.choice(rare))
        sentences.append(" ".join(chosen))
    return sentences


def train_sentencepiece(
    vocab_size: int = 1000, seed: int = 0, byte_fallback: bool = True
) -> spm.SentencePieceProcessor:
    """A SentencePiece BPE model set up like Llama 2's: byte fallback, digits split, identity
    normalization, dummy prefix, whitespace kept as written."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_syllable_text(random.Random(seed), 8000)),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=byte_fallback,
        split_digits=True,
        character_coverage=0.999,  # the rarest characters stay out: byte fallback covers them
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["<think>"],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def sentencepiece_vocab(sp: spm.SentencePieceProcessor) -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, GGUF token types) as llama.cpp's converter writes them."""
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(TokenType.CONTROL)
        elif sp.is_byte(i):
            types.append(TokenType.BYTE)
        elif sp.is_unused(i):
            types.append(TokenType.UNUSED)
        elif sp.id_to_piece(i) == "<think>":
            types.append(TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
    return tokens, scores, types


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_byte_level(
    pre: str, vocab_size: int = 3000, seed: int = 0
) -> tuple[list[str], list[str]]:
    """(tokens, merges) of a byte-level BPE trained on text cut by `pre`'s pre-tokenizer, with
    three control tokens first, as a GGUF stores them."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = byte_level_pre_tokenizer(pre)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=ByteLevel.alphabet(),
        show_progress=False,
    )
    rng = random.Random(seed)
    text = _syllable_text(rng, 6000)
    text += [f"{rng.randint(0, 10**9)} it's {w}!!\n\n" for w in text[:500]]
    tokenizer.train_from_iterator(text, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    by_id = sorted(model["vocab"].items(), key=lambda item: item[1])
    tokens = [token for token, _ in by_id]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def write_padded_vocab(path: Path, source: Path, size: int = 150_000, seed: int = 0) -> Path:
    """The source model's byte-level vocabulary grown to `size` tokens, as a large real
    vocabulary looks: each new token joins two existing ones and comes with its merge (ranked
    after all the original merges, so the original tokens encode as before)."""
    from loader.gguf_file import open_gguf

    metadata = open_gguf(source).metadata
    tokens = list(metadata.get_str_list("tokenizer.ggml.tokens"))
    types = metadata.get_int_array("tokenizer.ggml.token_type").tolist()
    merges = list(metadata.get_str_list("tokenizer.ggml.merges"))
    known = set(tokens)
    normal = [t for t, kind in zip(tokens, types, strict=True) if kind == TokenType.NORMAL]
    rng = random.Random(seed)
    while len(tokens) < size:
        left, right = rng.choice(normal), rng.choice(normal)
        joined = left + right
        if joined in known or len(joined) > 24:
            continue
        known.add(joined)
        tokens.append(joined)
        types.append(TokenType.NORMAL)
        merges.append(f"{left} {right}")
    return write_tokenizer_gguf(
        path,
        model="gpt2",
        pre=metadata.get_str("tokenizer.ggml.pre"),
        tokens=tokens,
        token_types=types,
        merges=merges,
        bos_id=metadata.get_int("tokenizer.ggml.bos_token_id"),
        eos_id=metadata.get_int("tokenizer.ggml.eos_token_id"),
        chat_template=metadata.get_str("tokenizer.chat_template"),
    )
