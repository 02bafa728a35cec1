"""Model configuration: a frozen dataclass spelled like Mistral's params.json (mistral-src `ModelArgs`).

Letters used in shape comments across minispec (docs/shapes.md has the long version):
    T tokens in this call   S keys visible   W window (cache slots)   D dim   H query heads   Hkv kv heads
    R = H / Hkv             Dh head_dim      F hidden_dim (FFN)       V vocab L layers
    N tree nodes            P tree paths     K heads / draft length

Two readers: `from_hf_config` (Hugging Face config.json, both the Mistral-7B-v0.1 layout with a top-level
`rope_theta` and transformers 5's `rope_parameters: {rope_theta: ...}`) and `from_params_json` (Mistral's
consolidated format). Mistral 7B v0.1's params.json has no `rope_theta`; it was trained with θ = 10000 (its
HF config.json says so), so that is the default here. mistral-inference falls back to 1e6, the value of
later releases, which would be wrong for v0.1 (docs/mistral.md, "Pitfalls").
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

DEFAULT_ROPE_THETA = 10000.0        # Mistral 7B v0.1 (arXiv 2310.06825 inherits Llama's RoPE base)
DEFAULT_MAX_SEQ_LEN = 32768         # cache slots when there is no sliding window and no stated maximum


@dataclass(frozen=True)
class MistralConfig:
    dim: int                        # D
    n_layers: int                   # L
    head_dim: int                   # Dh (need not be D / H)
    hidden_dim: int                 # F
    n_heads: int                    # H
    n_kv_heads: int                 # Hkv
    vocab_size: int                 # V
    norm_eps: float = 1e-5
    rope_theta: float = DEFAULT_ROPE_THETA
    sliding_window: Optional[int] = None   # None: full causal attention
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN
    tie_embeddings: bool = False

    def __post_init__(self):
        for name in ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"config: {name} must be a positive int, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"config: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"config: head_dim must be even for RoPE, got {self.head_dim}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ValueError(f"config: sliding_window must be null or a positive int, got {self.sliding_window!r}")
        if not (self.norm_eps > 0 and self.rope_theta > 0):
            raise ValueError(f"config: norm_eps and rope_theta must be > 0, got {self.norm_eps}, {self.rope_theta}")

    @property
    def n_rep(self):
        """R: query heads per kv head (1: MHA, H: MQA)."""
        return self.n_heads // self.n_kv_heads

    @property
    def cache_slots(self):
        """W: the rolling cache's slots per layer (the window, else the maximum length)."""
        return self.sliding_window if self.sliding_window is not None else self.max_seq_len

    # -------------------------------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg, source="config.json"):
        """From a Hugging Face config.json (dict or path)."""
        if not isinstance(cfg, dict):
            source = str(cfg)
            cfg = json.loads(Path(cfg).read_text())

        def need(key):
            if key not in cfg:
                raise ValueError(f"{source}: missing key {key!r}")
            return cfg[key]

        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
        if rope_type != "default":
            raise ValueError(f"{source}: rope type {rope_type!r} is not supported (only plain RoPE)")
        theta = cfg.get("rope_theta", rope.get("rope_theta", DEFAULT_ROPE_THETA))
        dim, n_heads = need("hidden_size"), need("num_attention_heads")
        window = cfg.get("sliding_window")
        if cfg.get("use_sliding_window") is False:
            window = None
        return cls(dim=dim, n_layers=need("num_hidden_layers"), head_dim=cfg.get("head_dim") or dim // n_heads,
                   hidden_dim=need("intermediate_size"), n_heads=n_heads,
                   n_kv_heads=cfg.get("num_key_value_heads") or n_heads, vocab_size=need("vocab_size"),
                   norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=float(theta), sliding_window=window,
                   max_seq_len=cfg.get("max_position_embeddings", DEFAULT_MAX_SEQ_LEN),
                   tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))

    @classmethod
    def from_params_json(cls, params, source="params.json"):
        """From Mistral's params.json (dict or path). No rope_theta means θ = 10000 (v0.1)."""
        if not isinstance(params, dict):
            source = str(params)
            params = json.loads(Path(params).read_text())
        missing = [k for k in ("dim", "n_layers", "hidden_dim", "n_heads", "vocab_size") if k not in params]
        if missing:
            raise ValueError(f"{source}: missing key(s) {missing}")
        dim, n_heads = params["dim"], params["n_heads"]
        window = params.get("sliding_window")
        return cls(dim=dim, n_layers=params["n_layers"], head_dim=params.get("head_dim") or dim // n_heads,
                   hidden_dim=params["hidden_dim"], n_heads=n_heads, n_kv_heads=params.get("n_kv_heads") or n_heads,
                   vocab_size=params["vocab_size"], norm_eps=float(params.get("norm_eps", 1e-5)),
                   rope_theta=float(params.get("rope_theta") or DEFAULT_ROPE_THETA), sliding_window=window,
                   max_seq_len=params.get("max_seq_len", max(window or 0, DEFAULT_MAX_SEQ_LEN)))
