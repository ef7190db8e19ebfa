"""Chat templates: the default model's renders exactly as transformers' apply_chat_template;
hostile templates (escapes, endless loops, memory bombs) end in a TokenizerError, fast."""

from __future__ import annotations

import time
from datetime import datetime

import pytest

from tests.tokenizer.gguf_tokenizers import write_tokenizer_gguf
from tokenizer import CHATML_TEMPLATE, ChatTemplate, TokenizerError, load_tokenizer

SYSTEM = {"role": "system", "content": "You are terse. Réponds en français 🙂."}
TURNS = [
    {"role": "user", "content": "Hi! <b>bold</b> & 'quotes' \"double\"\nsecond line"},
    {"role": "assistant", "content": "Bonjour.\n\n  Indented\tand tabbed."},
    {"role": "user", "content": "日本語で？ {{ not a template }} {% neither %}"},
    {"role": "assistant", "content": ""},
    {"role": "user", "content": "Last one <|im_end|> with special text"},
]
CONVERSATIONS = {
    "single turn": TURNS[:1],
    "multi-turn": TURNS,
    "system single turn": [SYSTEM, *TURNS[:1]],
    "system multi-turn": [SYSTEM, *TURNS],
    "ends with assistant": TURNS[:2],
}


@pytest.mark.xdist_group("smollm-reference")  # transformers' tokenizer: tests/tokenizer/conftest.py
@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_default_template_matches_transformers(
    smollm, smollm_reference, name, add_generation_prompt
):
    messages = CONVERSATIONS[name]
    ours = smollm.chat_template.render(messages, add_generation_prompt=add_generation_prompt)
    reference = smollm_reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours == reference
    assert not smollm.chat_template.is_fallback
    assert ours.startswith("<|im_start|>system\n")


def test_encode_chat_parses_control_tokens(smollm):
    prompt, ids = smollm.encode_chat(TURNS[:1])
    assert ids == smollm.encode(prompt)  # no BOS: SmolLM2's file says add_bos_token = false
    assert ids[0] == 1 and ids.count(1) == 3  # <|im_start|> x3, including the generation prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    # User text that spells a control token stays text (tests/tokenizer/test_chat_injection.py)
    # unless the caller opts in to parsing it.
    _, ids = smollm.encode_chat([TURNS[4]])
    assert ids.count(2) == 2
    _, ids = smollm.encode_chat([TURNS[4]], parse_special=True)
    assert ids.count(2) == 3


