"""Draft & Verify: self-speculative decoding by skipping layers (Zhang et al., arXiv 2309.08168, ACL 2024).

The draft model is the model itself with some attention and MLP sublayers skipped (a skipped sublayer is the
identity on the residual stream); it drafts a chain one token at a time until its confidence falls under an
adaptive threshold, and the full model verifies the chain in one forward (minispec.verify). No extra weights.

    skip = SkipSet.from_lists(n_layers=6, attn=[2, 3], mlp=[4])       # skip attention of layers 2, 3 and MLP of 4
    logits = model.forward(ids, skip=skip)                              # the draft model, no cache
    out = minispec.generate(model, ids, decoder="draft_verify")        # finds <model.path>/draft_verify/skip_set.json

The shipped skip set of a model lives at <model.path>/draft_verify/skip_set.json (made by
`minispec search-skip --model DIR`). Its keys (the first two as in the authors' skip_layers.json):

    "attention": [int, ...]   indices of the layers whose attention sublayer is skipped (0-based, sorted)
    "mlp":       [int, ...]   indices of the layers whose MLP sublayer is skipped
    "n_layers":  int          L of the model it was chosen for (checked at load)
    anything else             optional provenance (objective, search trace file, measured tau and speedup), kept
                              in SkipSet.meta and ignored by decoding
"""
import json
import os
from dataclasses import dataclass, field

SKIP_SET_FILE = os.path.join("draft_verify", "skip_set.json")


# ---- the skip set -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SkipSet:
    """Which sublayers the draft model skips: attn[i] / mlp[i] True = layer i's attention / MLP is the identity."""
    attn: tuple
    mlp: tuple
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        object.__setattr__(self, "attn", tuple(bool(a) for a in self.attn))
        object.__setattr__(self, "mlp", tuple(bool(m) for m in self.mlp))
        if len(self.attn) != len(self.mlp):
            raise ValueError(f"SkipSet: attn has {len(self.attn)} layers but mlp has {len(self.mlp)}")

    @classmethod
    def from_lists(cls, n_layers, attn=(), mlp=(), meta=None):
        """From lists of skipped layer indices (the authors' form): attn=[2, 3], mlp=[4]."""
        for name, idx in (("attention", attn), ("mlp", mlp)):
            bad = [int(i) for i in idx if not 0 <= int(i) < n_layers]
            if bad:
                raise ValueError(f"SkipSet: {name} layer indices {bad} outside 0..{n_layers - 1}")
        a, m = set(int(i) for i in attn), set(int(i) for i in mlp)
        return cls(tuple(i in a for i in range(n_layers)), tuple(i in m for i in range(n_layers)), dict(meta or {}))

    @classmethod
    def none(cls, n_layers):
        """Skip nothing (the draft model is the full model)."""
        return cls((False,) * n_layers, (False,) * n_layers)

    @property
    def n_layers(self):
        return len(self.attn)

    @property
    def attn_layers(self):
        return [i for i, s in enumerate(self.attn) if s]

    @property
    def mlp_layers(self):
        return [i for i, s in enumerate(self.mlp) if s]

    @property
    def n_skipped(self):
        """Skipped sublayers, out of 2L."""
        return sum(self.attn) + sum(self.mlp)

    def __str__(self):
        return f"SkipSet(attention={self.attn_layers}, mlp={self.mlp_layers})"

    # ---- JSON ---------------------------------------------------------------------------------------------------
    def to_json(self):
        """The file's dict: {"attention": [...], "mlp": [...], "n_layers": L, **meta}."""
        return {"attention": self.attn_layers, "mlp": self.mlp_layers, "n_layers": self.n_layers, **self.meta}

    @classmethod
    def from_json(cls, d, n_layers=None, where="skip set"):
        """From the file's dict; n_layers (the model's L) is checked against the file's when given."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a JSON object with keys 'attention', 'mlp', 'n_layers'")
        missing = [k for k in ("attention", "mlp") if k not in d]
        if missing:
            raise ValueError(f"{where}: missing key(s) {missing} (lists of skipped layer indices)")
        L = d.get("n_layers", n_layers)
        if L is None:
            raise ValueError(f"{where}: missing key 'n_layers'")
        if n_layers is not None and int(L) != n_layers:
            raise ValueError(f"{where}: made for n_layers={L}, but the model has {n_layers} layers")
        for k in ("attention", "mlp"):
            if not isinstance(d[k], list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in d[k]):
                raise ValueError(f"{where}: key {k!r} must be a list of layer indices (ints), got {d[k]!r}")
        meta = {k: v for k, v in d.items() if k not in ("attention", "mlp", "n_layers")}
        try:
            return cls.from_lists(int(L), d["attention"], d["mlp"], meta)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def save(self, path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=2)
            f.write("\n")

    @classmethod
    def load(cls, path, n_layers=None):
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_json(d, n_layers=n_layers, where=str(path))


def skip_set_path(model_dir):
    """Where a model's shipped skip set lives: <model_dir>/draft_verify/skip_set.json."""
    return os.path.join(str(model_dir), SKIP_SET_FILE)


def find_skip_set(model):
    """The skip set shipped beside a loaded model (model.path), or a clear error saying how to make one."""
    base = getattr(model, "path", None)
    if base is None:
        raise ValueError("draft_verify: this model was not loaded from a folder (no model.path); "
                         "pass skip=SkipSet(...) or skip={'attention': [...], 'mlp': [...]}")
    path = skip_set_path(base)
    if not os.path.exists(path):
        raise FileNotFoundError(f"draft_verify: no skip set at {path}; make one with "
                                f"`minispec search-skip --model {base}` or pass skip=...")
    return SkipSet.load(path, n_layers=model.config.n_layers)
