"""`GGUFTokenizer`: encode, decode, stream and render chat prompts for one GGUF model.

Built from the file's metadata alone (no tokenizer.json, no transformers): `vocab.py` reads the
keys, `build.py` turns them into a `tokenizers.Tokenizer`, `detokenizer.py` decodes, and
`chat_template.py` renders prompts in a sandbox.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Mapping, Sequence

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
    is then tokenized as the plain characters it is. `encode_chat` is the other way round: the
    message content it is given is plain text unless the caller passes `parse_special=True`.
    """

    def __init__(self, vocab: GGUFVocab) -> None:
        self.vocab = vocab
        self.backend: Tokenizer = build_backend(vocab)
        self._plain_backend: Tokenizer | None = None  # built on first parse_special=False
        self._table: DecodeTable | None = None  # built on first decode
        self._chat_template: ChatTemplate | None = None
        self._special_pattern: re.Pattern[str] | None = None  # built on first chat
        self._special_by_text: dict[str, int] = {}
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
        parse_special: bool = False,
        **template_vars: object,
    ) -> tuple[str, list[int]]:
        """(prompt, ids) for a conversation: rendered by the chat template, BOS added as the
        file says unless the prompt starts with it (templates such as Llama 3's write
        `{{ bos_token }}` themselves). Never EOS: the prompt is where generation continues.

        Only the template's own text makes control tokens: control-token text in a message's
        content (a user writing `<|im_start|>system`) is tokenized as the characters it is.
        The ids are exactly those of the whole prompt tokenized with special tokens parsed
        (what llama.cpp and transformers do) whenever no content holds control-token text.
        `parse_special=True` parses content as well, as they do: for trusted input only.
        Content is `content` as a string, or the `text` of each part of a list of parts; roles,
        `tools` and template variables are the caller's and render as template text. A template
        that rewrites content beyond trimming or JSON-escaping it cannot keep control-token
        text in content plain: that is a TokenizerError (content without such text is fine)."""
        prompt = self.chat_template.render(
            messages, add_generation_prompt=add_generation_prompt, tools=tools, **template_vars
        )
        pattern = self._special_text()
        contents = _contents(messages)
        if parse_special or pattern is None or not any(map(pattern.search, contents)):
            ids = self.encode(prompt, add_special_tokens=False)
        else:
            marked, markers = _marked_messages(messages, len(contents))
            try:
                template_text = self.chat_template.render(
                    marked, add_generation_prompt=add_generation_prompt, tools=tools,
                    **template_vars,
                )  # fmt: skip
            except TokenizerError:  # the template's logic looks at the content itself
                spans = None
            else:
                spans = _content_spans(prompt, template_text, markers, contents)
            if spans is None:
                found = next(m.group() for m in map(pattern.search, contents) if m)
                raise TokenizerError(
                    f"message content holds control-token text ({found!r}) and the chat "
                    "template rewrites content, so it cannot be kept plain text: remove it, "
                    "or parse it with parse_special"
                )
            ids = self._encode_with_plain_spans(prompt, spans, pattern)
        if self.add_bos and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return prompt, ids

    def _special_text(self) -> re.Pattern[str] | None:
        """Matches the text of any control (or unknown) token, longest first, as `tokenizers`
        matches added tokens; None for a vocabulary without any."""
        if self._special_pattern is None:
            texts = sorted({self.vocab.tokens[i] for i in self.special_ids} - {""},
                           key=len, reverse=True)  # fmt: skip
            self._special_by_text = {self.vocab.tokens[i]: i for i in self.special_ids}
            self._special_pattern = re.compile("|".join(map(re.escape, texts)) or "(?!)")
        return None if self._special_pattern.pattern == "(?!)" else self._special_pattern

    def _encode_with_plain_spans(
        self, text: str, plain: list[tuple[int, int]], special: re.Pattern[str]
    ) -> list[int]:
        """`text` tokenized with control tokens read only outside the `plain` spans (sorted,
        disjoint): cut at each of those, each stretch between them tokenized with special
        parsing off. `tokenizers` cuts at added tokens the same way before the model runs, so
        the ids match a whole-text encode wherever the spans hold no control-token text."""
        ids: list[int] = []
        start = 0  # of the stretch not yet tokenized
        position = 0
        for span_start, span_end in [*plain, (len(text), len(text))]:
            for match in special.finditer(text, position, span_start):
                ids += self._encode_stretch(text[start : match.start()])
                ids.append(self._special_by_text[match.group()])
                start = match.end()
            position = span_end
        ids += self._encode_stretch(text[start:])
        return ids

    def _encode_stretch(self, text: str) -> list[int]:
        return self.encode(text, add_special_tokens=False, parse_special=False) if text else []

    def _token_or_empty(self, token_id: int | None) -> str:
        return "" if token_id is None else self.vocab.tokens[token_id]


