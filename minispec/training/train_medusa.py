"""Training Medusa heads on a frozen base model, in NumPy with hand-derived gradients (Medusa-1: arXiv 2401.10774,
§2.2.1 "Medusa-1: frozen backbone"; FasterDecoding/Medusa medusa/train/train_legacy.py for the loss).

Reading order: the loss of a batch and its gradients (the backward passes are in training.backprop) -> the training
loop (training.optim.fit: Adam, the schedule, checkpoints) -> held-out top-k accuracies and the tree ->
`train_medusa`, the driver behind `minispec train-heads --kind medusa`. The data (corpus pieces or
self-distillation, hidden states computed once) is training.data's, shared with the Hydra trainer.

The base model is frozen, so its last hidden states h_t are computed once and the heads train on them alone:

    loss = sum_k  w_k · CE(head_k(h_t), x_{t+k+2}),     w_k = 0.8**k  (Medusa's decay: far heads matter less)

each CE a mean over the positions that have a label. Shapes: B rows of a batch, N tokens of data, D dim, K heads,
Lh blocks per head, V vocab.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..backend import array_module, to_device, to_host
from ..decoders.medusa import MedusaHeads, head_forward, topk_ids
from ..decoders.medusa_files import save as save_heads
from ..mistral.model import load
from ..mistral.tokenizer import Tokenizer
from ..speculative.tree import build_tree
from .backprop import cross_entropy, head_backward
from .checks import check_training
from .data import hidden_states, split_heldout, text_record, training_sequences
from .optim import fit

DECAY = 0.8                      # w_k = DECAY**k: the paper's constant (§2.2.1); FasterDecoding's axolotl
                                 # configs set medusa_decay_coefficient: 0.8


# ---------------------------------------------------------------------------------------------------------
# The loss of a batch and its gradients
# ---------------------------------------------------------------------------------------------------------
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


def heldout_loss(heads, hidden, labels, batch=512):
    """Per-head mean CE [K] (host) over all labelled positions of hidden [N, D] / labels [K, N] (host)."""
    xp = array_module(hidden)
    tot, cnt = np.zeros(heads.K), np.zeros(heads.K)
    for s in range(0, hidden.shape[0], batch):
        lab = labels[:, s:s + batch]
        lab_d = to_device(xp, lab)
        for k in range(heads.K):
            n = int((lab[k] >= 0).sum())
            if n:
                logits = head_forward(hidden[s:s + batch], heads.W[k], heads.b[k], heads.projection(k))
                tot[k] += float(cross_entropy(logits, lab_d[k])[0]) * n
                cnt[k] += n
    return tot / np.maximum(cnt, 1)


# ---------------------------------------------------------------------------------------------------------
# The training loop
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
    weight_decay: float = 0.0    # AdamW's decoupled decay (0: plain Adam, as Medusa-1)
    seed: int = 0


def train(heads, hidden, labels, cfg=TrainConfig(), checkpoint=None, progress=True):
    """Train `heads` in place on hidden states [N, D] (device) and labels int64 [K, N] (host, -1 = none).

    Minibatches of cfg.batch positions drawn without replacement each epoch (positions with at least one label);
    checkpoint: a path stem to resume from and save to (optim.fit). Returns the loss of every step (host floats)."""
    xp = array_module(hidden)
    rows = np.flatnonzero((labels >= 0).any(axis=0))                            # trainable positions
    labels_d = to_device(xp, labels)                                             # [K, N]
    weights = [cfg.decay ** k for k in range(heads.K)]
    params = {"W": heads.W, "b": heads.b}
    if heads.proj is not None:
        params["proj"] = heads.proj

    def epoch_batches(rng):
        order = rng.permutation(rows)
        return [order[s:s + cfg.batch] for s in range(0, len(rows), cfg.batch)]

    def batch_loss(batch, step):
        idx = to_device(xp, batch)                                               # [B] the batch's positions
        loss, per_head, grads = medusa_loss(heads, hidden[idx], labels_d[:, idx], weights)
        return float(loss), to_host(per_head).tolist(), grads

    return fit(params, batch_loss, epoch_batches, cfg, checkpoint=checkpoint, progress=progress)


# ---------------------------------------------------------------------------------------------------------
# Held-out accuracies and the tree
# ---------------------------------------------------------------------------------------------------------
def topk_accuracies(heads, hidden, labels, k=10, batch=256):
    """acc[h][r] = P(head h's rank-r candidate is the label), over the held-out positions with a label for head h.

    hidden [N, D] (device), labels [K, N] (host) -> float64 [K, k] (host). This is what speculative.tree.build_tree
    takes; it assumes a head is right as often after a correct path as on average (Medusa §2.3.3 does the same)."""
    hits, cnt = np.zeros((heads.K, k)), np.zeros(heads.K)
    for s in range(0, hidden.shape[0], batch):
        top = to_host(topk_ids(heads.logits(hidden[s:s + batch]), k))                 # [K, B, k]
        lab = labels[:, s:s + batch]                                             # [K, B]
        valid = lab >= 0
        hits += ((top == lab[:, :, None]) & valid[:, :, None]).sum(axis=1)
        cnt += valid.sum(axis=1)
    return hits / np.maximum(cnt, 1)[:, None]


# ---------------------------------------------------------------------------------------------------------
# The driver: `minispec train-heads --kind medusa`
# ---------------------------------------------------------------------------------------------------------
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
    hidden, labels = hidden_states(model, train_seqs, num_heads, progress)
    hidden_h, labels_h = hidden_states(model, held_seqs, num_heads, progress)

    heads = MedusaHeads.create(model, num_heads, num_layers, version)
    before = heldout_loss(heads, hidden_h, labels_h)
    cfg = TrainConfig(epochs=epochs, lr=lr, batch=batch, seed=seed)
    history = train(heads, hidden, labels, cfg, progress=progress)
    after = heldout_loss(heads, hidden_h, labels_h)
    acc = topk_accuracies(heads, hidden_h, labels_h, k=top_k)
    tree, tau = build_tree(acc, budget)
    heads.choices = [list(p) for p in tree.choices[1:]]
    heads.accuracies = np.round(acc, 4).tolist()

    say("held-out CE per head, before -> after: " + ", ".join(f"{b:.3f} -> {a:.3f}" for b, a in zip(before, after)))
    say("held-out top-1 / top-5 accuracy per head: " + ", ".join(f"{a[0]:.3f} / {a[:5].sum():.3f}" for a in acc))
    say(f"tree of {len(heads.choices)} nodes: {heads.choices}\n"
        f"expected tokens per step tau = {tau:.3f} (greedy, bonus included)")
    report = {"data": data, "text": text_record(text),
              "train_tokens": int(hidden.shape[0]), "heldout_tokens": int(hidden_h.shape[0]), "seq_len": seq_len,
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
