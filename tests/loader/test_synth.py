"""Synthetic models: every shape round-trips through our loader and loads in transformers.

The expected sizes below are typed in from the real models' configs, not taken from
`loader.synth`, and values are checked with gguf's own dequantiser. Files are one layer deep;
transformers' legacy GGUF path parses every vocabulary entry through numpy (seconds per file),
so each shape is loaded there once, and the 8B one only under the `slow` marker.
"""

from __future__ import annotations

import gzip
import math

import numpy as np
import pytest
from gguf import GGMLQuantizationType, TokenType
from gguf.quants import dequantize

from loader import registry, synth, synth_blocks, synth_vocab
from loader.config import read_config
from loader.gguf_file import open_gguf
from loader.registry import DEFAULT_MODEL, ModelNotFoundError, resolve_model
from tests.hf_gguf import parse_once
from worker.cli import main

T = GGMLQuantizationType

# name: (arch, layers, hidden, heads, kv heads, ffn, vocab, context, rope base, eps, tied, pre)
REAL_SHAPES = {
    "smollm2-135m": ("llama", 30, 576, 9, 3, 1536, 49152, 8192, 1e5, 1e-5, True, "smollm"),
    "qwen2-0.5b": ("qwen2", 24, 896, 14, 2, 4864, 151936, 32768, 1e6, 1e-6, True, "qwen2"),
    "phi3-mini": ("phi3", 32, 3072, 32, 32, 8192, 32064, 4096, 1e4, 1e-5, False, "default"),
    "tinyllama-1.1b": ("llama", 22, 2048, 32, 4, 5632, 32000, 2048, 1e4, 1e-5, False, "default"),
    "llama3-8b": ("llama", 32, 4096, 32, 8, 14336, 128256, 8192, 5e5, 1e-5, False, "llama-bpe"),
}
# One file per shape; between them every type the brief names is written at least once.
# K-quants on 576/896-wide rows exercise llama.cpp's fallbacks (Q4_K->Q5_0, Q6_K->Q8_0).
SHAPE_QUANTS = {
    "smollm2-135m": "Q4_K",
    "qwen2-0.5b": "Q6_K",
    "phi3-mini": "F16",
    "tinyllama-1.1b": "BF16",
    "llama3-8b": "Q4_0",
}
# llama.cpp's general.file_type (LLAMA_FTYPE_*; a uniform K-quant file is its _S variant)
FILE_TYPE = {"Q4_K": 14, "Q6_K": 18, "F16": 1, "BF16": 32, "Q4_0": 2}
TOKENIZER = {"llama3-8b": "gpt2", "smollm2-135m": "gpt2", "qwen2-0.5b": "gpt2",
             "phi3-mini": "llama", "tinyllama-1.1b": "llama"}  # fmt: skip
FALLBACK = {"Q4_K": T.Q5_0, "Q5_K": T.Q5_1, "Q6_K": T.Q8_0}
BLOCK = {"Q4_K": 256, "Q5_K": 256, "Q6_K": 256}
SAMPLE_ROWS = 64  # dequantise only this many rows per weight: full 8B embeddings take minutes
PROMPT = "Hello world, this is a test."
# Under pytest-xdist a shape's two tests run on one worker, which writes its file once.
ALL_SHAPES = [pytest.param(s, marks=pytest.mark.xdist_group(f"synth-{s}")) for s in REAL_SHAPES]
SLOW_8B = [pytest.param(s, marks=[pytest.mark.xdist_group(f"synth-{s}")]
                        + ([pytest.mark.slow] if s == "llama3-8b" else [])) for s in REAL_SHAPES]


