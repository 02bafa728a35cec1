"""Hydra head files: minispec's own format and zankner/Hydra's, both named like zankner/Hydra's modules.

minispec's format, a folder:  hydra_config.json (kind, arch, sizes, trees, accuracies) + hydra_heads.safetensors.
Heads that share the base model's output layer (minispec's own variant, hydra_heads.py) say so in the config,
"shared_output": true, and their file has no hydra_lm_head tensors; without the key a file is read as before
(every head owns a projection with a bias). The flag, not the absence of tensors, decides, so that a file that
lost its lm-head tensors is refused (missing tensor) rather than silently read as another architecture, and the
config says what the heads are, as medusa_config.json's "version" does for Medusa's v2 heads.
zankner/Hydra's format, a folder:  config.json (HydraConfig: hydra_num_heads, hydra_num_layers, hydra_head_arch
"mlp" | "prefix-mlp", grounded_heads, hidden_state_offset, base_model_name_or_path) + the state dict of its
`hydra_head` module (HydraMLP or HydraPrefixMLP), which Hydra saves with torch.save as hydra_lm_head.pt; minispec
reads and writes it only as hydra_lm_head.safetensors (a pickle is refused, with the one-line conversion).

Tensor names ((out, in) orientation, as torch's nn.Linear stores them), head i, I = (i+2)·D, L = num_layers:
  arch "mlp" (HydraMLP: hydra_mlp[i] = Sequential(ResBlock(D, i+1), *[ResBlock(D)] * (L-1))):
    hydra_mlp.{i}.0.linear.weight [D, I]  .bias [D]      hydra_mlp.{i}.0.res_connection.weight [D, I]  .bias [D]
    hydra_mlp.{i}.{l}.linear.weight [D, D]  .bias [D]    l = 1 .. L-1 (ResBlock(D)'s residual is nn.Identity)
    hydra_lm_head.{i}.weight [V, D]  .bias [V]
  arch "prefix-mlp" (HydraPrefixMLP: Sequential(Dropout, ResBlock(D, i+1), *[Dropout, ResBlock(D)] * (L-1)),
  so the blocks sit at the odd indices 1, 3, .., 2L-1, and hydra_lm_head[i] = Sequential(Dropout, Linear)):
    hydra_mlp.{i}.1.linear / .1.res_connection,  hydra_mlp.{i}.{2l+1}.linear (l = 1 .. L-1),
    hydra_lm_head.{i}.1.weight [V, D]  .1.bias [V]
    prefix_embeding_layer (sic: a 1-layer LlamaModel fed inputs_embeds) .layers.0.:
      self_attn.q_proj.weight [H·Dh, D]  k_proj, v_proj [Hkv·Dh, D]  o_proj [D, H·Dh]
      mlp.gate_proj.weight [F, D]  up_proj [F, D]  down_proj [D, F]   input_layernorm, post_attention_layernorm [D]
    prefix_embeding_layer.norm.weight [D]
  Only in zankner/Hydra's format (its module holds them; minispec never needs them): input_embed_fn.weight
  [V, D] (the base embedding, registered as a submodule of the head), and for "prefix-mlp"
  prefix_embeding_layer.embed_tokens.weight [V, D] (unused: the layer is fed inputs_embeds) and
  prefix_embeding_layer.layers.0.self_attn.rotary_emb.inv_freq [Dh/2] (a persistent buffer).
zankner/Hydra's "mlp" and "prefix-mlp" heads always own their lm heads (nn.Linear with a bias; only its other
archs, "cross-attn" and "eagle-attn", call the base lm_head), so writing Hydra's format refuses shared heads.
Blocks 2..L of zankner/Hydra share one module (a Python list product): reading gives equal independent blocks;
writing Hydra's format refuses heads whose blocks 2..L differ (Hydra would keep only one of them).
Writing also puts the heads' stored trees in config.json as "hydra_choices" / "hydra_choices_cuda" (the list
Hydra's --hydra-choices takes), refusing a tree Hydra's proposal would fill differently (`hydra_tree_problem`).
zankner/Hydra's prefix layer is a Llama layer: full causal attention (no sliding window) and RoPE built with the
default base 10000 (its LlamaRotaryEmbedding is constructed without config.rope_theta). minispec's is a Mistral
layer with the model's window and rope_theta; the two agree on sequences no longer than the window when
rope_theta = 10000 (Mistral 7B v0.1's value), and writing refuses models where RoPE would differ.
"""
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from ..backend import to_device, to_host
from ..errors import Fields, UserError, read_json
from ..mistral.layers import rope_inv_freq
from ..mistral.safetensors import CheckpointError, read_safetensors, safetensors_in
from .heads import (check_fits, check_head_sizes, check_tensors, load_either, read_head_trees, read_trees,
                    refuse_heads_pickle, save_folder)
