"""Training Medusa heads on a frozen base model, in NumPy with hand-derived gradients (Medusa-1: arXiv 2401.10774,
§2.2.1 "Medusa-1: frozen backbone"; FasterDecoding/Medusa medusa/train/train_legacy.py for the loss).

Reading order: labels -> data (token sequences, hidden states computed once) -> loss and gradients -> Adam and the
learning-rate schedule -> the training loop -> held-out top-k accuracies and the tree -> `train_medusa`, the driver
behind `minispec train-heads --kind medusa`.

The base model is frozen, so its last hidden states h_t are computed once and the heads train on them alone:

    loss = sum_k  w_k · CE(head_k(h_t), x_{t+k+2}),     w_k = 0.8**k  (Medusa's decay: far heads matter less)

each CE a mean over the positions that have a label. Data, `--data corpus`: documents of a text corpus, labels
= the corpus tokens. `--data self` (self-distillation, Medusa §2.3.2): the base model greedily continues prompts
cut from the corpus and the labels are ITS tokens (prompt positions carry no label). Greedy verification accepts
a draft exactly when it equals the base model's own argmax, so self-distilled labels train the heads for the
very thing they are judged on, at the cost of running the base model once per generated token.
"""
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..backend import array_module, to_device, to_host
from ..decoders.medusa import MedusaHeads, head_forward, topk_ids
from ..decoders.medusa_files import save as save_heads
from ..decoders.registry import generate
from ..errors import UserError
from ..mistral.model import load
from ..mistral.tokenizer import Tokenizer
from ..speculative.tree import build_tree
from .checks import REPO, check_training
from .progress import Progress

DECAY = 0.8                      # w_k = DECAY**k: the paper's constant (§2.2.1); FasterDecoding's axolotl
                                 # configs set medusa_decay_coefficient: 0.8
DOC_SEPARATOR = "\n\0\n"         # between documents of data/corpus/*.txt (tools/collect_corpus.py SEPARATOR)


# ---------------------------------------------------------------------------------------------------------
# Labels: head k at position t is trained on the token at t + k + 2
# ---------------------------------------------------------------------------------------------------------
def make_labels(ids, num_heads, first_label=0):
    """labels[k, t] = ids[t + k + 2]: the base LM head predicts t + 1, head k (0-based) the token k + 1 after it.

    ids [T] -> int64 [K, T]; -1 where t + k + 2 is past the end, or is a position before `first_label` (the
    prompt of a self-distilled sequence: those tokens are not the base model's own)."""
    ids = np.asarray(ids, dtype=np.int64)
    T = len(ids)
    labels = np.full((num_heads, T), -1, dtype=np.int64)                     # [K, T]
    for k in range(num_heads):
        off = k + 2
        if T > off:
            labels[k, :T - off] = ids[off:]
        labels[k, :max(0, min(T, first_label - off))] = -1
    return labels


# ---------------------------------------------------------------------------------------------------------
# Data: token sequences, then the base model's hidden states, once
# ---------------------------------------------------------------------------------------------------------
def corpus_sequences(tokenizer, text_path, n_tokens, seq_len=512, seed=0):
    """[(ids, 0), ...] of about n_tokens: documents in a random order, each wrapped <s> doc </s> (as the base
    model was trained) and cut into pieces of at most seq_len tokens."""
    docs = [d for d in Path(text_path).read_text(encoding="utf-8").split(DOC_SEPARATOR) if d.strip()]
    out, total = [], 0
    for i in np.random.default_rng(seed).permutation(len(docs)):
        ids = [tokenizer.bos_id] + tokenizer.encode(docs[i], bos=False) + [tokenizer.eos_id]
        for s in range(0, len(ids), seq_len):
            piece = ids[s:s + seq_len][:n_tokens - total]
            if len(piece) >= 3:                 # shorter pieces hold no label at all
                out.append((piece, 0))
                total += len(piece)
            if total >= n_tokens:
                return out
    return out


