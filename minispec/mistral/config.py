"""Model configuration: a frozen dataclass spelled like Mistral's params.json (mistral-src `ModelArgs`).

Letters used in shape comments across minispec (docs/shapes.md has the long version):
    T tokens in this call   S keys visible   W window (cache slots)   D dim   H query heads   Hkv kv heads
    C ring slots allocated (grows to W)
    R = H / Hkv             Dh head_dim      F hidden_dim (FFN)       V vocab L layers
    N tree nodes            P tree paths     K heads / draft length

Two readers: `from_hf_config` (Hugging Face config.json, both the Mistral-7B-v0.1 layout with a top-level
`rope_theta` and transformers 5's `rope_parameters: {rope_theta: ...}`) and `from_params_json` (Mistral's
consolidated format). Mistral 7B v0.1's params.json has no `rope_theta`; it was trained with θ = 10000 (its
HF config.json says so), so that is the default here. mistral-inference falls back to 1e6, the value of
later releases, which would be wrong for v0.1 (docs/mistral.md, "Pitfalls").
"""
import math
from dataclasses import dataclass
from typing import Optional

from ..errors import UserError, is_int, is_real, read_json

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
                raise ConfigError(f"config: {name} must be a positive int, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"config: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"config: head_dim must be even for RoPE, got {self.head_dim}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ConfigError(f"config: sliding_window must be null or a positive int, got {self.sliding_window!r}")
        if not (self.norm_eps > 0 and self.rope_theta > 0):
            raise ConfigError(f"config: norm_eps and rope_theta must be > 0, got {self.norm_eps}, {self.rope_theta}")

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
        """From a Hugging Face config.json (dict or path). Errors name the file and the key as it spells it.

        Required: hidden_size, num_hidden_layers, intermediate_size, num_attention_heads, vocab_size. Optional,
        with transformers' MistralConfig defaults: num_key_value_heads (= num_attention_heads), head_dim
        (= hidden_size / num_attention_heads), rms_norm_eps (1e-6), rope_theta (10000, or
        rope_parameters.rope_theta), sliding_window (null: full attention; also when use_sliding_window is
        false), max_position_embeddings (32768), tie_word_embeddings (false), hidden_act ("silu", the only one
        Mistral uses and the only one supported)."""
        if not isinstance(cfg, dict):
            source = str(cfg)
            cfg = read_json(cfg)
        k = _Keys(cfg, source)
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported (Mistral's feed-forward is SwiGLU: "
                              f"hidden_act must be \"silu\")")
        rope = k.table("rope_parameters")
        scaling = k.table("rope_scaling")
        rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
        if rope_type != "default":
            raise ConfigError(f"{source}: rope type {rope_type!r} is not supported (only plain RoPE)")
        theta = k.real("rope_theta", rope.get("rope_theta", DEFAULT_ROPE_THETA))
        dim, n_heads = k.count("hidden_size"), k.count("num_attention_heads")
        n_kv = k.count("num_key_value_heads", n_heads)
        k.divides("num_attention_heads", n_heads, "num_key_value_heads", n_kv)
        head_dim = k.head_dim("head_dim", "hidden_size", dim, "num_attention_heads", n_heads)
        window = k.window("sliding_window")
        if not k.flag("use_sliding_window", True):
            window = None
        return cls(dim=dim, n_layers=k.count("num_hidden_layers"), head_dim=head_dim,
                   hidden_dim=k.count("intermediate_size"), n_heads=n_heads, n_kv_heads=n_kv,
                   vocab_size=k.count("vocab_size"), norm_eps=k.real("rms_norm_eps", 1e-6), rope_theta=theta,
                   sliding_window=window, max_seq_len=k.count("max_position_embeddings", DEFAULT_MAX_SEQ_LEN),
                   tie_embeddings=k.flag("tie_word_embeddings", False))

    @classmethod
    def from_params_json(cls, params, source="params.json"):
        """From Mistral's params.json (dict or path). No rope_theta means θ = 10000 (v0.1).

        Required: dim, n_layers, hidden_dim, n_heads, vocab_size. Optional: n_kv_heads (= n_heads), head_dim
        (= dim / n_heads), norm_eps (1e-5), rope_theta (10000), sliding_window (null), max_seq_len (32768, or the
        window when larger)."""
        if not isinstance(params, dict):
            source = str(params)
            params = read_json(params)
        k = _Keys(params, source)
        missing = [key for key in ("dim", "n_layers", "hidden_dim", "n_heads", "vocab_size") if key not in params]
        if missing:
            raise ConfigError(f"{source}: missing key(s) {missing}")
        dim, n_heads = k.count("dim"), k.count("n_heads")
        n_kv = k.count("n_kv_heads", n_heads)
        k.divides("n_heads", n_heads, "n_kv_heads", n_kv)
        window = k.window("sliding_window")
        return cls(dim=dim, n_layers=k.count("n_layers"),
                   head_dim=k.head_dim("head_dim", "dim", dim, "n_heads", n_heads),
                   hidden_dim=k.count("hidden_dim"), n_heads=n_heads, n_kv_heads=n_kv,
                   vocab_size=k.count("vocab_size"), norm_eps=k.real("norm_eps", 1e-5),
                   rope_theta=k.real("rope_theta", DEFAULT_ROPE_THETA, null_default=True), sliding_window=window,
                   max_seq_len=k.count("max_seq_len", max(window or 0, DEFAULT_MAX_SEQ_LEN)))


class ConfigError(UserError):
    """A config file (config.json / params.json) that cannot describe a Mistral model; names the file and key."""


_REQUIRED = object()


class _Keys:
    """Typed reads of one config dict; each error names the file and the key as the file spells it."""

    def __init__(self, cfg, source):
        self.cfg, self.source = cfg, source

    def _get(self, key, default):
        if key not in self.cfg:
            if default is _REQUIRED:
                raise ConfigError(f"{self.source}: missing key {key!r}")
            return default
        return self.cfg[key]

    def count(self, key, default=_REQUIRED):
        """A positive int (a float such as 32.0 or a bool is refused, as HF's loader would mistype it)."""
        v = self._get(key, default)
        if v is None and default is not _REQUIRED:
            return default
        if not is_int(v) or v <= 0:
            raise ConfigError(f"{self.source}: {key!r} must be a positive integer, got {v!r}")
        return int(v)

    def real(self, key, default, null_default=False):
        v = self._get(key, default)
        if v is None and null_default:
            return float(default)
        if not (is_real(v) and math.isfinite(v) and v > 0):
            raise ConfigError(f"{self.source}: {key!r} must be a finite number > 0, got {v!r}")
        return float(v)

    def flag(self, key, default):
        v = self._get(key, default)
        if not isinstance(v, bool):
            raise ConfigError(f"{self.source}: {key!r} must be true or false, got {v!r}")
        return v

    def window(self, key):
        v = self._get(key, None)
        if v is not None and (not is_int(v) or v <= 0):
            raise ConfigError(f"{self.source}: {key!r} must be null (full attention) or a positive integer, got {v!r}")
        return None if v is None else int(v)

    def table(self, key):
        v = self._get(key, None)
        if v is not None and not isinstance(v, dict):
            raise ConfigError(f"{self.source}: {key!r} must be an object or null, got {v!r}")
        return v or {}

    def divides(self, big_key, big, small_key, small):
        if big % small:
            raise ConfigError(f"{self.source}: {big_key!r} ({big}) must be a multiple of {small_key!r} ({small}): "
                              f"each key/value head serves the same number of query heads")

    def head_dim(self, key, dim_key, dim, heads_key, heads):
        hd = self.cfg.get(key)
        if hd is None:
            if dim % heads:
                raise ConfigError(f"{self.source}: {dim_key!r} ({dim}) is not divisible by {heads_key!r} ({heads}); "
                                  f"give {key!r} explicitly")
            hd, where = dim // heads, f"{dim_key!r} / {heads_key!r}"
        else:
            hd, where = self.count(key), repr(key)
        if hd % 2:
            raise ConfigError(f"{self.source}: {where} = {hd} must be even (it is head_dim: RoPE rotates pairs)")
        return hd
