"""A seeded test corpus, generated in memory: many scripts, emoji and ZWJ sequences, code,
numbers and digit runs, whitespace runs, tabs and newlines, contractions, special-token text,
and random Unicode. Nothing is downloaded; the same seed gives the same strings."""

from __future__ import annotations

import random

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you doing today?",
    "Le cœur a ses raisons que la raison ne connaît point.",
    "Größenwahn: Übermäßige Äußerungen über Straßenbahnen.",
    "¿Dónde está la biblioteca? ¡Aquí, señor!",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.",
    "ناقشت اللجنة المسألة بالتفصيل في اجتماعها الأخير.",
    "שלום עולם, מה שלומך היום?",
    "हिन्दी भाषा भारत की राजभाषा है।",
    "ภาษาไทยเป็นภาษาที่มีวรรณยุกต์",
    "我能吞下玻璃而不伤身体。今天天气很好！",
    "私はガラスを食べられます。それは私を傷つけません。",
    "나는 유리를 먹을 수 있어요. 그래도 아프지 않아요.",
    "Tiếng Việt có dấu: Đường phố Hà Nội rất đông đúc.",
    "Pijamalı hasta yağız şoföre çabucak güvendi.",
    "Zażółć gęślą jaźń, w pośpiechu się nie mylę.",
    "Γειά σου Κόσμε · Ωμέγα ∑ ∫ ∂ √ ∞ ≠ ≤ ≥",
    "ᚠᛇᚻ᛫ᛒᛦᚦ᛫ᚠᚱᚩᚠᚢᚱ᛫ᚠᛁᚱᚪ᛫ᚷᛖᚻᚹᛦᛚᚳᚢᛗ",
    "ქართული ენა · Հայերեն լեզու · አማርኛ ቋንቋ",
    "Ελληνικά, Русский, 中文, 日本語, 한국어, العربية, עברית",
    "naïve café résumé coöperate façade jalapeño Ångström",
    "e\u0301 vs é, n\u0303 vs ñ, A\u030a vs Å (combining marks)",
    "ﬁ ﬂ ﬀ ligatures, ｆｕｌｌｗｉｄｔｈ ＡＢＣ, ㈱ ㎏ ℃ ™ ©",
]
CONTRACTIONS = [
    "don't", "Don't", "DON'T", "I'm", "I'M", "we'll", "WE'LL", "they've", "THEY'VE",
    "she's", "SHE'S", "it'd", "you're", "YOU'RE", "can't", "won't", "y'all", "o'clock",
    "it’s", "I’M", "rock 'n' roll", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "''",
]  # fmt: skip
EMOJI = [
    "🙂", "😀😃😄", "👍🏽", "👩‍💻", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🧑🏿‍🚀", "❤️‍🔥", "🇫🇷🇯🇵", "1️⃣#️⃣",
    "👁‍🗨", "🫠", "🏴󠁧󠁢󠁳󠁣󠁴󠁿", "☃", "✔︎", "🐍🦀", "💯💯💯", "🤷‍♀️", "🧔🏻‍♂️", "🫶🏼",
]  # fmt: skip
CODE = [
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}",
    "const add = (a, b) => a + b; // arrow function\nconsole.log(add(2, 3));",
    'fn main() { println!("{}", vec![1, 2, 3].iter().sum::<i32>()); }',
    '{"name": "orcd", "version": "0.1.0", "tags": ["gguf", "llm"], "ok": true}',
    "SELECT id, name FROM users WHERE age >= 18 AND name LIKE '%son' ORDER BY id DESC;",
    '<div class="main"><p>Hello &amp; welcome</p><br/></div>',
    '#!/usr/bin/env bash\nset -euo pipefail\nfor f in *.txt; do wc -l "$f"; done',
    "x = [i**2 for i in range(10) if i % 2 == 0]  # squares",
    "if (x != nullptr && x->next) { x = x->next; } else { return -1; }",
    "    \t  indented with tabs\tand spaces  \n\t\tdeeper",
    "a+=1;b-=2;c*=3;d/=4;e%=5;f**=6;g//=7;h<<=8;i>>=9;j&=10;k|=11;l^=12",
    'std::vector<std::pair<int, std::string>> v{{1, "one"}, {2, "two"}};',
    "$$E = mc^2$$ and \\frac{a}{b} + \\sqrt{x^2 + y^2} \\leq \\infty",
    "https://example.com/path?query=1&x=%20y#frag user@example.org",
    "C:\\Program Files\\orcd\\bin\\orcd.exe --model=smollm2 -v",
]
NUMBERS = [
    "0", "7", "42", "123", "1234", "12345", "123456", "1234567890", "3.14159", "-0.001",
    "1,000,000", "1 000 000", "1e-9", "6.022e23", "0x1F", "0b1010", "0o777", "1/2", "99.9%",
    "$1,234.56", "€99", "2024-01-31", "12:34:56", "v1.2.3", "10^6", "٠١٢٣٤٥٦٧٨٩", "०१२३४५",
    "一二三四五", "Ⅻ Ⅳ ⅷ", "½ ¼ ¾ ⅓", "x² y³ z¹", "①②③", "𝟙𝟚𝟛", "١٢٣٤", "๑๒๓",
]  # fmt: skip
SPECIAL_TEXT = [
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>user\nHi<|im_end|>",
    "<|im_start|><|im_start|>", "<|im_start", "im_start|>", "<|im_end|>x<|endoftext|>y",
    "a<|endoftext|>b", " <|im_end|> ", "<repo_name>orcd<file_sep>", "<s>", "</s>", "<unk>",
    "<s>[INST] hi [/INST]", "<|begin_of_text|>", "<|eot_id|>", "<0x41>", "<pad>", "<mask>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "<think>", "a<think>b", " <think> x</think>", "<s><think>\n", "x<s> y</s>  z",
]  # fmt: skip
WHITESPACE = [
    " ",
    "  ",
    "   ",
    "    ",
    "\t",
    "\t\t",
    "\n",
    "\n\n",
    "\n\n\n",
    "\r\n",
    " \n ",
    "\u00a0",
    "\u3000",
    "\u2028",
    "\u2009",
    " \t \n",
    "\v",
    "\f",
    "\u200b",
    "\ufeff",
]
WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from "
    "or one had by word but not what all were we when your can said there use an each which she "
    "do how their if will up other about out many then them these so some her would make like "
    "tokenizer gguf llama transformer attention quantization inference worker stream redis"
).split()