def _contents(messages: Sequence[Mapping]) -> list[str]:
    """Every message's untrusted text, in order: `content` when a string, else the `text` of
    each part of a list of content parts."""
    texts = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts += [part["text"] for part in content
                      if isinstance(part, Mapping) and isinstance(part.get("text"), str)]
    return texts


def _marked_messages(messages: Sequence[Mapping], count: int) -> tuple[list[dict], list[str]]:
    """The messages with each content text replaced by a unique marker (private-use
    characters and digits: no template filter changes it), and the markers."""
    nonce = secrets.randbelow(10**12)
    markers = [f"\ue000{nonce}.{index}\ue001" for index in range(count)]
    texts = iter(markers)
    marked = []
    for message in messages:
        message = dict(message)
        content = message.get("content")
        if isinstance(content, str):
            message["content"] = next(texts)
        elif isinstance(content, list):
            message["content"] = [
                {**part, "text": next(texts)}
                if isinstance(part, Mapping) and isinstance(part.get("text"), str) else part
                for part in content
            ]
        marked.append(message)
    return marked, markers


MAX_ALIGNMENTS = 16  # positions followed at once while lining a prompt up with its markers


def _content_spans(
    prompt: str, template_text: str, markers: list[str], contents: list[str]
) -> list[tuple[int, int]] | None:
    """Where the content texts lie in `prompt`: `template_text` is the same render with each
    content replaced by its marker, so the prompt must read as its template pieces with each
    marker replaced by its content, as is or as a template may have written it (stripped,
    JSON-escaped). None when it does not (the template rewrote content some other way).

    Each content span is one of its content's own forms, never found by searching the
    prompt, so content cannot pass itself off as template text."""
    index = {marker: i for i, marker in enumerate(markers)}
    pieces = re.split("(" + "|".join(map(re.escape, markers)) + ")", template_text)
    # positions[k]: prompt positions reachable after piece k -> (previous position, span)
    positions: list[dict[int, tuple[int, tuple[int, int] | None]]] = [{0: (0, None)}]
    for k, piece in enumerate(pieces):
        forms = [piece] if k % 2 == 0 else _forms(contents[index[piece]])
        reached: dict[int, tuple[int, tuple[int, int] | None]] = {}
        for position in positions[-1]:
            for form in forms:
                if prompt.startswith(form, position) and len(reached) < MAX_ALIGNMENTS:
                    end = position + len(form)
                    reached.setdefault(end, (position, (position, end) if k % 2 else None))
        if not reached:
            return None
        positions.append(reached)
    if len(prompt) not in positions[-1]:
        return None
    spans, position = [], len(prompt)
    for reached in reversed(positions[1:]):
        position, span = reached[position]
        if span is not None and span[0] != span[1]:
            spans.append(span)
    return spans[::-1]


def _forms(text: str) -> list[str]:
    """What a chat template may write for a content text: itself, trimmed (`| trim`,
    `.strip()`), and JSON-escaped (`| tojson`, quotes excluded)."""
    forms = [text, text.strip(), text.lstrip(), text.rstrip(),
             json.dumps(text, ensure_ascii=False)[1:-1]]
    return list(dict.fromkeys(forms))


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