@pytest.fixture(scope="module")
def write(tmp_path_factory):
    """write(shape, quant, seed=0, layers=1) -> path; each distinct file is written once, and
    deleted after the module (pytest keeps old tmp dirs; the 8B one is 700 MB)."""
    written = {}

    def write_once(shape_name, quant, seed=0, layers=1):
        key = (shape_name, quant, seed, layers)
        if key not in written:
            path = tmp_path_factory.mktemp("synth") / f"{shape_name}-{quant}-{seed}-{layers}.gguf"
            shape = synth.SHAPES[shape_name].with_layers(layers)
            synth.write_synthetic_gguf(path, shape, synth.parse_quant(quant), seed=seed)
            written[key] = path
        return written[key]

    yield write_once
    for path in written.values():
        path.unlink(missing_ok=True)


def expected_tensors(shape_name, quant):
    """GGUF dims and type of every tensor, from the real model's layout (llama.cpp names)."""
    arch, _, h, heads, kv_heads, ffn, vocab, *_, tied, _ = REAL_SHAPES[shape_name]
    head_dim = h // heads
    q, kv = heads * head_dim, kv_heads * head_dim

    def weight(fan_in, fan_out):
        qtype = T[quant]
        if fan_in % BLOCK.get(quant, 1):
            qtype = FALLBACK[quant]
        return (fan_in, fan_out), qtype

    f32 = T.F32
    tensors = {"token_embd.weight": weight(h, vocab), "output_norm.weight": ((h,), f32)}
    if not tied:
        tensors["output.weight"] = weight(h, vocab)
    blk = "blk.0"
    tensors |= {
        f"{blk}.attn_norm.weight": ((h,), f32),
        f"{blk}.ffn_norm.weight": ((h,), f32),
        f"{blk}.attn_output.weight": weight(q, h),
        f"{blk}.ffn_down.weight": weight(ffn, h),
    }
    if arch == "phi3":
        tensors[f"{blk}.attn_qkv.weight"] = weight(h, 3 * h)
        tensors[f"{blk}.ffn_up.weight"] = weight(h, 2 * ffn)
        return tensors
    for name, width in (("attn_q", q), ("attn_k", kv), ("attn_v", kv)):
        tensors[f"{blk}.{name}.weight"] = weight(h, width)
        if arch == "qwen2":
            tensors[f"{blk}.{name}.bias"] = ((width,), f32)
    tensors[f"{blk}.ffn_gate.weight"] = weight(h, ffn)
    tensors[f"{blk}.ffn_up.weight"] = weight(h, ffn)
    return tensors


def sample_values(gguf, name):
    info = gguf.tensors[name]
    rows = np.asarray(gguf.tensor_data(name)).reshape(math.prod(info.dims[1:]), -1)
    return dequantize(rows[:SAMPLE_ROWS], info.ggml_type)


def check_weights(gguf):
    """Weights: std 1/sqrt(fan_in) within 5 %, mean near 0; norms 1; biases small and finite."""
    for name, info in gguf.tensors.items():
        values = sample_values(gguf, name)
        assert np.isfinite(values).all(), name
        if name.endswith("norm.weight"):
            assert (values == 1).all(), name
        elif name.endswith(".bias"):
            assert 0 < values.std() < 0.5, name
        else:
            target = 1 / math.sqrt(info.dims[0])
            assert values.std() == pytest.approx(target, rel=0.05), name
            assert abs(values.mean()) < 0.05 * target, name


@pytest.mark.parametrize("quant", [t.name for t in synth.FILE_TYPES])
def test_random_blocks_dequantise_to_the_target_std(quant):
    spec = synth.TensorSpec("w", (1024, 512), T[quant], "weight", 0.02)
    raw = synth_blocks.random_tensor(spec, seed=3)
    assert raw.nbytes == spec.nbytes
    values = dequantize(raw.reshape(512, -1), T[quant])
    assert values.shape == (512, 1024)
    assert np.isfinite(values).all()
    assert values.std() == pytest.approx(0.02, rel=0.03)
    assert abs(values.mean()) < 0.01 * 0.02
    assert np.abs(values).max() < 6 * 0.02  # no outlier scales