def corpus_prompts(tokenizer, text_path, prompt_len=16, seed=0):
    """Endless prompts: prompt_len-token windows at random places of random corpus documents (<s> doc </s>)."""
    docs = [d for d in Path(text_path).read_text(encoding="utf-8").split(DOC_SEPARATOR) if d.strip()]
    rng = np.random.default_rng(seed)
    while True:
        ids = [tokenizer.bos_id] + tokenizer.encode(docs[rng.integers(len(docs))], bos=False) + [tokenizer.eos_id]
        start = int(rng.integers(0, max(1, len(ids) - prompt_len)))
        yield ids[start:start + prompt_len]


def self_distilled_sequences(model, prompts, gen_len, eos_id, n_tokens=None, progress=False):
    """[(prompt + greedy continuation, len(prompt)), ...]: the base model continues each prompt greedily for
    gen_len tokens (stopping after eos_id), until n_tokens tokens in all (None: every prompt). The labels are
    then the model's own greedy tokens."""
    out, total = [], 0
    bar = Progress(total=n_tokens, desc="self-distillation", unit="tok", disable=not progress)
    for prompt in prompts:
        if n_tokens is not None and total >= n_tokens:
            break
        prompt = [int(t) for t in prompt]
        room = gen_len if n_tokens is None else max(1, min(gen_len, n_tokens - total - len(prompt)))
        new = generate(model, prompt, max_new_tokens=room, eos_id=eos_id).tokens
        out.append((prompt + new, len(prompt)))
        total += len(prompt) + len(new)
        bar.update(len(prompt) + len(new))
    bar.close()
    return out


def hidden_states(model, sequences, num_heads, progress=False):
    """The frozen base model's final hidden states over the sequences, computed once, and the heads' labels.

    sequences: [(ids, first_label)] -> H [N, D] on the model's device (N = all tokens), labels int64 [K, N] host.
    Each sequence runs through model.forward with a fresh rolling cache, i.e. in chunks of at most W tokens,
    so memory stays one window of keys/values whatever its length. Labels never cross a sequence boundary."""
    xp = model.xp
    N = sum(len(ids) for ids, _ in sequences)
    H = xp.empty((N, model.config.dim), dtype=model.dtype)                        # [N, D]
    labels = np.empty((num_heads, N), dtype=np.int64)                             # [K, N]
    at = 0
    for ids, first in Progress(sequences, desc="hidden states", unit="seq", disable=not progress):
        n = len(ids)
        _, hidden = model.forward(ids, cache=model.new_cache(), return_hidden=True)      # [n, D]
        H[at:at + n] = hidden
        labels[:, at:at + n] = make_labels(ids, num_heads, first)
        at += n
    return H, labels


# ---------------------------------------------------------------------------------------------------------
# Loss and gradients, by hand
# ---------------------------------------------------------------------------------------------------------
def silu_grad(z):
    """d silu(z) / dz = s + z s (1 - s),  s = sigmoid(z) (written through tanh, like layers.silu)."""
    xp = array_module(z)
    half = z.dtype.type(0.5)
    s = half + half * xp.tanh(half * z)
    return s * (1 + z * (1 - s))


def cross_entropy(logits, labels):
    """Mean cross-entropy over the rows that have a label, and its gradient.

    logits [B, V], labels int [B] (device; -1 = no label) -> (loss 0-d, dlogits [B, V]).
    CE = logsumexp(logits) - logits[label];  dCE/dlogits = (softmax(logits) - onehot(label)) / n_labelled."""
    xp = array_module(logits)
    dt = logits.dtype.type
    B = logits.shape[0]
    rows = xp.arange(B)
    valid = (labels >= 0).astype(logits.dtype)                                   # [B]
    safe = xp.where(labels >= 0, labels, 0)                                      # [B]
    m = logits.max(axis=-1, keepdims=True)                                       # [B, 1]
    e = xp.exp(logits - m)                                                       # [B, V]
    s = e.sum(axis=-1, keepdims=True)                                            # [B, 1]
    n = xp.maximum(valid.sum(), dt(1))
    loss = ((xp.log(s[:, 0]) + m[:, 0] - logits[rows, safe]) * valid).sum() / n
    d = e / s                                                                    # [B, V] softmax
    d[rows, safe] -= dt(1)
    return loss, d * (valid / n)[:, None]


