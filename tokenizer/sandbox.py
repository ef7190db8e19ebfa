"""The jinja2 sandbox chat templates run in, with a time and a size budget per render.

jinja2's `ImmutableSandboxedEnvironment` already forbids underscore attributes, mutating lists
and dicts, and unsafe callables. It does not bound time or memory, and a template can loop
forever or build a huge string in one operation. On top of it:

- time: every `for` loop is rewritten (in the parsed tree, before compiling) to pass its
  iterable through a guard that checks a deadline on each item; every call, attribute or item
  lookup, filter and intercepted operator checks it too. No loop can spin without passing one
  of these, so no `sys.settrace` is needed;
- size: operators, filters and str methods that multiply sizes (`*`, `%`, `**`, `+`,
  `center`, `indent`, `replace`, `join`, format widths...) are refused before they run when
  the result would be too large, every value a call or lookup returns is measured, and the
  output is cut off at a maximum length;
- internals: any underscore attribute is refused outright (jinja2 would hand back an
  Undefined that prints as ""), and `namespace()` refuses underscore names.

The environment is set up like transformers' `apply_chat_template` (trim and lstrip blocks,
loop controls, its `tojson`, `raise_exception`, `strftime_now`) so templates render the same.
"""

from __future__ import annotations

import json
import re
import string
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from functools import wraps
from typing import Any

from jinja2 import Template, nodes
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

MAX_WIDTH = 10_000  # largest width, indent, tab size or count a template may ask a filter for
MAX_INT_BITS = 4096  # largest integer a template may compute

_GUARD_FILTER = "orcd_guard_iter"
# Output-size parameters, by filter or str-method name: (position counting the subject as 0,
# keyword name).
_WIDTH_PARAMS: dict[str, tuple[int, str]] = {
    "center": (1, "width"),
    "ljust": (1, "width"),
    "rjust": (1, "width"),
    "zfill": (1, "width"),
    "expandtabs": (1, "tabsize"),
    "indent": (1, "width"),
    "wordwrap": (1, "width"),
    "truncate": (1, "length"),
    "batch": (1, "linecount"),
    "slice": (1, "slices"),
    "tojson": (2, "indent"),
}
_REFUSED_METHODS = frozenset({"translate", "maketrans"})  # unbounded expansion, never needed
_PRINTF_WIDTH = re.compile(r"%(?:\([^)]*\))?[-+ #0]*(\*|\d+)?(?:\.(\*|\d+))?")
_STRFTIME_WIDTH = re.compile(r"%[-_0^#]*(\d+)")


class BudgetExceeded(Exception):
    """Raised inside a render that runs out of time or size; templates cannot catch it."""


@dataclass(slots=True)
class _Budget:
    deadline: float
    timeout_s: float
    max_chars: int

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise BudgetExceeded(f"ran longer than {self.timeout_s:g} s")

    def check_value(self, value: Any) -> Any:
        if isinstance(value, str | bytes | list | tuple | dict) and len(value) > self.max_chars:
            raise BudgetExceeded(f"built a value of {len(value)} items (limit {self.max_chars})")
        if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            raise BudgetExceeded(f"computed an integer of more than {MAX_INT_BITS} bits")
        return value

    def check_size(self, size: int, what: str) -> None:
        if size > self.max_chars:
            raise BudgetExceeded(f"{what} would make {size} characters (limit {self.max_chars})")


_budget: ContextVar[_Budget | None] = ContextVar("orcd_chat_template_budget", default=None)


def _current_budget() -> _Budget:
    budget = _budget.get()
    if budget is None:  # a compiled template run outside render(), or jinja constant folding
        raise BudgetExceeded("rendered without a budget")
    return budget


def compile_template(source: str) -> Template:
    """Parse, guard every loop, compile. Raises jinja2's TemplateSyntaxError / TemplateError."""
    env = _make_environment()
    tree = env.parse(source)
    for loop in tree.find_all(nodes.For):
        loop.iter = nodes.Filter(loop.iter, _GUARD_FILTER, [], [], None, None)
    return env.from_string(tree)