def test_storage_type_falls_back_like_llama_cpp():
    assert synth.storage_type(T.Q4_K, 896) == T.Q5_0
    assert synth.storage_type(T.Q5_K, 576) == T.Q5_1
    assert synth.storage_type(T.Q6_K, 896) == T.Q8_0
    assert synth.storage_type(T.Q4_K, 4864) == T.Q4_K
    assert synth.storage_type(T.Q4_0, 48) == T.F16


@pytest.mark.parametrize("shape_name", ALL_SHAPES)
def test_round_trip_through_our_loader(write, shape_name):
    quant = SHAPE_QUANTS[shape_name]
    arch, layers, h, heads, kv_heads, ffn, vocab, ctx, rope, eps, tied, pre = (
        REAL_SHAPES[shape_name]
    )
    with open_gguf(write(shape_name, quant)) as gguf:
        meta = gguf.metadata
        assert meta.get_str("general.architecture") == arch
        assert meta.get_int(f"{arch}.block_count") == 1
        assert meta.get_int(f"{arch}.embedding_length") == h
        assert meta.get_int(f"{arch}.feed_forward_length") == ffn
        assert meta.get_int(f"{arch}.attention.head_count") == heads
        assert meta.get_int(f"{arch}.attention.head_count_kv") == kv_heads
        assert meta.get_int(f"{arch}.context_length") == ctx
        assert meta.get_int(f"{arch}.vocab_size") == vocab
        assert meta.get_int(f"{arch}.rope.dimension_count") == h // heads
        assert meta.get_float(f"{arch}.rope.freq_base") == pytest.approx(rope)
        assert meta.get_float(f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(eps)
        assert meta.get_int("general.file_type") == FILE_TYPE[quant]
        assert meta.get_int("general.quantization_version") == 2
        assert shape_name in meta.get_str("general.name")

        expected = expected_tensors(shape_name, quant)
        assert {name: (info.dims, info.ggml_type) for name, info in gguf.tensors.items()} == (
            expected
        )
        check_weights(gguf)

        tokens = meta.get_str_list("tokenizer.ggml.tokens")
        assert len(tokens) == vocab == len(set(tokens))
        assert len(meta.get_int_array("tokenizer.ggml.token_type")) == vocab
        assert meta.get_str("tokenizer.ggml.pre") == pre
        sentencepiece = TOKENIZER[shape_name] == "llama"
        assert meta.get_str("tokenizer.ggml.model") == TOKENIZER[shape_name]
        assert meta.get_bool("tokenizer.ggml.add_space_prefix") is sentencepiece
        if sentencepiece:
            assert len(meta.get_float_array("tokenizer.ggml.scores")) == vocab
            assert tokens[:3] == ["<unk>", "<s>", "</s>"]
        else:
            assert len(meta.get_str_list("tokenizer.ggml.merges")) == 48900
        for key in ("bos", "eos", "unknown", "padding", "eot"):
            assert 0 <= meta.get_int(f"tokenizer.ggml.{key}_token_id") < vocab
        assert tokens[meta.get_int("tokenizer.ggml.eot_token_id")] == "<|im_end|>"
        assert "<|im_start|>" in meta.get_str("tokenizer.chat_template")

        config = read_config(gguf)  # the engine's own reader accepts it
        assert (config.n_layers, config.hidden_size, config.vocab_size) == (1, h, vocab)
        assert config.tied_embeddings is tied


@pytest.mark.parametrize("quant", ["Q4_0", "Q4_1", "Q5_1", "Q5_K", "Q8_0", "F32"])
def test_other_quants_round_trip(write, quant):
    with open_gguf(write("smollm2-135m", quant)) as gguf:
        expected = expected_tensors("smollm2-135m", quant)
        assert {name: (info.dims, info.ggml_type) for name, info in gguf.tensors.items()} == (
            expected
        )
        check_weights(gguf)


def test_same_seed_writes_the_same_bytes(write, tmp_path):
    first = write("smollm2-135m", "Q4_0", seed=7)
    again = tmp_path / "again.gguf"
    shape = synth.SHAPES["smollm2-135m"].with_layers(1)
    synth.write_synthetic_gguf(again, shape, T.Q4_0, seed=7)
    assert first.read_bytes() == again.read_bytes()
    other = write("smollm2-135m", "Q4_0", seed=8)
    assert first.read_bytes() != other.read_bytes()
    # a tensor's bytes depend on the seed and its name only, not on the layer count
    with open_gguf(first) as one, open_gguf(write("smollm2-135m", "Q4_0", seed=7, layers=2)) as two:
        assert (np.asarray(one.tensor_data("blk.0.ffn_up.weight"))
                == np.asarray(two.tensor_data("blk.0.ffn_up.weight"))).all()  # fmt: skip


def test_byte_level_vocabulary_truncates_consistently():
    source = synth_vocab.default_vocabulary()
    small = synth_vocab.byte_level_vocabulary(source, 1000)
    assert small.tokens == source.tokens[:1000]
    kept = set(small.tokens)
    assert 0 < len(small.merges) < len(source.merges)
    for merge in small.merges:
        left, right = merge.split(" ")
        assert {left, right, left + right} <= kept
    dropped = set(source.merges) - set(small.merges)
    assert all(any(p not in kept for p in (*m.split(" "), m.replace(" ", ""))) for m in dropped)
    assert max(small.bos_id, small.eos_id, small.pad_id, small.unk_id) < 1000


def test_byte_level_vocabulary_pads_with_unique_unused_fillers():
    source = synth_vocab.default_vocabulary()
    big = synth_vocab.byte_level_vocabulary(source, len(source.tokens) + 100)
    assert big.tokens[: len(source.tokens)] == source.tokens
    assert len(set(big.tokens)) == len(big.tokens)
    assert set(big.token_types[len(source.tokens) :]) == {TokenType.UNUSED}
    assert big.merges == source.merges


def test_sentencepiece_vocabulary_layout():
    vocab = synth_vocab.sentencepiece_vocabulary(
        synth_vocab.default_vocabulary(), 32064, ("<|end|>",)
    )
    assert len(vocab.tokens) == len(vocab.scores) == len(vocab.token_types) == 32064
    assert len(set(vocab.tokens)) == 32064
    assert vocab.tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert (vocab.unk_id, vocab.bos_id, vocab.eos_id) == (0, 1, 2)
    assert vocab.tokens[3:259] == [f"<0x{b:02X}>" for b in range(256)]
    assert set(vocab.token_types[3:259]) == {TokenType.BYTE}
    assert vocab.tokens[-3:] == ["<|im_start|>", "<|im_end|>", "<|end|>"]
    assert set(vocab.token_types[-3:]) == {TokenType.CONTROL}
    pieces = [i for i, t in enumerate(vocab.token_types) if t == TokenType.NORMAL]
    assert len(pieces) > 30000
    assert all(not any(ch in vocab.tokens[i] for ch in " Ġ\n") for i in pieces)
    assert "▁the" in vocab.tokens
    scores = [vocab.scores[i] for i in pieces]
    assert all(a > b for a, b in zip(scores, scores[1:], strict=False))


def test_synth_needs_no_model_file(write, tmp_path, monkeypatch):
    """The vocabulary ships with orcd: with no default model installed, every shape still gets
    its vocabulary, and the file written is the same as with the model there."""
    expected = write("smollm2-135m", "Q4_0")
    monkeypatch.delenv(registry.MODELS_DIR_ENV, raising=False)
    monkeypatch.setattr(registry, "BUILTIN_MODELS", {DEFAULT_MODEL: ("orcd_absent", "x.gguf")})
    with pytest.raises(ModelNotFoundError):
        resolve_model(DEFAULT_MODEL)
    synth_vocab.default_vocabulary.cache_clear()
    try:
        for shape in synth.SHAPES.values():
            assert len(synth_vocab.build_vocabulary(shape).tokens) == shape.vocab_size
        out = tmp_path / "no-model.gguf"
        synth.write_synthetic_gguf(out, synth.SHAPES["smollm2-135m"].with_layers(1), T.Q4_0)
        assert out.read_bytes() == expected.read_bytes()
    finally:
        synth_vocab.default_vocabulary.cache_clear()


def tokenizer_metadata(meta):
    return {key: meta.raw(key) for key in meta if key.startswith("tokenizer.")}


def assert_same_metadata(got, want):
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, np.ndarray):
            assert np.array_equal(got[key], value), key
        else:
            assert got[key] == value, key


