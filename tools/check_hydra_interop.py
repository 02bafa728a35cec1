"""Check that minispec's Hydra head files are zankner/Hydra's: a file minispec writes loads into Hydra's own
modules (HydraMLP, HydraPrefixMLP) with load_state_dict(strict=True) and gives the same logits, and a state dict
saved from Hydra's modules reads back into minispec with the same logits.

    pip install torch==2.13.0 transformers      # the prefix layer's module imports transformers
    git clone https://github.com/zankner/Hydra /somewhere/Hydra
    python tools/check_hydra_interop.py --hydra-src /somewhere/Hydra [--model weights/stdlib-mistral]

Hydra's code is imported from --hydra-src at run time, never copied into this repository. Teacher-forced
inputs: Hydra's forward(base_hidden_states, input_ids) gives head i at position t the input
concat(h_t, E(x_{t+1}), ..., E(x_{t+i+1})) (torch.roll), which is what minispec's head_forward gets here;
positions whose roll wraps around are left out. Sequences are no longer than the model's window (Hydra's
prefix layer has none). Exit status 0 when every comparison passes.
"""
import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from minispec.decoders.hydra_heads import HydraHeads, head_forward, prefix_forward     # noqa: E402
from minispec.decoders.hydra_files import read_hydra, write_hydra               # noqa: E402
from minispec.mistral.model import load                                         # noqa: E402


def import_hydra(src):
    """Hydra's two head modules, loaded from their files (hydra/model/hydra_heads/__init__.py would also import
    the cross-attention and EAGLE heads, which this check does not need)."""
    sys.path.insert(0, str(src))                                        # for `from hydra.model.modeling_llama_kv`
    mods = {}
    for name in ("mlp_head", "prefix_mlp_head"):
        path = Path(src) / "hydra" / "model" / "hydra_heads" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"hydra_heads_{name}", path)
        mods[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mods[name])
    return mods["mlp_head"].HydraMLP, mods["prefix_mlp_head"].HydraPrefixMLP


def llama_config(model):
    from transformers import LlamaConfig
    c = model.config
    cfg = LlamaConfig(hidden_size=c.dim, vocab_size=c.vocab_size, num_attention_heads=c.n_heads,
                      num_key_value_heads=c.n_kv_heads, intermediate_size=c.hidden_dim, rms_norm_eps=c.norm_eps,
                      max_position_embeddings=4096, num_hidden_layers=1, rope_theta=c.rope_theta)
    # Hydra's copy of transformers 4.31's Llama reads rope_scaling as None or {"type": ...}; transformers >= 5
    # fills it with {"rope_type": "default", ...}: plain RoPE is None there
    if isinstance(getattr(cfg, "rope_scaling", None), dict) and "type" not in cfg.rope_scaling:
        cfg.rope_scaling = None
    return cfg


def random_heads(model, arch, K, L, seed):
    """minispec heads with every parameter random and blocks 2..L equal (what Hydra's shared module holds)."""
    heads = HydraHeads.create(model, K, L, arch, seed=seed)
    rng = np.random.default_rng(seed)
    for p in heads.heads:
        for k in p:
            p[k] = (p[k] + 0.05 * rng.standard_normal(p[k].shape)).astype(model.dtype)
        p["ws"][...] = p["ws"][:1]
        p["bs"][...] = p["bs"][:1]
    if heads.prefix is not None:
        for k in heads.prefix:
            heads.prefix[k] = (heads.prefix[k] + 0.05 * rng.standard_normal(heads.prefix[k].shape)).astype(model.dtype)
    return heads


def minispec_logits(model, heads, ids, h):
    """[K, T, V] teacher-forced logits (NaN where Hydra's roll wraps) on the base hidden states h [T, D] of ids,
    from minispec's own functions."""
    base = prefix_forward(heads.prefix, model.config, h) if heads.prefix is not None else h
    E, T = model.tok_embeddings, len(ids)
    out = np.full((heads.K, T, model.config.vocab_size), np.nan)
    for i in range(heads.K):
        n = T - i - 1                                                                   # positions with x_{t+i+1}
        a = np.concatenate([base[:n]] + [E[np.asarray(ids[j + 1:j + 1 + n])] for j in range(i + 1)], axis=1)
        out[i, :n] = head_forward(heads.heads[i], a)
    return out


def agree(model, heads, module, ids, h):
    """(max relative error of minispec's logits against Hydra's module on the same inputs, whether < 1e-4)."""
    err = compare(minispec_logits(model, heads, ids, h), hydra_logits(module, h, ids))
    return err, err < 1e-4


def hydra_logits(module, h, ids):
    import torch
    with torch.no_grad():
        hs = torch.as_tensor(np.asarray(h, np.float32))[None]
        x = torch.as_tensor(np.asarray(ids))[None]
        if hasattr(module, "prefix_embeding_layer"):
            logits, _ = module(hs, x, position_ids=torch.arange(len(ids))[None])
        else:
            logits, _ = module(hs, x)
    return np.stack([lg[0].numpy() for lg in logits])                                  # [K, T, V]