def render(template: Template, context: dict[str, Any], timeout_s: float, max_chars: int) -> str:
    """Render within the budget; raises BudgetExceeded, SecurityError, TemplateError or
    whatever else the template's code raised."""
    budget = _Budget(time.monotonic() + timeout_s, timeout_s, max_chars)
    token = _budget.set(budget)
    try:
        chunks: list[str] = []
        length = 0
        for chunk in template.generate(context):
            length += len(chunk)
            if length > max_chars:
                raise BudgetExceeded(f"wrote more than {max_chars} characters")
            budget.check_time()
            chunks.append(chunk)
        return "".join(chunks)
    finally:
        _budget.reset(token)


class _Environment(ImmutableSandboxedEnvironment):
    """The immutable sandbox plus a time and size check on every hook it offers."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _current_budget()
        budget.check_time()
        if operator == "*":
            _check_repeat(budget, left, right)
        elif operator == "**":
            _check_power(left, right)
        elif operator == "%" and isinstance(left, str):
            _check_printf(left)
        elif operator == "+" and isinstance(left, str | list | tuple):
            if isinstance(right, str | list | tuple):
                budget.check_size(len(left) + len(right), "'+'")
        return budget.check_value(super().call_binop(context, operator, left, right))

    def getattr(self, obj: Any, attribute: str) -> Any:
        budget = _current_budget()
        budget.check_time()
        if isinstance(attribute, str) and attribute.startswith("_"):
            self.unsafe_undefined(obj, attribute)
        return budget.check_value(super().getattr(obj, attribute))

    def getitem(self, obj: Any, argument: Any) -> Any:
        budget = _current_budget()
        budget.check_time()
        if isinstance(argument, str) and argument.startswith("_") and not isinstance(obj, dict):
            self.unsafe_undefined(obj, argument)  # x["__class__"] is x.__class__ to jinja
        return budget.check_value(super().getitem(obj, argument))

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # jinja2 returns an Undefined that only fails when used further, and prints as "";
        # a template that reaches for internals is refused outright instead.
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        budget = _current_budget()
        budget.check_time()
        target = getattr(__obj, "__wrapped__", __obj)  # str.format arrives wrapped
        owner = getattr(target, "__self__", None)
        if isinstance(owner, str):
            _check_str_method(budget, getattr(target, "__name__", ""), owner, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        return budget.check_value(result)


class _SafeNamespace(Namespace):
    """`namespace()` that refuses underscore names, so nothing dunder-shaped is stored."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (Namespace's own trick)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _SafeNamespace._check_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _SafeNamespace._check_name(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"namespace attribute {name!r} starts with an underscore")


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without handing them the type."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` (HF's assistant-mask marker) renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


def _make_environment() -> _Environment:
    # transformers' settings (utils/chat_template_utils.py), so the same template renders the
    # same text: trim/lstrip blocks, loop controls, a tojson that keeps non-ASCII and does not
    # HTML-escape, raise_exception and strftime_now. lipsum is dropped: it only makes text.
    env = _Environment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationBlock]
    )
    env.filters["tojson"] = _tojson
    env.filters = {name: _guard_filter(name, f) for name, f in env.filters.items()}
    env.filters[_GUARD_FILTER] = _guard_iter
    env.globals.pop("lipsum", None)
    env.globals["namespace"] = _SafeNamespace
    env.globals["dict"] = _TemplateDict()
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _guard_iter(iterable: Iterable[Any]) -> Iterator[Any]:
    budget = _current_budget()
    for item in iterable:
        budget.check_time()
        yield item


def _guard_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    passes_context = hasattr(function, "jinja_pass_arg")

    @wraps(function)  # keeps jinja_pass_arg, so jinja still passes context/environment first
    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = _current_budget()
        budget.check_time()
        subject_args = args[1:] if passes_context else args
        _check_sizes(budget, name, subject_args, kwargs)
        if name == "format" and subject_args and isinstance(subject_args[0], str):
            _check_printf(subject_args[0])
        if name == "join" and subject_args:
            separator = _arg(subject_args, kwargs, 1, "d")
            _check_join(budget, separator if isinstance(separator, str) else "", subject_args[0])
        return budget.check_value(function(*args, **kwargs))

    return guarded