from .hydra_heads import ARCHS, KIND_ARCH, HydraHeads, head_input_width

CONFIG_NAME, WEIGHTS_NAME = "hydra_config.json", "hydra_heads.safetensors"
HY_CONFIG_NAME, HY_WEIGHTS_NAME = "config.json", "hydra_lm_head.safetensors"
PREFIX = "prefix_embeding_layer."
LAYER = PREFIX + "layers.0."


def block_index(arch, l):
    """Index of block l (0-based) in hydra_mlp[i]'s Sequential: prefix-mlp puts a Dropout before each block."""
    return 2 * l + 1 if arch == "prefix-mlp" else l


def lm_head_name(arch, i):
    return f"hydra_lm_head.{i}.1" if arch == "prefix-mlp" else f"hydra_lm_head.{i}"


def state_dict_shapes(arch, num_heads, num_layers, config, hydra_extras=False, shared_output=False):
    """{zankner/Hydra tensor name: (out, in) shape}; hydra_extras: also the tensors only Hydra's modules hold;
    shared_output: no lm-head tensors (the heads use the base output layer)."""
    if arch not in ARCHS:
        raise UserError(f"Hydra head arch must be one of {ARCHS}, not {arch!r}")
    D, V, H, Hkv, Dh, F = (config.dim, config.vocab_size, config.n_heads, config.n_kv_heads, config.head_dim,
                           config.hidden_dim)
    shapes = {}
    for i in range(num_heads):
        I, b0 = head_input_width(i, D), f"hydra_mlp.{i}.{block_index(arch, 0)}"
        shapes.update({f"{b0}.linear.weight": (D, I), f"{b0}.linear.bias": (D,),
                       f"{b0}.res_connection.weight": (D, I), f"{b0}.res_connection.bias": (D,)})
        for l in range(1, num_layers):
            bl = f"hydra_mlp.{i}.{block_index(arch, l)}"
            shapes.update({f"{bl}.linear.weight": (D, D), f"{bl}.linear.bias": (D,)})
        if not shared_output:
            shapes.update({f"{lm_head_name(arch, i)}.weight": (V, D), f"{lm_head_name(arch, i)}.bias": (V,)})
    if arch == "prefix-mlp":
        shapes.update({LAYER + "self_attn.q_proj.weight": (H * Dh, D), LAYER + "self_attn.k_proj.weight": (Hkv * Dh, D),
                       LAYER + "self_attn.v_proj.weight": (Hkv * Dh, D), LAYER + "self_attn.o_proj.weight": (D, H * Dh),
                       LAYER + "mlp.gate_proj.weight": (F, D), LAYER + "mlp.up_proj.weight": (F, D),
                       LAYER + "mlp.down_proj.weight": (D, F), LAYER + "input_layernorm.weight": (D,),
                       LAYER + "post_attention_layernorm.weight": (D,), PREFIX + "norm.weight": (D,)})
    if hydra_extras:
        shapes["input_embed_fn.weight"] = (V, D)
        if arch == "prefix-mlp":
            shapes[PREFIX + "embed_tokens.weight"] = (V, D)
            shapes[LAYER + "self_attn.rotary_emb.inv_freq"] = (Dh // 2,)
    return shapes


def inv_freq(config):
    """RoPE's θ^(-2i/Dh) (the buffer zankner/Hydra's LlamaRotaryEmbedding stores, in float32)."""
    return rope_inv_freq(config.head_dim, config.rope_theta).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# state dict <-> HydraHeads
# ---------------------------------------------------------------------------------------------------------
def state_dict(heads, dtype=np.float32, hydra_extras=False):
    """{zankner/Hydra name: host array, (out, in)}; hydra_extras: the extra tensors Hydra's modules need. Heads
    with a shared output layer have no lm-head tensors (the layer is the base model's)."""
    arch, c = heads.arch, heads.model_config
    t = lambda a: np.ascontiguousarray(to_host(a).T, dtype=dtype)            # noqa: E731 (in, out) -> (out, in)
    v = lambda a: np.ascontiguousarray(to_host(a), dtype=dtype)              # noqa: E731
    out = {}
    for i, p in enumerate(heads.heads):
        b0 = f"hydra_mlp.{i}.{block_index(arch, 0)}"
        out.update({f"{b0}.linear.weight": t(p["w1"]), f"{b0}.linear.bias": v(p["b1"]),
                    f"{b0}.res_connection.weight": t(p["res_w"]), f"{b0}.res_connection.bias": v(p["res_b"])})
        for l in range(1, heads.L):
            bl = f"hydra_mlp.{i}.{block_index(arch, l)}"
            out.update({f"{bl}.linear.weight": t(p["ws"][l - 1]), f"{bl}.linear.bias": v(p["bs"][l - 1])})
        if not heads.shared_output:
            out.update({f"{lm_head_name(arch, i)}.weight": t(p["proj_w"]),
                        f"{lm_head_name(arch, i)}.bias": v(p["proj_b"])})
    if heads.prefix is not None:
        p, H, Hkv, Dh = heads.prefix, c.n_heads, c.n_kv_heads, c.head_dim
        wqkv, w13, F = to_host(p["wqkv"]), to_host(p["w13"]), c.hidden_dim
        out.update({LAYER + "self_attn.q_proj.weight": t(wqkv[:, :H * Dh]),
                    LAYER + "self_attn.k_proj.weight": t(wqkv[:, H * Dh:(H + Hkv) * Dh]),
                    LAYER + "self_attn.v_proj.weight": t(wqkv[:, (H + Hkv) * Dh:]),
                    LAYER + "self_attn.o_proj.weight": t(p["wo"]),
                    LAYER + "mlp.gate_proj.weight": t(w13[:, :F]), LAYER + "mlp.up_proj.weight": t(w13[:, F:]),
                    LAYER + "mlp.down_proj.weight": t(p["w2"]),
                    LAYER + "input_layernorm.weight": v(p["attention_norm"]),
                    LAYER + "post_attention_layernorm.weight": v(p["ffn_norm"]), PREFIX + "norm.weight": v(p["norm"])})
    if hydra_extras:
        out["input_embed_fn.weight"] = v(heads.embed)
        if heads.prefix is not None:
            out[PREFIX + "embed_tokens.weight"] = v(heads.embed)
            out[LAYER + "self_attn.rotary_emb.inv_freq"] = inv_freq(c)
    return out


def from_state_dict(model, tensors, arch, num_heads, num_layers, source="state dict", shared_output=False):
    """HydraHeads from zankner/Hydra-named host tensors (out, in), transposed once to (in, out), onto the model's
    device and dtype. Every expected tensor must be there with its shape; Hydra's extra tensors may be (the
    rotary buffer must then match the model's rope_theta); anything else is an error. shared_output: heads whose
    projection is the model's output layer (no lm-head tensors expected, and one is an error)."""
    c, xp, dt = model.config, model.xp, model.dtype
    expected = state_dict_shapes(arch, num_heads, num_layers, c, shared_output=shared_output)
    optional = {k: s for k, s in state_dict_shapes(arch, num_heads, num_layers, c, True, shared_output).items()
                if k not in expected}
    what = f"Hydra {arch}{', shared output layer' if shared_output else ''}, {num_heads} heads x {num_layers} layers"
    check_tensors(tensors, expected, source, f"{what}, D={c.dim}, V={c.vocab_size}", optional)
    rot = LAYER + "self_attn.rotary_emb.inv_freq"
    if rot in tensors and not np.allclose(np.asarray(tensors[rot], np.float64), inv_freq(c), rtol=1e-5):
        raise CheckpointError(f"{source}: {rot} does not match the base model's rope_theta = {c.rope_theta}")
    for name in ("input_embed_fn.weight",):      # (prefix_embeding_layer.embed_tokens is Hydra's own, unused, random)
        if name in tensors and not np.allclose(np.asarray(tensors[name], np.float32), to_host(model.tok_embeddings),
                                               rtol=1e-2, atol=1e-3):
            raise CheckpointError(f"{source}: {name} (the base embedding table Hydra's module holds) differs from this "
                                  f"model's tok_embeddings: the heads were trained for another base model")
    put = lambda a: to_device(xp, np.ascontiguousarray(np.asarray(a, dtype=dt)))          # noqa: E731
    T = lambda name: put(np.asarray(tensors[name]).T)                                      # noqa: E731
    heads = []
    for i in range(num_heads):
        b0 = f"hydra_mlp.{i}.{block_index(arch, 0)}"
        ws = np.empty((num_layers - 1, c.dim, c.dim), dt)                                  # [L-1, D, D]
        bs = np.empty((num_layers - 1, c.dim), dt)                                         # [L-1, D]
        for l in range(1, num_layers):
            bl = f"hydra_mlp.{i}.{block_index(arch, l)}"
            ws[l - 1] = np.asarray(tensors[f"{bl}.linear.weight"], dt).T
            bs[l - 1] = np.asarray(tensors[f"{bl}.linear.bias"], dt)
        p = {"res_w": T(f"{b0}.res_connection.weight"), "res_b": put(tensors[f"{b0}.res_connection.bias"]),
             "w1": T(f"{b0}.linear.weight"), "b1": put(tensors[f"{b0}.linear.bias"]), "ws": put(ws), "bs": put(bs)}
        if not shared_output:          # (shared: HydraHeads puts the model's output layer in)
            p.update(proj_w=T(f"{lm_head_name(arch, i)}.weight"), proj_b=put(tensors[f"{lm_head_name(arch, i)}.bias"]))
        heads.append(p)
    prefix = None
    if arch == "prefix-mlp":
        g = lambda n: np.asarray(tensors[LAYER + n], dt)                                   # noqa: E731
        prefix = {"attention_norm": put(g("input_layernorm.weight")),
                  "ffn_norm": put(g("post_attention_layernorm.weight")),
                  "wqkv": put(np.concatenate([g("self_attn.q_proj.weight"), g("self_attn.k_proj.weight"),
                                              g("self_attn.v_proj.weight")]).T),            # [D, (H+2Hkv)Dh]
                  "wo": put(g("self_attn.o_proj.weight").T),                                # [H·Dh, D]
                  "w13": put(np.concatenate([g("mlp.gate_proj.weight"), g("mlp.up_proj.weight")]).T),   # [D, 2F]
                  "w2": put(g("mlp.down_proj.weight").T),                                   # [F, D]
                  "norm": put(tensors[PREFIX + "norm.weight"])}
    return HydraHeads(heads, prefix, model, arch, shared_output=shared_output)


# ---------------------------------------------------------------------------------------------------------
# minispec's format
# ---------------------------------------------------------------------------------------------------------
def config(heads):
    """The heads' hydra_config.json entries ("shared_output" only for heads that share the output layer, so
    that other heads' files stay as they were)."""
    shared = {"shared_output": True} if heads.shared_output else {}
    return {"kind": heads.kind, "arch": heads.arch, **shared, "num_heads": heads.K, "num_layers": heads.L,
            "hidden_size": heads.D, "vocab_size": heads.V, "tree": heads.choices, "tree_cuda": heads.choices_cuda,
            "accuracies": heads.accuracies, "base_model": heads.base_model}


def save(heads, folder, extra=None, dtype=np.float32):
    """folder/hydra_config.json (+ `extra` entries, e.g. a training record) + folder/hydra_heads.safetensors."""
    save_folder(folder, state_dict(heads, dtype), {**config(heads), **(extra or {})}, CONFIG_NAME, WEIGHTS_NAME)


def load(folder, model):
    """Heads saved by `save`, onto the model's device and dtype (sizes must match the model). Every key of
    hydra_config.json is checked: kind "hydra" | "hydra++" and arch its own ("mlp" | "prefix-mlp"), shared_output
    (optional, default false), num_heads >= 1, num_layers >= 1, hidden_size and vocab_size the model's, the trees,
    accuracies and base_model."""
    folder = Path(folder)
    f = Fields(read_json(folder / CONFIG_NAME, expect=dict), folder / CONFIG_NAME, CheckpointError)
    kind = f.choice("kind", tuple(KIND_ARCH))
    arch = f.choice("arch", ARCHS)
    if arch != KIND_ARCH[kind]:
        raise CheckpointError(f"{folder / CONFIG_NAME}: kind {kind!r} has arch {KIND_ARCH[kind]!r}, not {arch!r}")
    shared = f.flag("shared_output", default=False)
    num_heads, num_layers = f.int("num_heads", low=1), f.int("num_layers", low=1)
    check_head_sizes(f, model)
    tensors = read_safetensors(folder / WEIGHTS_NAME)
    check_fits(tensors, model, folder / WEIGHTS_NAME)
    heads = from_state_dict(model, tensors, arch, num_heads, num_layers, source=str(folder / WEIGHTS_NAME),
                            shared_output=shared)
    return read_head_trees(heads, f)


# ---------------------------------------------------------------------------------------------------------
# zankner/Hydra's format
# ---------------------------------------------------------------------------------------------------------
def _refuse_pickle(path):
    # clone(): Hydra's shared blocks share storage, which safetensors refuses
    refuse_heads_pickle(path, "zankner/Hydra saves hydra_lm_head.pt with torch.save",
                  f"python -c \"import torch, safetensors.torch as st; sd = torch.load({str(path)!r}, "
                  f"weights_only=True); st.save_file({{k: v.clone().contiguous() for k, v in sd.items()}}, "
                  f"'hydra_lm_head.safetensors')\"", HY_WEIGHTS_NAME)


def read_hydra(folder, model):
    """Heads from a zankner/Hydra folder: config.json + hydra_lm_head.safetensors (grounded heads, final hidden
    state only). A .pt/.bin file is refused with the one-line torch conversion."""
    weights = safetensors_in(folder, HY_WEIGHTS_NAME, _refuse_pickle)
    folder = Path(folder)
    cfg_path = folder / HY_CONFIG_NAME
    f = Fields(read_json(cfg_path, expect=dict), cfg_path, CheckpointError,
               what=" (not a zankner/Hydra HydraConfig?)")
    num_heads, num_layers = f.int("hydra_num_heads", low=1), f.int("hydra_num_layers", low=1)
    arch = f.choice("hydra_head_arch", ARCHS)
    if not f.flag("grounded_heads", default=False):
        raise CheckpointError(f"{cfg_path}: grounded_heads is false: ungrounded heads read h_t alone, i.e. they are "
                              f"Medusa heads (minispec.decoders.medusa), not Hydra heads")
    offset = f.int("hidden_state_offset", default=0)
    if offset:
        raise CheckpointError(f"{cfg_path}: hidden_state_offset = {offset}; minispec's heads read "
                              f"the final-norm hidden state only (offset 0)")
    base = f.str("base_model_name_or_path", default=None)
    tensors = read_safetensors(weights)
    check_fits(tensors, model, weights)
    heads = from_state_dict(model, tensors, arch, num_heads, num_layers, source=str(weights))
    heads.base_model = base
    return read_trees(heads, f, ("hydra_choices", "hydra_choices_cuda"))      # the trees write_hydra stored


def blocks_equal(p):
    """Whether a head's blocks 2..L are all equal (what zankner/Hydra's shared module can represent)."""
    ws, bs = to_host(p["ws"]), to_host(p["bs"])
    return all(np.array_equal(w, ws[0]) and np.array_equal(b, bs[0]) for w, b in zip(ws, bs))


def hydra_tree_problem(choices):
    """Why zankner/Hydra would draft another tree than `choices` (Medusa's rank paths), or None.

    Its grounded proposal (hydra/model/hydra_heads/mlp_head.py `_grounded_proposal`, with the buffers of
    hydra/model/utils.py `generate_hydra_buffers`) gives a parent with n children the head's top-n tokens, i.e.
    ranks 0..n-1 whatever the paths say, and extends only its first e children, e = how many of them have
    children ("we wouldn't expand a less likely child node if share same parent"). A tree built from measured
    accuracies that are not sorted by rank can break either assumption: Hydra would then silently verify other
    tokens than the ones the tree was chosen for."""
    paths = {tuple(int(r) for r in c) for c in choices}
    kids = {}
    for p in paths:
        kids.setdefault(p[:-1], []).append(p[-1])
    for parent in sorted(kids, key=lambda p: (len(p), p)):
        ranks = sorted(kids[parent])
        if ranks != list(range(len(ranks))):
            return f"node {list(parent)}'s children have ranks {ranks}, but Hydra gives them ranks 0..{len(ranks) - 1}"
        grown = [r for r in ranks if parent + (r,) in kids]
        if grown != list(range(len(grown))):
            return (f"node {list(parent)} extends its children of ranks {grown}, but Hydra extends only its first "
                    f"{len(grown)} (ranks 0..{len(grown) - 1})")
    return None


def write_hydra(heads, folder):
    """zankner/Hydra's layout: config.json + hydra_lm_head.safetensors (float32, with the extra tensors its
    modules hold, so that load_state_dict(strict=True) accepts it). Refuses heads that share the base output
    layer (Hydra's "mlp" / "prefix-mlp" heads own theirs) and heads whose blocks 2..L differ.
    The heads' stored trees go into config.json as "hydra_choices" / "hydra_choices_cuda" (what Hydra's
    --hydra-choices takes), refused where Hydra would draft another tree (hydra_tree_problem)."""
    if heads.shared_output:
        raise UserError(f"write_hydra: these {heads.kind} heads share the base model's output layer, but "
                         f"zankner/Hydra's {heads.arch!r} heads each own an lm head (hydra_lm_head.i, with a bias) "
                         f"and it has no option to share the base one; keep them in minispec's format "
                         f"(hydra_files.save)")
    trees = {k: t for k, t in (("hydra_choices", heads.choices), ("hydra_choices_cuda", heads.choices_cuda)) if t}
    for key, tree in trees.items():
        why = hydra_tree_problem(tree)
        if why:
            raise UserError(f"write_hydra: the heads' tree ({key}) cannot be given to zankner/Hydra: {why}; build it "
                             f"from accuracies sorted by rank at each depth, or clear the tree before writing")
    bad = [i for i, p in enumerate(heads.heads) if not blocks_equal(p)]
    if bad:
        raise UserError(f"write_hydra: head {bad[0]}'s blocks 2..{heads.L} have different weights, but zankner/Hydra "
                         f"builds them as one shared module ([ResBlock(D)] * (L - 1)) and would keep only one of "
                         f"them; minispec refuses to write a file that would not compute what these heads compute")
    c = heads.model_config
    if heads.prefix is not None and (c.rope_theta != 10000.0 or c.head_dim * c.n_heads != c.dim):
        raise UserError(f"write_hydra: zankner/Hydra's prefix layer (its LlamaAttention) always uses RoPE base 10000 "
                         f"and head_dim = hidden_size / num_attention_heads; this model has rope_theta = "
                         f"{c.rope_theta}, head_dim {c.head_dim} x {c.n_heads} heads vs dim {c.dim}, so Hydra would "
                         f"compute something else than these heads")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state_dict(heads, hydra_extras=True), str(folder / HY_WEIGHTS_NAME))
    cfg = {"hydra_num_heads": heads.K, "hydra_num_layers": heads.L, "hydra_head_arch": heads.arch,
           "grounded_heads": True, "hidden_state_offset": 0, "base_model_name_or_path": heads.base_model, **trees}
    (folder / HY_CONFIG_NAME).write_text(json.dumps(cfg, indent=1) + "\n")


def load_heads(folder, model):
    """Heads from a folder in either format (minispec's hydra_config.json, or zankner/Hydra's config.json)."""
    return load_either(folder, [(CONFIG_NAME, "minispec", lambda f: load(f, model)),
                                (HY_CONFIG_NAME, "zankner/Hydra", lambda f: read_hydra(f, model))])
