"""Write a random checkpoint with Mistral-7B-v0.1's exact shapes (or any config), for offline tests and benches.

    python tools/make_shaped_checkpoint.py OUT_DIR                       # Mistral-7B-v0.1 shapes, HF layout, ~14.5 GB
    python tools/make_shaped_checkpoint.py OUT_DIR --layers 2 --dim 1024 --hidden 3584   # a CI-sized cut
    python tools/make_shaped_checkpoint.py OUT_DIR --layout consolidated                 # params.json + consolidated.safetensors

HF layout as the real mistralai/Mistral-7B-v0.1 repository has it: config.json, bf16 shards
model-0000k-of-0000n.safetensors split at --shard-gb (the real repo: 2 shards, 9.94 + 4.54 GB, HF's old 10 GB
max_shard_size) and model.safetensors.index.json ({"metadata": {"total_size"}, "weight_map"}), tensor names
model.layers.{i}.self_attn.q_proj.weight ... lm_head.weight. Consolidated layout: Mistral's canonical names
(layers.{i}.attention.wq.weight ...) in one consolidated.safetensors beside params.json. The tokenizer is the
real 32000-piece Mistral v1 SentencePiece model that the mistral-common package ships (copied, not downloaded).

The weights are random bf16 bit patterns: random sign and mantissa, exponent 2^-7 or 2^-6, so |w| lies in
[0.0078, 0.031) (about the scale of a trained 4096-wide layer), norm weights are 1. They are streamed to disk one
chunk at a time: a 14.5 GB checkpoint never sits in memory. The point is shapes, sizes and layouts, not text.
"""
import argparse
import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minispec.mistral.weights import hf_to_canonical                  # noqa: E402

MISTRAL_7B_V01 = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, vocab_size=32000,
                      sliding_window=4096, rope_theta=10000.0, norm_eps=1e-5, max_seq_len=32768)
CHUNK = 1 << 24          # elements generated and written at a time (32 MB of bf16)


def hf_config(c):
    """config.json as mistralai/Mistral-7B-v0.1 ships it (with this config's sizes)."""
    return {"architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
            "hidden_size": c["dim"], "initializer_range": 0.02, "intermediate_size": c["hidden_dim"],
            "max_position_embeddings": c["max_seq_len"], "model_type": "mistral",
            "num_attention_heads": c["n_heads"], "num_hidden_layers": c["n_layers"],
            "num_key_value_heads": c["n_kv_heads"], "rms_norm_eps": c["norm_eps"], "rope_theta": c["rope_theta"],
            "sliding_window": c["sliding_window"], "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "use_cache": True, "vocab_size": c["vocab_size"]}


def params_json(c):
    """params.json as Mistral's consolidated release has it."""
    return {"dim": c["dim"], "n_layers": c["n_layers"], "head_dim": c["dim"] // c["n_heads"],
            "hidden_dim": c["hidden_dim"], "n_heads": c["n_heads"], "n_kv_heads": c["n_kv_heads"],
            "norm_eps": c["norm_eps"], "sliding_window": c["sliding_window"], "vocab_size": c["vocab_size"],
            "rope_theta": c["rope_theta"]}


def tensor_list(c, layout):
    """[(name, shape)] in the order HF's state dict has them (embedding, layer by layer, norm, lm_head); the
    consolidated names are the HF ones through the reader's own map (minispec.mistral.weights.hf_to_canonical), so the
    writer cannot drift from what minispec reads. Shapes are [out, in] in both layouts."""
    D, F, V, H, Hkv = c["dim"], c["hidden_dim"], c["vocab_size"], c["n_heads"], c["n_kv_heads"]
    Dh = D // H
    out = [("model.embed_tokens.weight", (V, D))]
    for i in range(c["n_layers"]):
        out += [(f"model.layers.{i}.{n}.weight", s) for n, s in (
            ("self_attn.q_proj", (H * Dh, D)), ("self_attn.k_proj", (Hkv * Dh, D)), ("self_attn.v_proj", (Hkv * Dh, D)),
            ("self_attn.o_proj", (D, H * Dh)), ("mlp.gate_proj", (F, D)), ("mlp.up_proj", (F, D)),
            ("mlp.down_proj", (D, F)), ("input_layernorm", (D,)), ("post_attention_layernorm", (D,)))]
    out += [("model.norm.weight", (D,)), ("lm_head.weight", (V, D))]
    return out if layout == "hf" else [(hf_to_canonical(n), s) for n, s in out]


def random_bf16(rng, n, pool=None):
    """n random bf16 bit patterns: random sign and mantissa, exponent 2^-7 or 2^-6 (|w| in [0.0078, 0.031)).
    pool: a block of random uint16 reused with a random rotation and XOR mask per chunk (several times faster
    than drawing every value; for benchmark checkpoints, where only sizes matter)."""
    if pool is None or n > pool.size // 2:
        bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
    else:
        start = int(rng.integers(0, pool.size - n))
        bits = pool[start:start + n] ^ np.uint16(rng.integers(0, 1 << 16))
    return (bits & np.uint16(0x80FF)) | np.uint16(120 << 7)       # keep sign, exponent bit 0, mantissa


def write_safetensors(path, tensors, rng, pool=None):
    """Stream [(name, shape)] of random bf16 (norms = 1.0) into one safetensors file, chunk by chunk."""
    header, offset = {}, 0
    for name, shape in tensors:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)                                 # the data section starts 8-byte aligned
    one = np.uint16(0x3F80)                                         # 1.0 in bf16
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape in tensors:
            n = int(np.prod(shape))
            if len(shape) == 1:
                f.write(np.full(n, one, np.uint16).tobytes())
                continue
            for s in range(0, n, CHUNK):
                f.write(random_bf16(rng, min(CHUNK, n - s), pool).tobytes())
    return offset


