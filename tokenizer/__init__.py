"""Tokenizers built from GGUF metadata, a UTF-8-safe streaming detokenizer and sandboxed chat
templates. Does not import torch.

    tokenizer = load_tokenizer(path)
    ids = tokenizer.encode("Hello")               # parse_special=False for untrusted text
    stream = tokenizer.detokenizer()               # stream.push(id) -> new text
    prompt, ids = tokenizer.encode_chat([{"role": "user", "content": "Hi"}])
"""

from tokenizer.chat_template import CHATML_TEMPLATE, ChatTemplate
from tokenizer.detokenizer import DecodeTable, StreamingDetokenizer
from tokenizer.errors import TokenizerError
from tokenizer.pretokenizers import PRE_TOKENIZERS, byte_level_pre_tokenizer
from tokenizer.tokenizer import GGUFTokenizer, load_tokenizer
from tokenizer.vocab import GGUFVocab, read_vocab

__all__ = [
    "CHATML_TEMPLATE",
    "PRE_TOKENIZERS",
    "ChatTemplate",
    "DecodeTable",
    "GGUFTokenizer",
    "GGUFVocab",
    "StreamingDetokenizer",
    "TokenizerError",
    "byte_level_pre_tokenizer",
    "load_tokenizer",
    "read_vocab",
]
