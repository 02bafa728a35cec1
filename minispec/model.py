"""The Mistral forward pass, array by array (Mistral 7B, arXiv 2310.06825, "Architectural details"; Llama's
block structure).

    x = embed[ids]
    for each layer:  x += Wo · attention(rope(Wq · rms(x)), rope(Wk · rms(x)), Wv · rms(x))   (sliding window, GQA)
                     x += swiglu(rms(x))
    logits = output · rms(x)

`Model.forward(ids)` runs it over a whole sequence with no cache; `forward(ids, cache=c)` prefills or decodes
against a rolling cache (chunks of at most W tokens, each committed); `forward_block` is the primitive the
speculative decoders use: a block of tokens at given positions under a given mask (causal or tree), attending
to the committed cache plus the block, with the block's keys/values left in scratch until `cache.commit(rows)`.
"""
from dataclasses import dataclass

import numpy as np

from .backend import resolve_device, to_device, to_host
from .cache import RollingCache
from .errors import UserError, check_token_ids, warn_if_past_max_positions
from .layers import apply_rope, attention, linear, rms_norm, rope_tables, sliding_window_mask, swiglu
from .weights import load_config, load_tensors

DTYPES = {"float32": np.float32, "float64": np.float64}


@dataclass
class BlockOutput:
    logits: object          # [T, V] on the model's device
    hidden: object          # [T, D] final-norm hidden states (what Medusa/Hydra heads read)


