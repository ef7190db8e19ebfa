"""The tokenizer a GGUF file describes, read out of its metadata into plain data.

Key names and defaults follow llama.cpp (`llama-vocab.cpp`), the program these files are
written for: a SentencePiece (`llama`) vocabulary adds BOS and a space prefix unless the file
says otherwise, a byte-level (`gpt2`) one does neither unless its pre-tokenizer is Llama 3's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import TokenType

from loader.errors import GGUFError
from loader.metadata import Metadata
from tokenizer.errors import TokenizerError
from tokenizer.pretokenizers import default_add_bos

BYTE_LEVEL = "gpt2"  # byte-level BPE: GPT-2, Llama 3, Qwen2, SmolLM2
SENTENCEPIECE = "llama"  # SentencePiece BPE: Llama 2, TinyLlama, Mistral
SUPPORTED_MODELS = (BYTE_LEVEL, SENTENCEPIECE)

# Tokens that end generation by their text, as llama.cpp finds them (it keeps such a list too:
# files rarely store more than the EOS id, yet chat models stop on <|im_end|> or <|eot_id|>).
END_OF_GENERATION_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|eom_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<end_of_turn>",
        "<end_of_utterance>",
        "<EOT>",
        "<|return|>",
        "<|call|>",
    }
)

_SPECIAL_ID_KEYS = ("bos", "eos", "eot", "eom", "unknown", "padding")


@dataclass(slots=True, frozen=True)
class GGUFVocab:
    """Everything under `tokenizer.*` that tokenizing, decoding and chat rendering need."""

    model: str
    pre: str
    tokens: list[str]
    token_types: np.ndarray  # int32 per token, gguf.TokenType values
    scores: np.ndarray | None  # float32 per token; SentencePiece vocabularies rank merges by it
    merges: list[str] | None  # "left right" per line, best first; byte-level vocabularies only
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    eom_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    chat_template: str | None

    @property
    def size(self) -> int:
        return len(self.tokens)


def read_vocab(metadata: Metadata, default_pre: str = "default") -> GGUFVocab:
    """The vocabulary in `metadata`; a missing or malformed key is a `TokenizerError`."""
    try:
        return _read_vocab(metadata, default_pre)
    except GGUFError as exc:
        raise TokenizerError(f"tokenizer metadata: {exc}") from None


def _read_vocab(metadata: Metadata, default_pre: str) -> GGUFVocab:
    model = metadata.get_str("tokenizer.ggml.model")
    if model not in SUPPORTED_MODELS:
        raise TokenizerError(
            f"tokenizer.ggml.model {model!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_MODELS)}"
        )
    tokens = metadata.get_str_list("tokenizer.ggml.tokens")
    if not tokens:
        raise TokenizerError("tokenizer.ggml.tokens is empty")
    n = len(tokens)
    token_types = metadata.get_int_array("tokenizer.ggml.token_type", None)
    if token_types is None:
        token_types = np.full(n, TokenType.NORMAL, dtype=np.int32)
    token_types = token_types.astype(np.int32)
    scores = metadata.get_float_array("tokenizer.ggml.scores", None)
    for key, array in (("token_type", token_types), ("scores", scores)):
        if array is not None and len(array) != n:
            raise TokenizerError(f"tokenizer.ggml.{key} has {len(array)} entries for {n} tokens")
    merges = metadata.get_str_list("tokenizer.ggml.merges", None)
    if model == BYTE_LEVEL and merges is None:
        raise TokenizerError("byte-level (gpt2) vocabulary without tokenizer.ggml.merges")
    if model == SENTENCEPIECE and scores is None:
        raise TokenizerError("SentencePiece (llama) vocabulary without tokenizer.ggml.scores")

    # llama.cpp's defaults where the file is silent: SentencePiece files predate these keys.
    pre = metadata.get_str("tokenizer.ggml.pre", default_pre)
    spm = model == SENTENCEPIECE
    defaults = {"bos": 1, "eos": 2, "unknown": 0} if spm else {}
    ids = {}
    for name in _SPECIAL_ID_KEYS:
        token_id = metadata.get_int(f"tokenizer.ggml.{name}_token_id", defaults.get(name))
        # llama.cpp ignores an out-of-range id (some converters write -1 as u32) with a warning.
        ids[name] = token_id if token_id is not None and 0 <= token_id < n else defaults.get(name)
    add_bos = metadata.get_bool("tokenizer.ggml.add_bos_token", spm or default_add_bos(pre))
    add_eos = metadata.get_bool("tokenizer.ggml.add_eos_token", False)
    for flag, name in ((add_bos, "bos"), (add_eos, "eos")):
        if flag and ids[name] is None:
            raise TokenizerError(f"tokenizer.ggml.add_{name}_token is set but no {name} id is")
    return GGUFVocab(
        model=model,
        pre=pre,
        tokens=tokens,
        token_types=token_types,
        scores=scores,
        merges=merges,
        bos_id=ids["bos"],
        eos_id=ids["eos"],
        eot_id=ids["eot"],
        eom_id=ids["eom"],
        unk_id=ids["unknown"],
        pad_id=ids["padding"],
        add_bos=add_bos,
        add_eos=add_eos,
        add_space_prefix=metadata.get_bool("tokenizer.ggml.add_space_prefix", spm),
        chat_template=metadata.get_str("tokenizer.chat_template", None),
    )