@pytest.mark.xdist_group("smollm-reference")
def test_chatml_fallback_and_bos_handling(tmp_path, smollm_reference):
    tokens = ["<unk>", "<s>", "</s>", *"abcdefgh", "\u2581"]
    path = write_tokenizer_gguf(
        tmp_path / "plain.gguf", model="llama", tokens=tokens, token_types=[2, 3, 3] + [1] * 9,
        scores=[0.0] * 12, bos_id=1, eos_id=2, unk_id=0,
    )  # fmt: skip
    tokenizer = load_tokenizer(path)
    template = tokenizer.chat_template
    assert template.is_fallback and template.source == CHATML_TEMPLATE
    messages = [{"role": "user", "content": "abc"}]
    prompt, ids = tokenizer.encode_chat(messages)
    assert prompt == "<|im_start|>user\nabc<|im_end|>\n<|im_start|>assistant\n"
    reference = smollm_reference.apply_chat_template(
        messages, chat_template=CHATML_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    assert prompt == reference
    assert ids[0] == 1 and ids.count(1) == 1  # add_bos (the default for SentencePiece)
    # A template that writes BOS itself does not get a second one.
    tokenizer._chat_template = ChatTemplate(
        "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}", bos_token="<s>"
    )
    prompt, ids = tokenizer.encode_chat(messages)
    assert prompt == "<s>abc" and ids.count(1) == 1 and ids[0] == 1


def test_variables_tools_and_helpers():
    template = ChatTemplate(
        "{{ bos_token }}|{{ eos_token }}|{{ tools | tojson }}|{{ add_generation_prompt }}|"
        "{{ extra }}|{{ strftime_now('%Y') }}|{{ messages[0]['content'] }}|"
        "{% for m in messages %}{% if loop.last %}{{ loop.index }}{% break %}{% endif %}"
        "{% endfor %}"
        "{% generation %}gen{% endgeneration %}|{{ dict(a=1) }}{{ dict.fromkeys('b') }}",
        bos_token="<s>",
        eos_token="</s>",
    )
    tools = [{"type": "function", "function": {"name": "f", "description": "é <b>"}}]
    rendered = template.render(
        [{"role": "user", "content": "x"}, {"role": "user", "content": None}],
        add_generation_prompt=True, tools=tools, extra=[1, 2],
    )  # fmt: skip
    year = str(datetime.now().year)
    assert rendered == (
        '<s>|</s>|[{"type": "function", "function": {"name": "f", "description": "é <b>"}}]|'
        f"True|[1, 2]|{year}|x|2gen|{{'a': 1}}{{'b': None}}"
    )


def test_raise_exception_message_reaches_the_caller():
    template = ChatTemplate("{{ raise_exception('Conversation roles must alternate') }}")
    with pytest.raises(TokenizerError, match="raised an error: Conversation roles must alternate"):
        template.render([])


@pytest.mark.parametrize(
    ("source", "match"),
    [("{% for %}", "syntax error on line 1"), ("{{ x | no_such_filter }}", "no_such_filter")],
)
def test_broken_templates(source, match):
    with pytest.raises(TokenizerError, match=match):
        ChatTemplate(source)


@pytest.mark.parametrize("messages", ["hi", {"role": "user"}, ["hi"], [{"role": object()}], None])
def test_messages_must_be_plain_data(messages):
    with pytest.raises(TokenizerError):
        ChatTemplate(CHATML_TEMPLATE).render(messages)


ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ (0).__class__.__base__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.system('echo pwned') }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ self.__init__.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ lipsum.__globals__ }}",
    "{{ range.__globals__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ messages.__class__.__init__ }}",
    "{{ messages[0].__class__ }}",
    "{{ messages.append(1) }}",
    "{% set x = messages.pop() %}",
    "{{ messages[0].update({'a': 1}) }}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "{{ namespace(__init__=1) }}",
    "{{ 'x'.translate({}) }}",
    "{{ ''.format.__self__ }}",
    "{{ '{0.__class__}'.format('') }}",
    "{{ ''|attr('__class__') }}",
    "{{ messages|map(attribute='__class__')|list }}",
    "{{ (messages|first)|attr('__class__') }}",
    "{{ messages|selectattr('__class__')|list }}",
    "{{ self['__init__'] }}",
    "{{ dict.mro()[1].__subclasses__() }}",
    "{% include 'other.j2' %}",
    "{% extends 'base.j2' %}",
    "{% import 'macros.j2' as m %}",
]
BOMBS = [
    "{% for i in range(10**9) %}x{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% set r = range(100000)|list %}{% for a in r %}{% for b in r %}{% endfor %}{% endfor %}",
    "{% for a in messages %}{% for b in range(100000) %}{% for c in range(100000) %}"
    "{% endfor %}{% endfor %}{% endfor %}",
    "{{ 'a' * 10**9 }}",
    "{{ 'ab' * 1000000 * 1000 }}",
    "{{ [1] * 10**9 }}",
    "{{ 2 ** (10 ** 10) }}",
    "{{ 10 ** 1000 * 10 ** 1000 * 10 ** 1000 }}",
    "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
    "{{ 'x'|center(10**9) }}",
    "{{ 'x'.ljust(10**9) }}",
    "{{ '%999999999d'|format(1) }}",
    "{{ '%999999999d' % 1 }}",
    "{{ '{:>999999999}'.format(1) }}",
    "{{ '{:>{}}'.format(1, 10**9) }}",
    "{{ ('a' * 1000000)|replace('a', 'a' * 1000) }}",
    "{{ ('a' * 1000000).replace('a', 'a' * 1000) }}",
    "{{ (['a' * 1000000] * 5)|join('x') }}",
    "{{ ('a\n' * 100000)|indent(10000) }}",
    "{{ ('a' * 1000000)|wordwrap(1, wrapstring='x' * 1000) }}",
    "{{ strftime_now('%1000000000Y') }}",
    "{{ [1, 2]|tojson(indent=10**9) }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}{{ ns.s|length }}",
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% else %}x{% endif %}{% endmacro %}"
    "{{ f(40) }}",
    "{% for i in range(100000) recursive %}{{ loop(range(100000)) }}{% endfor %}",
]


@pytest.mark.parametrize("source", ESCAPES + BOMBS)
def test_hostile_templates_fail_fast(source):
    messages = [{"role": "user", "content": "hi"}]
    start = time.monotonic()
    with pytest.raises(TokenizerError, match="chat template"):
        ChatTemplate(source, timeout_s=0.3).render(messages)
    assert time.monotonic() - start < 3.0


def test_budget_leaves_real_templates_alone():
    busy = "{% for i in range(20000) %}{{ i % 10 }}{% endfor %}{{ 'x' * 1000 }}{{ 'y'|center(80) }}"
    assert len(ChatTemplate(busy).render([])) == 20000 + 1000 + 80


def test_output_limit():
    template = ChatTemplate(
        "{% for m in messages %}{{ m.content }}{% endfor %}", max_output_chars=100
    )
    assert template.render([{"role": "user", "content": "x" * 100}]) == "x" * 100
    with pytest.raises(TokenizerError, match="more than 100"):
        template.render([{"role": "user", "content": "x" * 60}] * 2)