def test_shipped_vocabulary_is_the_default_models(tmp_path):
    """loader/data's vocabulary holds every tokenizer.* key of the default model, unchanged;
    `python -m loader.synth_vocab` rewrites it from the model, to the same bytes."""
    try:
        model = resolve_model(DEFAULT_MODEL)
    except ModelNotFoundError:
        pytest.skip("the default model is not installed")
    shipped = tmp_path / "shipped.gguf"
    shipped.write_bytes(gzip.decompress(synth_vocab.vocabulary_file().read_bytes()))
    with open_gguf(model) as real, open_gguf(shipped) as ours:
        assert not ours.tensors
        assert_same_metadata(tokenizer_metadata(ours.metadata), tokenizer_metadata(real.metadata))
        assert ours.metadata.get_str("general.license") == real.metadata.get_str("general.license")
        assert synth_vocab.default_vocabulary() == synth_vocab.vocabulary_from_metadata(
            real.metadata
        )
    again = tmp_path / "again.gguf.gz"
    assert synth_vocab.main([str(model), "--out", str(again)]) == 0
    assert again.read_bytes() == synth_vocab.vocabulary_file().read_bytes()


@pytest.mark.parametrize("shape_name", SLOW_8B)
def test_loads_in_transformers(write, shape_name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    _, _, h, heads, kv_heads, ffn, vocab, *_, tied, _ = REAL_SHAPES[shape_name]
    path = write(shape_name, SHAPE_QUANTS[shape_name])

    with parse_once():  # the tokenizer, the config and the weights read one parse of the file
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent,
                                                                  gguf_file=path.name)
    ids = tokenizer(PROMPT)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == PROMPT
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer(chat, add_special_tokens=False)["input_ids"].count(im_start) == 2

    config = model.config
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (
        h, heads, kv_heads
    )  # fmt: skip
    assert (config.num_hidden_layers, config.intermediate_size, config.vocab_size) == (
        1, ffn, vocab
    )  # fmt: skip
    assert config.tie_word_embeddings is tied
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), vocab)
    assert torch.isfinite(logits).all()