def mistral_v1_tokenizer():
    """The tokenizer.model.v1 file inside the installed mistral-common package (Mistral 7B v0.1's tokenizer)."""
    import mistral_common
    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.exists():
        raise FileNotFoundError(f"{path}: this mistral-common version does not ship tokenizer.model.v1")
    return path


def make(out, layout="hf", shard_gb=10.0, seed=0, tokenizer=True, fast=False, **overrides):
    """Write the checkpoint folder `out`; returns its path. overrides: any key of MISTRAL_7B_V01.
    fast: draw the bits from a reused 64 M-value random pool (see random_bf16)."""
    c = dict(MISTRAL_7B_V01, **overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 1 << 16, size=4 * CHUNK, dtype=np.uint16) if fast else None
    tensors = tensor_list(c, layout)
    if layout == "consolidated":
        (out / "params.json").write_text(json.dumps(params_json(c), indent=2))
        write_safetensors(out / "consolidated.safetensors", tensors, rng, pool)
    else:
        (out / "config.json").write_text(json.dumps(hf_config(c), indent=2))
        shards, cur, size, limit = [], [], 0, shard_gb * 1e9
        for name, shape in tensors:                                 # HF splits between tensors, in state-dict order
            n = int(np.prod(shape)) * 2
            if cur and size + n > limit:
                shards.append(cur)
                cur, size = [], 0
            cur.append((name, shape))
            size += n
        shards.append(cur)
        if len(shards) == 1:
            write_safetensors(out / "model.safetensors", shards[0], rng, pool)
        else:
            weight_map, total = {}, 0
            for k, shard in enumerate(shards):
                fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                total += write_safetensors(out / fname, shard, rng, pool)
                weight_map.update({name: fname for name, _ in shard})
            (out / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if tokenizer:
        shutil.copy(mistral_v1_tokenizer(), out / "tokenizer.model")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--layout", default="hf", choices=["hf", "consolidated"])
    ap.add_argument("--shard-gb", type=float, default=10.0, help="HF shard size limit (the real repo: 10 GB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-tokenizer", action="store_true")
    ap.add_argument("--fast", action="store_true", help="reuse a random pool (several times faster, sizes only)")
    flags = {"dim": "dim", "n_layers": "layers", "n_heads": "heads", "n_kv_heads": "kv-heads", "hidden_dim": "hidden",
             "vocab_size": "vocab", "sliding_window": "window"}                # config key -> --flag
    for key, flag in flags.items():
        ap.add_argument("--" + flag, dest=key, type=int, default=None)
    a = ap.parse_args(argv)
    overrides = {k: getattr(a, k) for k in flags if getattr(a, k) is not None}
    out = make(a.out, layout=a.layout, shard_gb=a.shard_gb, seed=a.seed, tokenizer=not a.no_tokenizer, fast=a.fast,
               **overrides)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({size / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
