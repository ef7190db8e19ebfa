"""`orcd inspect PATH|NAME [--json]`: what a GGUF model holds, after full validation."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any

from loader.config import read_config
from loader.gguf_file import open_gguf
from loader.registry import DEFAULT_MODEL, resolve_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", nargs="?", default=DEFAULT_MODEL,
        help=f"a .gguf path or a model name (default: {DEFAULT_MODEL})",
    )
    parser.add_argument("--models-dir", help="directory of NAME.gguf files (or $ORCD_MODELS_DIR)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--tensors", action="store_true", help="list every tensor (text output)")


def describe(path: str) -> dict[str, Any]:
    """Everything `inspect` reports, as plain data."""
    with open_gguf(path) as gguf:
        config = read_config(gguf)
        meta = gguf.metadata
        tensors = list(gguf.tensors.values())
        by_type: Counter[str] = Counter()
        bytes_by_type: Counter[str] = Counter()
        for info in tensors:
            by_type[info.ggml_type.name] += 1
            bytes_by_type[info.ggml_type.name] += info.nbytes
        return {
            "path": str(gguf.path),
            "file_bytes": gguf.file_size,
            "gguf_version": gguf.version,
            "name": config.name,
            "architecture": config.architecture,
            "parameters": sum(t.n_elements for t in tensors),
            "tensor_bytes": sum(t.nbytes for t in tensors),
            "quant_mix": {
                name: {"tensors": by_type[name], "bytes": bytes_by_type[name]}
                for name in sorted(by_type, key=lambda n: -bytes_by_type[n])
            },
            "config": {
                "layers": config.n_layers,
                "hidden_size": config.hidden_size,
                "heads": config.n_heads,
                "kv_heads": config.n_kv_heads,
                "head_dim": config.head_dim,
                "ffn_size": config.ffn_size,
                "vocab_size": config.vocab_size,
                "context_length": config.context_length,
                "rms_eps": config.rms_eps,
                "rope_base": config.rope.base,
                "rope_dim": config.rope.dim,
                "rope_neox": config.rope.neox,
                "rope_scaling": config.rope.scaling_type,
                "rope_scaling_factor": config.rope.scaling_factor,
                "rope_freq_factors": config.rope.freq_factors_tensor is not None,
                "tied_embeddings": config.tied_embeddings,
                "qkv_bias": config.qkv_bias,
                "fused_qkv": config.fused_qkv,
                "fused_gate_up": config.fused_gate_up,
            },
            "tokenizer": {
                "model": meta.get_str("tokenizer.ggml.model", None),
                "pre": meta.get_str("tokenizer.ggml.pre", None),
                "tokens": len(meta.get_str_list("tokenizer.ggml.tokens", [])),
                "merges": len(meta.get_str_list("tokenizer.ggml.merges", [])),
                "chat_template": "tokenizer.chat_template" in meta,
            },
            "tensors": [
                {
                    "name": t.name,
                    "shape": list(t.shape),
                    "type": t.ggml_type.name,
                    "offset": gguf.data_offset + t.offset,
                    "bytes": t.nbytes,
                }
                for t in tensors
            ],
        }


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def _print_text(info: dict[str, Any], with_tensors: bool) -> None:
    cfg, tok = info["config"], info["tokenizer"]
    print(f"{info['name']}  ({info['path']})")
    print(f"  architecture    {info['architecture']}  (GGUF v{info['gguf_version']})")
    print(f"  parameters      {info['parameters'] / 1e6:,.1f} M")
    print(f"  size            {_size(info['file_bytes'])} file, "
          f"{_size(info['tensor_bytes'])} of tensors")
    mix = ", ".join(
        f"{name} x{v['tensors']} ({_size(v['bytes'])})" for name, v in info["quant_mix"].items()
    )
    print(f"  quant mix       {mix}")
    print(f"  layers          {cfg['layers']}, hidden {cfg['hidden_size']}, ffn {cfg['ffn_size']}")
    print(f"  attention       {cfg['heads']} heads, {cfg['kv_heads']} kv heads, "
          f"head dim {cfg['head_dim']}")
    rope = "neox" if cfg["rope_neox"] else "normal"
    scaling = "" if cfg["rope_scaling"] == "none" else (
        f", {cfg['rope_scaling']} x{cfg['rope_scaling_factor']}")
    factors = ", rope_freqs" if cfg["rope_freq_factors"] else ""
    print(f"  rope            base {cfg['rope_base']:g}, dim {cfg['rope_dim']}, {rope}"
          f"{scaling}{factors}")
    print(f"  context length  {cfg['context_length']}")
    print(f"  vocab size      {cfg['vocab_size']}")
    print(f"  embeddings      {'tied' if cfg['tied_embeddings'] else 'separate output'}")
    print(f"  tokenizer       {tok['model']} (pre: {tok['pre']}), {tok['tokens']} tokens, "
          f"{tok['merges']} merges, chat template: {'yes' if tok['chat_template'] else 'no'}")
    print(f"  tensors         {len(info['tensors'])}")
    if with_tensors:
        width = max(len(t["name"]) for t in info["tensors"])
        for t in info["tensors"]:
            shape = "x".join(map(str, t["shape"]))
            print(f"    {t['name']:<{width}}  {t['type']:<6} {shape:<14} {_size(t['bytes'])}")


def run(args: argparse.Namespace) -> int:
    info = describe(str(resolve_model(args.model, args.models_dir)))
    if args.json:
        print(json.dumps(info))
    else:
        _print_text(info, args.tensors)
    return 0