def head_backward(dlogits, saved, Ws, P, grad_proj=True):
    """Backward pass of one head (minispec.medusa.head_forward with keep=True), by the chain rule:

        dP = x_Lh^T dlogits;   dx_Lh = dlogits P^T;   for l = Lh .. 1:  dz_l = dx_l ⊙ silu'(z_l),
        dW_l = x_{l-1}^T dz_l,   db_l = sum_rows dz_l,   dx_{l-1} = dx_l + dz_l W_l^T   (the residual path)

    dlogits [T, V], saved = (xs, zs), Ws [Lh, D, D], P [D, V] -> (dWs [Lh, D, D], dbs [Lh, D], dP [D, V] or None,
    dx_0 [T, D], the gradient of the blocks' input)."""
    xs, zs = saved
    xp = array_module(dlogits)
    Lh, D = len(zs), xs[0].shape[1]
    dWs = xp.empty((Lh, D, D), dtype=dlogits.dtype)                               # [Lh, D, D]
    dbs = xp.empty((Lh, D), dtype=dlogits.dtype)
    dP = xs[-1].T @ dlogits if grad_proj else None                               # [D, V]
    dx = dlogits @ P.T                                                           # [T, D]
    for layer in reversed(range(Lh)):
        dz = dx * silu_grad(zs[layer])                                           # [T, D]
        dWs[layer] = xs[layer].T @ dz                                            # [D, D]
        dbs[layer] = dz.sum(axis=0)                                              # [D]
        dx = dx + dz @ Ws[layer].T                                               # [T, D]
    return dWs, dbs, dP, dx


def medusa_loss(heads, h, labels, weights):
    """The weighted loss of all heads and its gradients.

    h [B, D], labels int [K, B] (device, -1 = none), weights [K] (host floats) ->
    (loss 0-d, per-head CE [K] (device), grads {"W": [K, Lh, D, D], "b": [K, Lh, D], "proj": [K, D, V] (v1 only)})."""
    xp = array_module(h)
    K = heads.K
    grads = {"W": xp.empty_like(heads.W), "b": xp.empty_like(heads.b)}
    if heads.proj is not None:
        grads["proj"] = xp.empty_like(heads.proj)
    per_head = xp.empty(K, dtype=h.dtype)
    for k in range(K):
        P = heads.projection(k)
        logits, saved = head_forward(h, heads.W[k], heads.b[k], P, keep=True)     # [B, V]
        ce, dlogits = cross_entropy(logits, labels[k])
        per_head[k] = ce
        dW, db, dP, _ = head_backward(dlogits * h.dtype.type(weights[k]), saved, heads.W[k], P,
                                   grad_proj=heads.proj is not None)
        grads["W"][k], grads["b"][k] = dW, db
        if dP is not None:
            grads["proj"][k] = dP
    loss = (per_head * to_device(xp, np.asarray(weights, dtype=h.dtype))).sum()
    return loss, per_head, grads


def heldout_loss(heads, H, labels, batch=512):
    """Per-head mean CE [K] (host) over all labelled positions of H [N, D] / labels [K, N] (host)."""
    xp = array_module(H)
    tot, cnt = np.zeros(heads.K), np.zeros(heads.K)
    for s in range(0, H.shape[0], batch):
        lab = labels[:, s:s + batch]
        lab_d = to_device(xp, lab)
        for k in range(heads.K):
            n = int((lab[k] >= 0).sum())
            if n:
                logits = head_forward(H[s:s + batch], heads.W[k], heads.b[k], heads.projection(k))
                tot[k] += float(cross_entropy(logits, lab_d[k])[0]) * n
                cnt[k] += n
    return tot / np.maximum(cnt, 1)


# ---------------------------------------------------------------------------------------------------------
# Adam and the schedule
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """Runtime knobs of a training run (the architecture lives in MedusaHeads)."""
    epochs: int = 1
    lr: float = 1e-3             # Medusa-1's rate
    batch: int = 256             # positions per step
    warmup: float = 0.05         # fraction of the steps spent warming up linearly
    decay: float = DECAY
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    seed: int = 0