def test_cli_writes_a_file(tmp_path, capsys):
    out = tmp_path / "cli.gguf"
    argv = ["synth", "--shape", "tinyllama-1.1b", "--quant", "q8_0", "--out", str(out),
            "--layers", "1", "--seed", "5", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    with open_gguf(out) as gguf:
        assert read_config(gguf).n_layers == 1
        assert gguf.tensors["blk.0.attn_q.weight"].ggml_type == T.Q8_0


@pytest.mark.parametrize("flag, value", [("--shape", "gpt5"), ("--quant", "Q2_K"),
                                         ("--layers", "0"), ("--seed", "-1")])  # fmt: skip
def test_cli_rejects_bad_arguments(tmp_path, flag, value):
    args = {"--shape": "smollm2-135m", "--quant": "Q4_0", "--out": str(tmp_path / "x.gguf")}
    args[flag] = value
    with pytest.raises(SystemExit) as exc:
        main(["synth", *(part for item in args.items() for part in item)])
    assert exc.value.code == 2
    assert not (tmp_path / "x.gguf").exists()


def test_cli_reports_an_unwritable_path(tmp_path, capsys):
    out = tmp_path / "missing" / "x.gguf"
    argv = ["synth", "--shape", "smollm2-135m", "--quant", "Q4_0", "--out", str(out),
            "--layers", "1", "--quiet"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("orcd synth: error:") and "cannot write" in err and "\n" not in err