class Model:
    """Mistral weights on a device, transposed once to (in, out) and fused where one matmul can do two."""

    def __init__(self, config, tensors, dtype="float32", device="auto"):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, not {dtype!r}")
        self.config, self.dtype = config, DTYPES[dtype]
        self.xp, self.device = resolve_device(device)
        c, xp = config, self.xp

        def put(a):     # widen on the host (NumPy has no fast 16-bit matmul), then one copy to the device
            return to_device(xp, np.ascontiguousarray(np.asarray(a, dtype=self.dtype)))

        self.tok_embeddings = put(tensors["tok_embeddings.weight"])                             # [V, D]
        self.norm = put(tensors["norm.weight"])                                                # [D]
        out = tensors["tok_embeddings.weight"] if c.tie_embeddings else tensors["output.weight"]
        self.output = put(np.asarray(out).T)                                                   # [D, V]
        self.layers = []
        for i in range(c.n_layers):
            t = lambda n: np.asarray(tensors[f"layers.{i}.{n}.weight"])                      # noqa: E731
            self.layers.append(dict(
                attention_norm=put(t("attention_norm")), ffn_norm=put(t("ffn_norm")),          # [D]
                wqkv=put(np.concatenate([t("attention.wq"), t("attention.wk"), t("attention.wv")]).T),  # [D, (H+2Hkv)Dh]
                wo=put(t("attention.wo").T),                                                   # [H·Dh, D]
                w13=put(np.concatenate([t("feed_forward.w1"), t("feed_forward.w3")]).T),       # [D, 2F]
                w2=put(t("feed_forward.w2").T)))                                               # [F, D]

    # ---- construction -------------------------------------------------------------------------------------------
    def new_cache(self, scratch=None):
        """An empty rolling cache: W = sliding_window slots per layer (max_seq_len where there is no window)."""
        c = self.config
        return RollingCache(c.n_layers, c.n_kv_heads, c.head_dim, c.cache_slots, self.xp, self.dtype,
                            ring=c.sliding_window is not None, scratch=scratch)

    # ---- the forward pass ---------------------------------------------------------------------------------------
    def forward(self, ids, cache=None, return_hidden=False, skip=None):
        """Logits [T, V] for ids [T]. Without a cache: one pass over the whole sequence (positions 0..T-1).
        With a cache: positions continue after the cache; processed in chunks of at most W, each committed.
        skip: a SkipSet (the Draft & Verify draft model: those attention / MLP sublayers are the identity; a
        cache filled this way holds nothing valid at the skipped attention layers)."""
        ids = check_token_ids(ids, self.config.vocab_size)                                    # [T] host int64
        start = 0 if cache is None else cache.pos
        if start <= self.config.max_seq_len:         # warn once, on the call that crosses the limit
            warn_if_past_max_positions(start + len(ids), self.config.max_seq_len)
        if cache is None:
            pos = np.arange(len(ids))
            mask = sliding_window_mask(pos, pos, self.config.sliding_window)                 # [T, T]
            out = self._run(ids, pos, self.xp.asarray(mask), cache=None, skip=skip)
            return (out.logits, out.hidden) if return_hidden else out.logits
        chunk = self.prefill_chunk(cache)
        logits, hidden = [], []
        for s in range(0, len(ids), chunk):
            out = self.forward_block(ids[s:s + chunk], cache, skip=skip)
            cache.commit()
            logits.append(out.logits)
            hidden.append(out.hidden)
        xp = self.xp
        logits = logits[0] if len(logits) == 1 else xp.concatenate(logits)
        hidden = hidden[0] if len(hidden) == 1 else xp.concatenate(hidden)
        return (logits, hidden) if return_hidden else logits

    @staticmethod
    def prefill_chunk(cache):
        """Tokens per prefill chunk: at most W (so a chunk never overwrites slots it still reads) and at most
        the cache's scratch rows."""
        return min(cache.W, cache.scratch)

    def forward_block(self, ids, cache, depths=None, parents_mask=None, skip=None, offset=0):
        """Run a block of T tokens against the committed cache WITHOUT writing it (K/V wait in scratch).

        ids [T]; depths [T] (default 0..T-1): token t sits at position cache.pos + depths[t];
        parents_mask bool [T, T] (default causal): row t lists the block tokens t may see (its ancestors and
        itself, for a tree). The window applies on absolute positions, to cache slots and block tokens alike.
        Call `cache.commit(rows)` afterwards to keep some rows; otherwise the cache is unchanged.
        skip: a SkipSet or None (see _run). offset > 0 continues a chain already in scratch (Draft & Verify's
        one-token draft steps): the block goes to scratch rows offset.., sits at positions cache.pos + offset +
        depths, and also sees scratch rows 0..offset-1 (positions cache.pos..cache.pos + offset - 1).
        """
        ids = check_token_ids(ids, self.config.vocab_size)                                    # [T] host int64
        T, W = len(ids), cache.W
        depths = np.arange(T) if depths is None else np.asarray(to_host(depths), dtype=np.int64)
        block_visible = np.tril(np.ones((T, T), bool)) if parents_mask is None else np.asarray(to_host(parents_mask), bool)
        if depths.shape != (T,) or block_visible.shape != (T, T):
            raise UserError(f"forward_block: {T} ids need depths [{T}] and parents_mask [{T}, {T}], got "
                            f"{list(depths.shape)} and {list(block_visible.shape)}")
        q_pos = cache.pos + offset + depths                                                  # [T]
        window = self.config.sliding_window
        prior = cache.pos + np.arange(offset)                                                # [offset] scratch rows
        mask = np.concatenate([sliding_window_mask(q_pos, cache.slot_positions(), window),  # [T, W]
                               sliding_window_mask(q_pos, prior, window),                   # [T, offset]
                               block_visible & sliding_window_mask(q_pos, q_pos, window)],
                              axis=1)                                                        # [T, W + offset + T]
        cache.begin_block(T, offset)
        return self._run(ids, q_pos, self.xp.asarray(mask), cache, skip=skip)

    def _run(self, ids, positions, mask, cache, skip=None):
        """The layers. ids, positions: host int arrays [T]; mask [T, S] on the device; cache or None;
        skip: a SkipSet (minispec.draft_verify) or None — skip.attn[i] / skip.mlp[i] drop that sublayer."""
        c, xp = self.config, self.xp
        T, H, Hkv, Dh = len(ids), c.n_heads, c.n_kv_heads, c.head_dim
        cos, sin = rope_tables(positions, Dh, c.rope_theta, xp, self.dtype)                 # [T, Dh/2]
        x = self.tok_embeddings[xp.asarray(ids)]                                             # [T, D]
        for i, lw in enumerate(self.layers):
            if skip is None or not skip.attn[i]:     # a skipped sublayer is the identity on x; writes no K/V
                h = rms_norm(x, lw["attention_norm"], c.norm_eps)                            # [T, D]
                qkv = linear(h, lw["wqkv"])                                                  # [T, (H+2Hkv)Dh]
                q = qkv[:, :H * Dh].reshape(T, H, Dh).transpose(1, 0, 2)                     # [H, T, Dh]
                k = qkv[:, H * Dh:(H + Hkv) * Dh].reshape(T, Hkv, Dh).transpose(1, 0, 2)     # [Hkv, T, Dh]
                v = qkv[:, (H + Hkv) * Dh:].reshape(T, Hkv, Dh).transpose(1, 0, 2)           # [Hkv, T, Dh]
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
                if cache is not None:
                    cache.write_block(i, k, v)
                    k, v = cache.layer_kv(i, T)                                              # [Hkv, W + T, Dh]
                o = attention(q, k, v, mask)                                                 # [H, T, Dh]
                x = x + linear(o.transpose(1, 0, 2).reshape(T, H * Dh), lw["wo"])            # [T, D]
            if skip is None or not skip.mlp[i]:
                x = x + swiglu(rms_norm(x, lw["ffn_norm"], c.norm_eps), lw["w13"], lw["w2"]) # [T, D]
        hidden = rms_norm(x, self.norm, c.norm_eps)                                          # [T, D]
        return BlockOutput(logits=linear(hidden, self.output), hidden=hidden)                # [T, V]


def load(path, dtype="float32", device="auto"):
    """A Model from a Hugging Face folder (config.json + safetensors) or a Mistral one (params.json +
    consolidated.safetensors). dtype: "float32" (default) or "float64"; device: "auto" | "cpu" | "cuda"."""
    config, layout = load_config(path)
    model = Model(config, load_tensors(path, config, layout), dtype=dtype, device=device)
    model.path = str(path)
    return model
