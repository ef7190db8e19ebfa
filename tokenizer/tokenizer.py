"""`GGUFTokenizer`: encode, decode, stream and render chat prompts for one GGUF model.

Built from the file's metadata alone (no tokenizer.json, no transformers): `vocab.py` reads the
keys, `build.py` turns them into a `tokenizers.Tokenizer`, `detokenizer.py` decodes, and
`chat_template.py` renders prompts in a sandbox.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer

from loader.gguf_file import open_gguf
from loader.metadata import Metadata
from tokenizer.build import SPECIAL_TYPES, build_backend
from tokenizer.chat_template import ChatTemplate
from tokenizer.detokenizer import DecodeTable, StreamingDetokenizer
from tokenizer.errors import TokenizerError
from tokenizer.vocab import END_OF_GENERATION_TEXTS, GGUFVocab, read_vocab


class GGUFTokenizer:
    """The tokenizer of one GGUF file; thread-safe for encoding and decoding.

    Control tokens written in the text (`<|im_start|>`) are read as single tokens by default,
    as HuggingFace and llama.cpp do; pass `parse_special=False` for untrusted user text, which
    is then tokenized as the plain characters it is.
    """

    def __init__(self, vocab: GGUFVocab) -> None:
        self.vocab = vocab
        self.backend: Tokenizer = build_backend(vocab)
        self._plain_backend: Tokenizer | None = None  # built on first parse_special=False
        self._table: DecodeTable | None = None  # built on first decode
        self._chat_template: ChatTemplate | None = None
        special = np.flatnonzero(np.isin(vocab.token_types, SPECIAL_TYPES)).tolist()
        self.special_ids: frozenset[int] = frozenset(special)
        eog = {vocab.eos_id, vocab.eot_id, vocab.eom_id} - {None}
        eog.update(i for i in special if vocab.tokens[i] in END_OF_GENERATION_TEXTS)
        self.end_of_generation_ids: frozenset[int] = frozenset(eog)

    @classmethod
    def from_metadata(cls, metadata: Metadata) -> GGUFTokenizer:
        return cls(read_vocab(metadata))

    # -- the vocabulary ------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.vocab.size

    @property
    def bos_id(self) -> int | None:
        return self.vocab.bos_id

    @property
    def eos_id(self) -> int | None:
        return self.vocab.eos_id

    @property
    def eot_id(self) -> int | None:
        return self.vocab.eot_id

    @property
    def pad_id(self) -> int | None:
        return self.vocab.pad_id

    @property
    def unk_id(self) -> int | None:
        return self.vocab.unk_id

    @property
    def add_bos(self) -> bool:
        return self.vocab.add_bos

    @property
    def add_eos(self) -> bool:
        return self.vocab.add_eos

    def token_text(self, token_id: int) -> str:
        """The token as the file spells it (byte-level tokens in the GPT-2 byte alphabet)."""
        return self.vocab.tokens[token_id]

    # -- encoding ------------------------------------------------------------------------

    def encode(
        self, text: str, *, add_special_tokens: bool = True, parse_special: bool = True
    ) -> list[int]:
        """Token ids of `text`; BOS/EOS added as the file says when `add_special_tokens`."""
        return self.encode_batch([text], add_special_tokens=add_special_tokens,
                                 parse_special=parse_special)[0]  # fmt: skip

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        add_special_tokens: bool = True,
        parse_special: bool = True,
    ) -> list[list[int]]:
        """`encode` for many texts at once, spread over threads by `tokenizers`."""
        backend = self._backend(parse_special)
        texts = list(texts)
        try:
            # encode_batch_fast skips the character offsets that encode computes: ~15% faster,
            # also for a single text.
            encodings = backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)
        except TypeError:  # tokenizers' only word for a non-str or a lone surrogate
            raise TokenizerError(_why_not_encodable(texts)) from None
        return [encoding.ids for encoding in encodings]

    def _backend(self, parse_special: bool) -> Tokenizer:
        if parse_special:
            return self.backend
        if self._plain_backend is None:
            # A copy with special-token matching off: `tokenizers` has no per-call switch.
            # User-defined tokens stay matched, as in llama.cpp with parse_special=false.
            plain = Tokenizer.from_str(self.backend.to_str())
            plain.encode_special_tokens = True
            self._plain_backend = plain
        return self._plain_backend

    # -- decoding ------------------------------------------------------------------------

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """The text of `ids`; the inverse of `encode(..., add_special_tokens=False)`."""
        return self.decode_table.decode(ids, skip_special_tokens)

    def detokenizer(self, *, skip_special_tokens: bool = True) -> StreamingDetokenizer:
        """A fresh streaming detokenizer for one sequence of generated ids."""
        return StreamingDetokenizer(self.decode_table, skip_special_tokens)

    @property
    def decode_table(self) -> DecodeTable:
        """Every token's bytes; built on first use (two threads may both build it: harmless)."""
        if self._table is None:
            self._table = DecodeTable.from_vocab(self.vocab)
        return self._table

    # -- chat ----------------------------------------------------------------------------

    @property
    def chat_template(self) -> ChatTemplate:
        """The file's chat template, or ChatML when it has none; compiled on first use."""
        if self._chat_template is None:
            self._chat_template = ChatTemplate(
                self.vocab.chat_template,
                bos_token=self._token_or_empty(self.vocab.bos_id),
                eos_token=self._token_or_empty(self.vocab.eos_id),
            )
        return self._chat_template

    def encode_chat(
        self,
        messages: Sequence[dict],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[dict] | None = None,
        **template_vars: object,
    ) -> tuple[str, list[int]]:
        """(prompt, ids) for a conversation: rendered by the chat template, control tokens in
        the rendered text parsed, BOS added as the file says unless the prompt starts with it
        (templates such as Llama 3's write `{{ bos_token }}` themselves). Never EOS: the
        prompt is where generation continues."""
        prompt = self.chat_template.render(
            messages, add_generation_prompt=add_generation_prompt, tools=tools, **template_vars
        )
        ids = self.encode(prompt, add_special_tokens=False)
        if self.add_bos and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return prompt, ids

    def _token_or_empty(self, token_id: int | None) -> str:
        return "" if token_id is None else self.vocab.tokens[token_id]


def _why_not_encodable(texts: list[object]) -> str:
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            return f"text {index} to encode is a {type(text).__name__}, not a str"
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"text {index} is not valid Unicode: {exc.reason} at position {exc.start}"
    return "tokenizers refused the text"


def load_tokenizer(path: str | os.PathLike) -> GGUFTokenizer:
    """The tokenizer of the GGUF file at `path` (metadata only; tensor data is not read)."""
    with open_gguf(path) as gguf:
        return GGUFTokenizer.from_metadata(gguf.metadata)