def gqa_cache_check(src, model):
    """What Hydra's own KV cache (hydra/model/kv_cache.py, sized with num_attention_heads) does with this
    model's GQA keys: one decoder step's keys [1, Hkv, 1, Dh] appended the way its LlamaAttention does."""
    import types
    import torch
    spec = importlib.util.spec_from_file_location("hydra_kv_cache", Path(src) / "hydra" / "model" / "kv_cache.py")
    kv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kv)
    c = model.config
    fake = types.SimpleNamespace(config=types.SimpleNamespace(num_hidden_layers=1, num_attention_heads=c.n_heads,
                                                              max_position_embeddings=64, hidden_size=c.dim),
                                 device="cpu", dtype=torch.float32)
    past, data, _ = kv.initialize_past_key_values(fake, "mlp")
    try:
        past[0][0].cat(torch.zeros(1, c.n_kv_heads, 1, c.head_dim))
        return f"Hydra's KVCache ({list(data.shape)}) accepted [1, {c.n_kv_heads}, 1, {c.head_dim}] keys"
    except RuntimeError as e:
        return (f"Hydra's KVCache is allocated {list(data.shape)} (num_attention_heads = {c.n_heads}); appending "
                f"this GQA model's keys [1, {c.n_kv_heads}, 1, {c.head_dim}] fails: {str(e).splitlines()[0]}")


def compare(a, b):
    ok = ~np.isnan(a)
    return float(np.abs(a[ok] - b[ok]).max() / np.abs(b[ok]).max())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hydra-src", required=True, help="a checkout of github.com/zankner/Hydra")
    ap.add_argument("--model", default=str(REPO / "weights" / "stdlib-mistral"))
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=40)
    args = ap.parse_args(argv)

    import torch
    from safetensors.torch import load_file, save_file
    HydraMLP, HydraPrefixMLP = import_hydra(args.hydra_src)
    model = load(args.model, dtype="float32", device="cpu")
    T = min(args.tokens, model.config.sliding_window or args.tokens)
    ids = list(np.random.default_rng(0).integers(3, model.config.vocab_size, T))
    embed = torch.nn.Embedding(model.config.vocab_size, model.config.dim)
    embed.weight.data[:] = torch.as_tensor(np.asarray(model.tok_embeddings))
    _, h = model.forward(ids, return_hidden=True)                                       # [T, D] base hidden states
    failures = 0
    for arch, cls in (("mlp", HydraMLP), ("prefix-mlp", HydraPrefixMLP)):
        torch.manual_seed(0)
        make = lambda: cls(args.layers, args.heads, True, embed, llama_config(model)).eval()   # noqa: E731
        # 1. minispec writes, Hydra loads with strict=True, same logits
        heads = random_heads(model, arch, args.heads, args.layers, seed=1)
        with tempfile.TemporaryDirectory() as tmp:
            write_hydra(heads, tmp)
            module = make()
            result = module.load_state_dict(load_file(str(Path(tmp) / "hydra_lm_head.safetensors")), strict=True)
            err, ok = agree(model, heads, module, ids, h)
            failures += not ok
            print(f"{arch:>10}: minispec file -> Hydra {cls.__name__}.load_state_dict(strict=True): {result}; "
                  f"logits max rel err {err:.2e} over {args.heads} heads x {T} positions: {'PASS' if ok else 'FAIL'}")
        # 2. Hydra's own module saves (its random init, blocks shared as Hydra builds them), minispec reads
        module = make()
        with torch.no_grad():
            for name, p in module.named_parameters():
                if "embed" not in name:                                # the base model's tables stay the base's
                    p.add_(0.05 * torch.randn_like(p))                 # zero-initialised W_1 too
        with tempfile.TemporaryDirectory() as tmp:
            sd = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
            save_file(sd, str(Path(tmp) / "hydra_lm_head.safetensors"))
            (Path(tmp) / "config.json").write_text(
                f'{{"hydra_num_heads": {args.heads}, "hydra_num_layers": {args.layers}, "hydra_head_arch": '
                f'"{arch}", "grounded_heads": true, "hidden_state_offset": 0}}')
            back = read_hydra(tmp, model)
            err, ok = agree(model, back, module, ids, h)
            failures += not ok
            print(f"{arch:>10}: Hydra {cls.__name__}.state_dict() ({len(sd)} tensors) -> minispec read_hydra: "
                  f"logits max rel err {err:.2e}: {'PASS' if ok else 'FAIL'}")
    print(gqa_cache_check(args.hydra_src, model))
    print("all comparisons pass" if not failures else f"{failures} comparison(s) FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