def lr_at(step, total, lr, warmup_steps):
    """Linear warm-up to lr over warmup_steps, then cosine decay to 0 at `total` steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Adam:
    """Adam (Kingma & Ba 2015) updating the heads' arrays in place."""

    def __init__(self, params, beta1=0.9, beta2=0.999, eps=1e-8):
        xp = array_module(next(iter(params.values())))
        self.params, self.beta1, self.beta2, self.eps, self.t = params, beta1, beta2, eps, 0
        self.m = {k: xp.zeros_like(p) for k, p in params.items()}
        self.v = {k: xp.zeros_like(p) for k, p in params.items()}

    def step(self, grads, lr):
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t                            # bias corrections
        for name, p in self.params.items():
            g, m, v = grads[name], self.m[name], self.v[name]
            dt = p.dtype.type
            m *= dt(b1)
            m += dt(1 - b1) * g
            v *= dt(b2)
            v += dt(1 - b2) * g * g
            p -= dt(lr / c1) * m / (array_module(p).sqrt(v / dt(c2)) + dt(self.eps))


# ---------------------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------------------
def train(heads, H, labels, cfg=TrainConfig(), progress=True):
    """Train `heads` in place on hidden states H [N, D] (device) and labels int64 [K, N] (host, -1 = none).

    Minibatches of cfg.batch positions drawn without replacement each epoch (positions with at least one label).
    Returns the loss of every step (host floats)."""
    xp = array_module(H)
    rows = np.flatnonzero((labels >= 0).any(axis=0))                            # trainable positions
    labels_d = to_device(xp, labels)                                             # [K, N]
    weights = [cfg.decay ** k for k in range(heads.K)]
    params = {"W": heads.W, "b": heads.b}
    if heads.proj is not None:
        params["proj"] = heads.proj
    adam = Adam(params, cfg.beta1, cfg.beta2, cfg.eps)
    per_epoch = -(-len(rows) // cfg.batch)
    total = cfg.epochs * per_epoch
    warmup = max(1, int(cfg.warmup * total))
    rng = np.random.default_rng(cfg.seed)
    history = []
    bar = Progress(total=total, desc="train heads", unit="step", disable=not progress)
    for epoch in range(cfg.epochs):
        order = rng.permutation(rows)
        for s in range(per_epoch):
            idx = to_device(xp, order[s * cfg.batch:(s + 1) * cfg.batch])        # [B] the batch's positions
            loss, per_head, grads = medusa_loss(heads, H[idx], labels_d[:, idx], weights)
            adam.step(grads, lr_at(len(history), total, cfg.lr, warmup))
            history.append(float(loss))
            if len(history) % 10 == 1 or len(history) == total:
                bar.set_postfix(loss=f"{history[-1]:.3f}",
                                heads=" ".join(f"{c:.2f}" for c in to_host(per_head).tolist()))
            bar.update(1)
    bar.close()
    return history


# ---------------------------------------------------------------------------------------------------------
# Held-out accuracies and the tree
# ---------------------------------------------------------------------------------------------------------
def topk_accuracies(heads, H, labels, k=10, batch=256):
    """acc[h][r] = P(head h's rank-r candidate is the label), over the held-out positions with a label for head h.

    H [N, D] (device), labels [K, N] (host) -> float64 [K, k] (host). This is what minispec.tree.build_tree
    takes; it assumes a head is right as often after a correct path as on average (Medusa §2.3.3 does the same)."""
    hits, cnt = np.zeros((heads.K, k)), np.zeros(heads.K)
    for s in range(0, H.shape[0], batch):
        top = to_host(topk_ids(heads.logits(H[s:s + batch]), k))                 # [K, B, k]
        lab = labels[:, s:s + batch]                                             # [K, B]
        valid = lab >= 0
        hits += ((top == lab[:, :, None]) & valid[:, :, None]).sum(axis=1)
        cnt += valid.sum(axis=1)
    return hits / np.maximum(cnt, 1)[:, None]


# ---------------------------------------------------------------------------------------------------------
# The driver: `minispec train-heads --kind medusa`
# ---------------------------------------------------------------------------------------------------------
def training_sequences(model, tok, data, text, n_tokens, seq_len, seed, prompt_len, gen_len, progress):
    """The [(tokens, start)] sequences heads train on (Medusa and Hydra alike): data="corpus" cuts the text
    into seq_len pieces; "self": the model's own greedy continuations of prompts cut from it (self-distillation)."""
    if data == "corpus":
        return corpus_sequences(tok, text, n_tokens, seq_len, seed)
    return self_distilled_sequences(model, corpus_prompts(tok, text, prompt_len, seed),
                                    min(gen_len, seq_len - prompt_len), tok.eos_id, n_tokens, progress)


def split_heldout(seqs, heldout):
    """(training, held-out) sequences: the last round(heldout · n) are held out, at least 1 and leaving 1."""
    if len(seqs) < 2:
        raise UserError(f"need at least 2 sequences (train + held-out), got {len(seqs)}: raise --tokens")
    n_held = min(len(seqs) - 1, max(1, int(round(heldout * len(seqs)))))
    return seqs[:-n_held], seqs[-n_held:]


def train_medusa(model_dir, out=None, version="v1", num_heads=4, num_layers=1, data="corpus", text=None,
                 n_tokens=100_000, seq_len=512, epochs=1, lr=1e-3, batch=256, budget=10, top_k=10, heldout=0.1,
                 seed=0, device="auto", dtype="float32", prompt_len=16, gen_len=112, progress=True):
    """Train Medusa heads for the model in model_dir and save them (default <model_dir>/medusa/), with the tree
    built from their held-out accuracies for `budget` nodes. Returns (heads, report dict)."""

    text = check_training(version=version, num_heads=num_heads, num_layers=num_layers, data=data, text=text,
                          n_tokens=n_tokens, seq_len=seq_len, epochs=epochs, lr=lr, batch=batch, budget=budget,
                          top_k=top_k, seed=seed, out=Path(model_dir) / "medusa" if out is None else out)
    model = load(model_dir, dtype=dtype, device=device)
    tok = Tokenizer.from_dir(model_dir)
    if model.config.sliding_window is None:          # no ring: a sequence must fit the cache
        seq_len = min(seq_len, model.config.cache_slots)
    say = print if progress else (lambda *a, **k: None)

    seqs = training_sequences(model, tok, data, text, n_tokens, seq_len, seed, prompt_len, gen_len, progress)
    train_seqs, held_seqs = split_heldout(seqs, heldout)
    say(f"data: {data}, {sum(len(s) for s, _ in train_seqs):,} training tokens in {len(train_seqs)} sequences, "
        f"{sum(len(s) for s, _ in held_seqs):,} held-out; computing the base model's hidden states once ...")
    H, labels = hidden_states(model, train_seqs, num_heads, progress)
    Hh, labels_h = hidden_states(model, held_seqs, num_heads, progress)

    heads = MedusaHeads.create(model, num_heads, num_layers, version)
    before = heldout_loss(heads, Hh, labels_h)
    cfg = TrainConfig(epochs=epochs, lr=lr, batch=batch, seed=seed)
    history = train(heads, H, labels, cfg, progress=progress)
    after = heldout_loss(heads, Hh, labels_h)
    acc = topk_accuracies(heads, Hh, labels_h, k=top_k)
    tree, tau = build_tree(acc, budget)
    heads.choices = [list(p) for p in tree.choices[1:]]
    heads.accuracies = np.round(acc, 4).tolist()

    say("held-out CE per head, before -> after: " + ", ".join(f"{b:.3f} -> {a:.3f}" for b, a in zip(before, after)))
    say("held-out top-1 / top-5 accuracy per head: " + ", ".join(f"{a[0]:.3f} / {a[:5].sum():.3f}" for a in acc))
    say(f"tree of {len(heads.choices)} nodes: {heads.choices}\n"
        f"expected tokens per step tau = {tau:.3f} (greedy, bonus included)")
    text = Path(text).resolve()
    report = {"data": data, "text": str(text.relative_to(REPO) if text.is_relative_to(REPO) else text),
              "train_tokens": int(H.shape[0]), "heldout_tokens": int(Hh.shape[0]), "seq_len": seq_len,
              "epochs": epochs, "lr": lr, "batch": batch, "seed": seed, "steps": len(history),
              "final_train_loss": history[-1] if history else None,
              "heldout_ce_before": np.round(before, 4).tolist(), "heldout_ce_after": np.round(after, 4).tolist(),
              "expected_tau": round(tau, 4), "budget": budget}
    if data == "self":
        report.update(prompt_len=prompt_len, gen_len=gen_len)
    out = Path(model_dir) / "medusa" if out is None else Path(out)
    save_heads(heads, out, extra={"training": report})
    say(f"saved {out}")
    return heads, report
