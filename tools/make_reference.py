"""Build tiny random Mistral models and reference logits from HF transformers, for minispec's tests.

For each model it writes tests/fixtures/<name>/ with the weights (HF layout; plus Mistral-consolidated, bf16 and
sharded copies of "gqa4_hd") and reference.safetensors holding the token ids and:
  logits        HF float32 eager full-sequence forward
  logits_f64    HF in pure float64 (RMSNorm/RoPE patched to stay in float64, sdpa attention), checked here
                against an independent naive NumPy float64 forward that uses the mask  i - W < j <= i
  decode_logits HF decoding one token at a time with its default cache
and a README.md with the configs and the measured errors. Deterministic (fixed seeds, one thread).

Run:  python tools/make_reference.py [--out tests/fixtures]   (torch + transformers: pip install -e '.[reference]')
"""
import argparse, contextlib, copy, inspect, json, math, os, shutil
import numpy as np
import torch
from safetensors.numpy import save_file as save_np
from safetensors.torch import save_file as save_pt
from transformers import MistralConfig, MistralForCausalLM
from transformers.models.mistral import modeling_mistral as mm

torch.set_num_threads(1)  # a training job shares the CPU; also keeps float sums reproducible

# name: (hidden, inter, H, Hkv, head_dim or None (= derived, omitted from config.json), window, vocab, eps, theta, T)
SPECS = {
    "mha_w8":       dict(D=32, F=64, H=4, Hkv=4, hd=None, W=8, V=256, eps=1e-5, theta=1e4, T=40),
    "gqa2_nowin":   dict(D=64, F=64, H=4, Hkv=2, hd=16, W=None, V=200, eps=1e-6, theta=1e6, T=40),
    "gqa4_hd":      dict(D=48, F=96, H=8, Hkv=2, hd=16, W=12, V=256, eps=1e-5, theta=1e6, T=48),
    "mqa_w6_v5cfg": dict(D=40, F=80, H=4, Hkv=1, hd=None, W=6, V=128, eps=1e-6, theta=1e4, T=40, v5=True),
}
LAYERS = 2
STD = 0.3  # default init (0.02) gives near-uniform logits; 0.3 gives logit std ~2, mean top-1 prob ~0.2
# HF name -> Mistral consolidated name, per layer and global (w1 = gate, w2 = down, w3 = up)
LAYER_MAP = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
             "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
             "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
             "post_attention_layernorm": "ffn_norm"}
GLOBAL_MAP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
              "lm_head.weight": "output.weight"}


def head_dim(s):
    return s["hd"] or s["D"] // s["H"]


def hf_config_json(s, dtype="float32"):
    """Mistral-7B-v0.1 layout (top-level rope_theta), or the transformers-5 layout (rope_parameters) if s['v5']."""
    c = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_act": "silu",
         "hidden_size": s["D"], "intermediate_size": s["F"], "num_hidden_layers": LAYERS,
         "num_attention_heads": s["H"], "num_key_value_heads": s["Hkv"], "vocab_size": s["V"],
         "rms_norm_eps": s["eps"], "sliding_window": s["W"], "max_position_embeddings": 4096,
         "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02,
         "tie_word_embeddings": False, "use_cache": True}
    if s["hd"]:
        c["head_dim"] = s["hd"]
    if s.get("v5"):
        c.update(rope_parameters={"rope_type": "default", "rope_theta": s["theta"]}, dtype=dtype)
    else:
        c.update(rope_theta=s["theta"], torch_dtype=dtype)
    return c


def build_model(folder, s, seed):
    """Load the config.json we wrote (so HF parses our file), then fill weights large enough for peaked logits."""
    cfg = MistralConfig.from_pretrained(folder)
    cfg._attn_implementation = "eager"  # a bare constructor would pick sdpa
    assert cfg.head_dim == head_dim(s) and cfg.rope_parameters["rope_theta"] == s["theta"], cfg
    model = MistralForCausalLM(cfg).float().eval()
    assert model.config._attn_implementation == "eager"
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # RMSNorm gains around 1, so a wrong norm weight is visible
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(STD * torch.randn(p.shape, generator=g))
    return model