def _check_str_method(
    budget: _Budget, name: str, owner: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    if name in _REFUSED_METHODS:
        raise SecurityError(f"str.{name} is not available to chat templates")
    if name in ("format", "format_map"):
        _check_format_spec(owner, args, kwargs)
    elif name == "join" and args:
        _check_join(budget, owner, args[0])
    else:
        _check_sizes(budget, name, (owner, *args), kwargs)


def _check_sizes(
    budget: _Budget, name: str, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> None:
    """Refuse a filter or str method call whose output size parameter is out of bounds."""
    if name in _WIDTH_PARAMS:
        index, keyword = _WIDTH_PARAMS[name]
        width = _arg(args, kwargs, index, keyword)
        if isinstance(width, int) and abs(width) > MAX_WIDTH:
            raise BudgetExceeded(f"asked {name} for a size of {width} (limit {MAX_WIDTH})")
        if isinstance(width, str) and len(width) > MAX_WIDTH:
            raise BudgetExceeded(f"asked {name} for an indent of {len(width)} characters")
    subject = args[0] if args else None
    if not isinstance(subject, str):
        return
    if name == "replace":
        old, new = _arg(args, kwargs, 1, "old"), _arg(args, kwargs, 2, "new")
        if isinstance(old, str) and isinstance(new, str):
            count = len(subject) + 1 if not old else subject.count(old)
            budget.check_size(len(subject) + count * len(new), "replace")
    elif name in ("indent", "expandtabs"):
        width = _arg(args, kwargs, 1, "width" if name == "indent" else "tabsize")
        size = len(width) if isinstance(width, str) else width if isinstance(width, int) else 8
        mark = "\n" if name == "indent" else "\t"
        budget.check_size(len(subject) + subject.count(mark) * max(size, 0), name)
    elif name == "wordwrap":
        width = _arg(args, kwargs, 1, "width")
        wrap = _arg(args, kwargs, 3, "wrapstring")
        lines = len(subject) // max(width if isinstance(width, int) else 79, 1) + 1
        budget.check_size(len(subject) + lines * len(wrap if isinstance(wrap, str) else "\n"), name)


def _check_join(budget: _Budget, separator: str, items: Any) -> None:
    if isinstance(items, list | tuple):
        size = sum(len(item) for item in items if isinstance(item, str))
        budget.check_size(size + len(separator) * len(items), "join")


def _check_repeat(budget: _Budget, left: Any, right: Any) -> None:
    sequence, count = (left, right) if isinstance(right, int) else (right, left)
    if isinstance(sequence, str | list | tuple) and isinstance(count, int):
        budget.check_size(len(sequence) * max(count, 0), "'*'")
    elif isinstance(left, int) and isinstance(right, int):
        if left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise BudgetExceeded(f"computed an integer of more than {MAX_INT_BITS} bits")


def _check_power(base: Any, exponent: Any) -> None:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        if base.bit_length() * exponent > MAX_INT_BITS:
            raise BudgetExceeded(f"computed an integer of more than {MAX_INT_BITS} bits")


def _check_printf(format_string: str) -> None:
    for match in _PRINTF_WIDTH.finditer(format_string):
        for field in match.groups():
            if field is not None and field != "*" and int(field) > MAX_WIDTH:
                raise BudgetExceeded(f"used a format width of {field} (limit {MAX_WIDTH})")


def _check_format_spec(format_string: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    try:
        fields = list(string.Formatter().parse(format_string))
    except ValueError:
        return  # str.format will raise the same error itself
    for _, _, spec, _ in fields:
        if not spec:
            continue
        if "{" in spec:  # a width taken from the arguments: they must all be small
            for value in (*args, *kwargs.values()):
                if isinstance(value, int) and abs(value) > MAX_WIDTH:
                    raise BudgetExceeded(f"used a format width of {value} (limit {MAX_WIDTH})")
        for number in re.findall(r"\d+", spec):
            if int(number) > MAX_WIDTH:
                raise BudgetExceeded(f"used a format width of {number} (limit {MAX_WIDTH})")


def _arg(args: Sequence[Any], kwargs: Mapping[str, Any], index: int, keyword: str) -> Any:
    if keyword in kwargs:
        return kwargs[keyword]
    return args[index] if len(args) > index else None


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(format_string: str) -> str:
    for width in _STRFTIME_WIDTH.findall(format_string):
        if int(width) > MAX_WIDTH:
            raise BudgetExceeded(f"used a strftime width of {width} (limit {MAX_WIDTH})")
    return datetime.now().strftime(format_string)
