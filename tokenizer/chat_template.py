"""Chat templates from GGUF files: `tokenizer.chat_template` rendered into a prompt.

The template comes from a file anyone can write, so it is untrusted code: it runs in the
bounded sandbox of `sandbox.py`, and anything that goes wrong there (a `raise_exception`, a
syntax error, a blocked attribute, an exhausted time or size budget) becomes one
`TokenizerError`. A file without a template gets ChatML.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError

from tokenizer.errors import TokenizerError
from tokenizer.sandbox import BudgetExceeded, compile_template, render

# HuggingFace's ChatML template, used when a file has none (SmolLM2 and Qwen2 speak ChatML).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DEFAULT_TIMEOUT_S = 2.0
DEFAULT_MAX_OUTPUT_CHARS = 4 * 1024 * 1024  # about a million tokens: more than any context
MAX_DATA_DEPTH = 64  # nesting of messages and tools


class ChatTemplate:
    """A compiled chat template; `render` turns messages into the prompt text."""

    def __init__(
        self,
        source: str | None,
        *,
        bos_token: str = "",
        eos_token: str = "",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
    ) -> None:
        self.is_fallback = source is None
        self.source = CHATML_TEMPLATE if source is None else source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.timeout_s = timeout_s
        self.max_output_chars = max_output_chars
        try:
            self._template = compile_template(self.source)
        except TemplateSyntaxError as exc:
            raise TokenizerError(
                f"chat template: syntax error on line {exc.lineno}: {exc.message}"
            ) from None
        except TemplateError as exc:
            raise TokenizerError(f"chat template does not compile: {exc}") from None

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **template_vars: Any,
    ) -> str:
        """The prompt for `messages` (dicts with `role` and `content`, JSON-like values)."""
        if isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Sequence):
            raise TokenizerError("chat messages must be a list of objects")
        for index, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise TokenizerError(f"chat message {index} is not an object")
        if tools is not None and (
            isinstance(tools, str | bytes | Mapping)
            or not isinstance(tools, Sequence)
            or not all(isinstance(tool, Mapping) for tool in tools)
        ):
            raise TokenizerError("chat tools must be a list of objects")
        context = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            **_plain(template_vars, "template variables"),
            "messages": _plain(messages, "messages"),
            "tools": None if tools is None else _plain(tools, "tools"),
            "add_generation_prompt": bool(add_generation_prompt),
        }
        try:
            return render(self._template, context, self.timeout_s, self.max_output_chars)
        except BudgetExceeded as exc:
            raise TokenizerError(f"chat template stopped: {exc}") from None
        except SecurityError as exc:
            raise TokenizerError(f"chat template refused by the sandbox: {exc}") from None
        except TemplateError as exc:  # raise_exception(...) and undefined-value errors
            raise TokenizerError(f"chat template raised an error: {exc}") from None
        except RecursionError:
            raise TokenizerError("chat template recursed too deeply") from None
        except Exception as exc:  # untrusted code: any failure is the template's
            raise TokenizerError(f"chat template failed: {type(exc).__name__}: {exc}") from None


def _plain(value: Any, what: str, depth: int = 0) -> Any:
    """A copy of JSON-like data (dict, list, str, int, float, bool, None), nothing else."""
    if depth > MAX_DATA_DEPTH:
        raise TokenizerError(f"chat {what} nest deeper than {MAX_DATA_DEPTH} levels")
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, Mapping):
        plain = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TokenizerError(f"chat {what}: object key {key!r} is not a string")
            plain[key] = _plain(item, what, depth + 1)
        return plain
    if isinstance(value, list | tuple):
        return [_plain(item, what, depth + 1) for item in value]
    raise TokenizerError(f"chat {what}: {type(value).__name__} values are not allowed")