def state(model, dtype=torch.float32):
    return {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}


# ---- HF forwards ----------------------------------------------------------------------------------------------

def rms_f64(self, x):  # x: (B, T, D); stock version upcasts to float32, this one keeps the input dtype
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def rope_f64(self, x, position_ids):  # stock inv_freq and angles are float32; recompute in float64
    hd = 2 * self.inv_freq.shape[0]
    inv = 1.0 / self.config.rope_parameters["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = position_ids[..., None].double() * inv  # (B, T, hd/2)
    emb = torch.cat((ang, ang), dim=-1)  # (B, T, hd) rotate-half layout
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


@contextlib.contextmanager
def float64_patches():
    saved = mm.MistralRMSNorm.forward, mm.MistralRotaryEmbedding.forward
    mm.MistralRMSNorm.forward, mm.MistralRotaryEmbedding.forward = rms_f64, rope_f64
    try:
        yield
    finally:
        mm.MistralRMSNorm.forward, mm.MistralRotaryEmbedding.forward = saved


@torch.no_grad()
def hf_full(model, ids):  # ids: (T,) -> (T, V)
    return model(torch.as_tensor(ids)[None]).logits[0]


@torch.no_grad()
def hf_f64(model, ids):
    """Pure float64: a double copy, patched norm/RoPE, and sdpa (eager's softmax is hard-wired to float32)."""
    cfg = copy.deepcopy(model.config)  # the float32 model must stay eager
    cfg._attn_implementation = "sdpa"
    m64 = MistralForCausalLM(cfg).double().eval()
    m64.load_state_dict(state(model, torch.float64))
    with float64_patches():
        return hf_full(m64, ids).numpy()


# transformers 5.2x renamed past_key_values to cache (the old name still works, with a warning)
CACHE_ARG = "cache" if "cache" in inspect.signature(MistralForCausalLM.forward).parameters else "past_key_values"


@torch.no_grad()
def hf_decode(model, ids):  # one token per call, HF's default cache carried across calls -> (T, V)
    cache, out = None, []
    for t in range(len(ids)):
        r = model(torch.as_tensor(ids[t:t + 1])[None], **{CACHE_ARG: cache}, use_cache=True)
        cache = getattr(r, CACHE_ARG)
        out.append(r.logits[0, -1])
    return torch.stack(out)


# ---- naive NumPy float64 oracle -----------------------------------------------------------------------------

def rms(x, w, eps):  # x: (T, D)
    return w * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


def rope(x, cos, sin, interleaved):  # x: (T, h, hd); cos/sin: (T, 1, hd/2)
    if interleaved:  # Mistral/Meta layout: pairs (2i, 2i+1)
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, b * cos + a * sin
        return out
    a, b = np.split(x, 2, axis=-1)  # HF rotate-half layout: pairs (i, i + hd/2)
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def naive_forward(w, s, ids, interleaved=False):
    """No cache; full attention with the band mask i - W < j <= i; HF names; returns (T, V) float64."""
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    T, H, Hkv, hd, W = len(ids), s["H"], s["Hkv"], head_dim(s), s["W"]
    pos = np.arange(T)
    ang = pos[:, None] * (1.0 / s["theta"] ** (np.arange(0, hd, 2) / hd))  # (T, hd/2)
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]  # (T, 1, hd/2)
    i, j = pos[:, None], pos[None, :]
    allowed = (j <= i) & (j > i - W if W else True)  # (T, T): W keys including the query itself
    x = w["model.embed_tokens.weight"][ids]  # (T, D)
    for l in range(LAYERS):
        p = lambda n: w[f"model.layers.{l}.{n}.weight"]
        h = rms(x, p("input_layernorm"), s["eps"])
        q = rope((h @ p("self_attn.q_proj").T).reshape(T, H, hd), cos, sin, interleaved)  # (T, H, hd)
        k = rope((h @ p("self_attn.k_proj").T).reshape(T, Hkv, hd), cos, sin, interleaved)  # (T, Hkv, hd)
        v = (h @ p("self_attn.v_proj").T).reshape(T, Hkv, hd)
        k, v = np.repeat(k, H // Hkv, axis=1), np.repeat(v, H // Hkv, axis=1)  # repeat_kv: head h uses h // rep
        sc = np.einsum("thd,shd->hts", q, k) / math.sqrt(hd)  # (H, T, T)
        sc = np.where(allowed, sc, -np.inf)
        a = np.exp(sc - sc.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", a, v).reshape(T, H * hd) @ p("self_attn.o_proj").T
        h = rms(x, p("post_attention_layernorm"), s["eps"])
        g = h @ p("mlp.gate_proj").T
        x = x + (g / (1 + np.exp(-g)) * (h @ p("mlp.up_proj").T)) @ p("mlp.down_proj").T
    return rms(x, w["model.norm.weight"], s["eps"]) @ w["lm_head.weight"].T


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


# ---- writers ------------------------------------------------------------------------------------------------

def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def references(model, s, ids, f64_weights):
    """Compute the three reference tensors and the checks; f64_weights: HF-named weights the float64 runs use."""
    logits = hf_full(model, ids).numpy()  # (T, V)
    f64 = hf_f64(model, ids)  # (T, V)
    naive = naive_forward(f64_weights, s, ids)
    dec = hf_decode(model, ids).numpy()
    stats = {"hf_f64_vs_naive": rel_err(f64, naive), "hf_f32_vs_naive": rel_err(logits, naive),
             "decode_vs_full_absmax": float(np.abs(dec - logits).max()), "top1_prob_mean": top1_prob(naive)}
    if s["W"]:  # an off-by-one window must be visible, so the agreement above pins HF's mask down
        stats["naive_W+1_vs_hf_f64"] = rel_err(naive_forward(f64_weights, dict(s, W=s["W"] + 1), ids), f64)
    assert stats["hf_f64_vs_naive"] < 1e-12 and stats.get("naive_W+1_vs_hf_f64", 1) > 1e-3, stats
    ref = {"ids": ids.astype(np.int64), "logits": logits.astype(np.float32),
           "logits_f64": f64.astype(np.float64), "decode_logits": dec.astype(np.float32)}
    return ref, stats


def top1_prob(z):  # mean top-1 probability: shows the logits are not near-uniform
    return float((1 / np.exp(z - z.max(-1, keepdims=True)).sum(-1)).mean())


def check_reload(folder, ids, logits):  # HF itself must read our folder back to the same float32 logits
    m = MistralForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    assert np.array_equal(hf_full(m, ids).numpy(), logits), folder


def meta_to_hf(w, n):  # w: (n * hd, D); the permute in transformers' convert_mistral_weights_to_hf.py
    return w.view(n, w.shape[0] // n // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def hf_to_meta(w, n):  # its inverse: rotate-half rows (i, i + hd/2) -> interleaved pairs (2i, 2i + 1), per head
    return w.view(n, 2, w.shape[0] // n // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)

def new_dir(out, name):
    os.makedirs(os.path.join(out, name), exist_ok=True)
    return os.path.join(out, name)


def write_consolidated(folder, sd, s, ids):
    """Mistral names, wq/wk un-permuted to interleaved pairs; returns the naive interleaved-vs-rotate-half error."""
    out, back = {}, {}
    for k, v in sd.items():
        parts = k.split(".")  # model.layers.{l}.{module}.{proj}.weight
        name = GLOBAL_MAP.get(k) or f"layers.{parts[2]}.{LAYER_MAP['.'.join(parts[3:-1])]}.weight"
        n = {"q_proj": s["H"], "k_proj": s["Hkv"]}.get(parts[-2])
        out[name] = hf_to_meta(v, n).contiguous() if n else v
        assert not n or torch.equal(meta_to_hf(out[name], n), v), k
        back[k] = out[name].numpy()  # Mistral tensors under HF names, still interleaved
    save_pt(out, os.path.join(folder, "consolidated.safetensors"))
    write_json(os.path.join(folder, "params.json"), {
        "dim": s["D"], "n_layers": LAYERS, "head_dim": head_dim(s), "hidden_dim": s["F"], "n_heads": s["H"],
        "n_kv_heads": s["Hkv"], "norm_eps": s["eps"], "vocab_size": s["V"], "sliding_window": s["W"],
        "rope_theta": s["theta"]})
    # interleaved RoPE on the un-permuted weights must compute the same model as rotate-half on HF's
    naive_hf = naive_forward({k: v.numpy() for k, v in sd.items()}, s, ids)
    return rel_err(naive_forward(back, s, ids, interleaved=True), naive_hf)


def write_sharded(folder, sd):
    first = lambda k: k.startswith(("model.embed_tokens.", "model.layers.0."))  # the rest goes to shard 2
    files = {True: "model-00001-of-00002.safetensors", False: "model-00002-of-00002.safetensors"}
    for part, fn in files.items():
        save_pt({k: v for k, v in sd.items() if first(k) == part}, os.path.join(folder, fn), metadata={"format": "pt"})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    write_json(os.path.join(folder, "model.safetensors.index.json"),
               {"metadata": {"total_size": total}, "weight_map": {k: files[first(k)] for k in sorted(sd)}})


def make_model(out, name, s, seed):
    folder = new_dir(out, name)
    write_json(os.path.join(folder, "config.json"), hf_config_json(s))
    model = build_model(folder, s, seed)
    ids = np.random.default_rng(seed).integers(0, s["V"], s["T"])  # (T,)
    sd = state(model)
    save_pt(sd, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    ref, stats = references(model, s, ids, {k: v.numpy() for k, v in sd.items()})
    save_np(ref, os.path.join(folder, "reference.safetensors"))
    check_reload(folder, ids, ref["logits"])
    return model, sd, ids, ref, stats


def make_variants(out, s, model, sd, ids, ref):
    """The three copies of gqa4_hd; returns extra numbers for the README."""
    src = os.path.join(out, "gqa4_hd", "reference.safetensors")
    cons = new_dir(out, "gqa4_hd_consolidated")
    interleave_err = write_consolidated(cons, sd, s, ids)
    shutil.copy(src, cons)

    shard = new_dir(out, "gqa4_hd_sharded")
    shutil.copy(os.path.join(out, "gqa4_hd", "config.json"), shard)
    shutil.copy(src, shard)
    write_sharded(shard, sd)
    check_reload(shard, ids, ref["logits"])

    bf = new_dir(out, "gqa4_hd_bf16")
    write_json(os.path.join(bf, "config.json"), hf_config_json(s, dtype="bfloat16"))
    sd16 = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    save_pt(sd16, os.path.join(bf, "model.safetensors"), metadata={"format": "pt"})
    model.load_state_dict({k: v.float() for k, v in sd16.items()})  # the model now holds bf16-rounded weights
    ref16, stats16 = references(model, s, ids, {k: v.float().numpy() for k, v in sd16.items()})
    save_np(ref16, os.path.join(bf, "reference.safetensors"))
    bf_diff = float(np.abs(ref16["logits"] - ref["logits"]).max())
    return stats16, dict(interleave_err=interleave_err, bf_diff=bf_diff)


README = """# Reference fixtures (generated by tools/make_reference.py: do not edit)

Tiny random Mistral models ({layers} layers, untied embeddings, weights N(0, {std}^2), norm gains 1 + 0.1 N(0, 1)) and
reference logits from HF transformers {tf} (torch {torch}, MistralForCausalLM, eager attention).
Regenerate: `python tools/make_reference.py` (with `pip install -e '.[reference]'`). Each folder holds weights and `reference.safetensors`:
- `ids` int64 (T,): random token ids. Windowed fixtures have T > 3 W.
- `logits` float32 (T, V): HF float32 eager forward over the whole sequence.
- `logits_f64` float64 (T, V): HF in pure float64 (model.double(), RMSNorm and RoPE patched to compute in float64,
  sdpa attention so the softmax is float64 too). It matches an independent naive NumPy float64 forward (no cache, full
  attention masked to i - W < j <= i, repeat_kv, rotate-half RoPE) to ~1e-15, while the same naive forward with
  W + 1 is off by > 1e-3: HF's window is "query i sees W keys, itself included".
- `decode_logits` float32 (T, V): HF decoding one token per call with its default cache (DynamicCache).

Errors: relative = max |a - b| / max |b| against the naive float64 forward; decode = max |decode - full| (float32).

| fixture | config | T | HF f64 vs naive | HF f32 vs naive | naive W+1 vs HF f64 | HF decode vs full | mean top-1 prob |
|---|---|---|---|---|---|---|---|
{rows}
Weights are HF layout (`config.json`, `model.safetensors`, float32), except:
- {no_hd}: config.json has no head_dim (derive hidden_size // num_attention_heads).
- `mqa_w6_v5cfg`: transformers-5 config layout, rope_theta only in `rope_parameters`; the others use the
  Mistral-7B-v0.1 layout (top-level `rope_theta`).
- `gqa4_hd_consolidated`: Mistral format, `params.json` + `consolidated.safetensors` (tok_embeddings,
  layers.i.attention.wq/wk/wv/wo, attention_norm, ffn_norm, feed_forward.w1 (gate) / w2 (down) / w3 (up), norm,
  output). wq/wk are in Meta's interleaved-pairs RoPE layout (inverse of the permute in transformers'
  convert_mistral_weights_to_hf.py; the round trip is asserted); a naive forward with interleaved RoPE on them matches
  the rotate-half one to {interleave_err:.1e}. reference.safetensors is a copy of gqa4_hd's.
- `gqa4_hd_sharded`: gqa4_hd split into model-0000{{1,2}}-of-00002.safetensors + model.safetensors.index.json;
  reference copied from gqa4_hd.
- `gqa4_hd_bf16`: gqa4_hd rounded to bf16, stored as BF16 (config torch_dtype bfloat16); its references come from the
  rounded weights widened to float32 / float64. Its logits differ from gqa4_hd's by up to {bf_diff:.2f} (abs).
"""


def row(name, s, st):
    wp, hd = st.get("naive_W+1_vs_hf_f64"), f"head_dim={s['hd']}" if s["hd"] else f"(head_dim={head_dim(s)})"
    return (f"| {name} | D={s['D']} F={s['F']} H={s['H']} Hkv={s['Hkv']} {hd} W={s['W']} V={s['V']} "
            f"eps={s['eps']:g} theta={s['theta']:g} | {s['T']} | {st['hf_f64_vs_naive']:.1e} | {st['hf_f32_vs_naive']:.1e} | "
            f"{f'{wp:.1e}' if wp else '-'} | {st['decode_vs_full_absmax']:.1e} | {st['top1_prob_mean']:.2f} |\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tests/fixtures")
    out = ap.parse_args().out
    rows = ""
    for seed, (name, s) in enumerate(SPECS.items()):
        model, sd, ids, ref, st = make_model(out, name, s, seed)
        print(name, json.dumps(st))
        rows += row(name, s, st)
        if name == "gqa4_hd":
            st16, extra = make_variants(out, s, model, sd, ids, ref)
            print("gqa4_hd_bf16", json.dumps(st16), "\nvariants", json.dumps(extra))
            rows += "".join(row(n, s, st) for n in ("gqa4_hd_consolidated", "gqa4_hd_sharded")) + row("gqa4_hd_bf16", s, st16)
    import transformers
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(README.format(layers=LAYERS, std=STD, tf=transformers.__version__, torch=torch.__version__, rows=rows,
                              no_hd=", ".join(f"`{n}`" for n, s in SPECS.items() if not s["hd"]), **extra))


if __name__ == "__main__":
    main()