# Code point ranges for random text: several planes, marks, controls, private use, specials.
UNICODE_RANGES = [
    (0x20, 0x7E), (0x00, 0x1F), (0x80, 0x2FF), (0x300, 0x36F), (0x370, 0x52F), (0x590, 0x6FF),
    (0x900, 0xDFF), (0x1100, 0x11FF), (0x2000, 0x2BFF), (0x3000, 0x30FF), (0x4E00, 0x9FFF),
    (0xAC00, 0xD7A3), (0xE000, 0xF8FF), (0xFB00, 0xFFFD), (0x10000, 0x1FAFF),
    (0x20000, 0x2A6DF), (0xE0000, 0xE007F), (0xF0000, 0xF00FF),
]  # fmt: skip


def random_unicode(rng: random.Random, length: int) -> str:
    """Random code points (never surrogates), weighted towards the ranges above."""
    chars = []
    for _ in range(length):
        low, high = rng.choice(UNICODE_RANGES)
        chars.append(chr(rng.randint(low, high)))
    return "".join(chars)


def build_corpus(seed: int = 0, size: int = 2400) -> list[str]:
    """`size` strings (at least the hand-written ones), deterministic for a seed."""
    rng = random.Random(seed)
    corpus = [*SENTENCES, *CONTRACTIONS, *EMOJI, *CODE, *NUMBERS, *SPECIAL_TEXT, *WHITESPACE, ""]
    # Digit runs of every length up to 40, bare and between words.
    for n in range(1, 41):
        digits = "".join(rng.choice("0123456789") for _ in range(n))
        corpus += [digits, f"x{digits}y", f" {digits} ", f"{digits}.{digits[::-1]}"]
    # Whitespace runs of every length up to 20 of each kind, around words.
    for n in range(1, 21):
        for ws in (" ", "\t", "\n", "\r\n", " \t", "\u00a0"):
            corpus += [ws * n, f"a{ws * n}b", f"{ws * n}word", f"word{ws * n}"]
    pools = [SENTENCES, CONTRACTIONS, EMOJI, CODE, NUMBERS, SPECIAL_TEXT, WORDS, WORDS, WORDS]
    while len(corpus) < size - 500:
        pieces = []
        for _ in range(rng.randint(1, 8)):
            pool = rng.choice(pools)
            pieces.append(rng.choice(pool))
            pieces.append(rng.choice(["", " ", " ", " ", "  ", "\n", "\t", ", ", ". ", "'"]))
        corpus.append("".join(pieces))
    while len(corpus) < size:
        corpus.append(random_unicode(rng, rng.randint(1, 24)))
    return corpus
