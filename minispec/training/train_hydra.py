"""Training Hydra and Hydra++ heads on a frozen base model, in NumPy with hand-derived gradients (Ankner et al.
2024, arXiv 2402.05109; zankner/Hydra hydra/train/train.py for the loss). The backward passes are in
training.backprop, the data and the hidden states in training.data, Adam and the resumable loop in
training.optim; the forwards and the file format in decoders.hydra_heads / hydra_files.

Reading order: teacher-forced head inputs -> the loss of a batch and its gradients -> batches (positions for
Hydra, whole sequences for Hydra++) -> the training loop -> held-out accuracies, the teacher-forced τ of a tree ->
`train_hydra`, the driver behind `minispec train-heads --kind hydra|hydra++`.

Teacher forcing. The base model is frozen, so its final-norm hidden states h_t are computed once. Head i at
position t reads a_i = concat(u_t, E(x_{t+1}), ..., E(x_{t+i+1})) with the sequence's own tokens x (E the base
embedding table) and is trained to predict x_{t+i+2}; u_t = h_t for Hydra, u_t = prefix(h)_t for Hydra++, the
prefix layer run causally over the whole training sequence (so Hydra++ trains on sequences, not shuffled
positions). At decode time the tokens on a tree path are drafts; whenever they are right they equal the
teacher-forced ones, and only right paths can be accepted, so this is the distribution that matters.

The loss, as zankner/Hydra's trainer combines it: every head counts alike (no Medusa-style decay), each head

    loss_i = lm_weight · CE(q_i, x_{t+i+2}) + teacher_weight · CE(q_i, p_{t+i+1}),   p = softmax(h W_out)

where the second term, the teacher loss, is the cross-entropy to the base model's own next-token distribution
at position t+i+1 (the position whose next token head i guesses). p is recomputed per batch from the stored
hidden states with the base output layer instead of storing V-wide distributions. Hydra's trainer defaults to
lm 1 / teacher 0; its Hydra++ recipe (zankner/Hydra README) to lm 0 / teacher 1. Shapes: B rows, K heads,
D dim, V vocab, N tokens of data.
"""
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..backend import array_module, to_device, to_host
from ..decoders.hydra_heads import head_forward, HydraHeads, KIND_ARCH, prefix_forward
from ..decoders.hydra_files import save
from ..decoders.medusa import topk_ids
from ..mistral.model import load
from ..mistral.tokenizer import Tokenizer
from ..speculative.tree import build_tree
from . import backprop as bp
from .checks import check_hydra_training
from .data import (hidden_states, load_sequences, save_sequences, split_heldout, text_record,
                   training_sequences)
from .optim import fit


# ---------------------------------------------------------------------------------------------------------
# Teacher-forced inputs
# ---------------------------------------------------------------------------------------------------------
def head_inputs(u_rows, E, ids, rows, i):
    """a_i for the given rows: concat(u_rows, E[ids[rows + 1]], ..., E[ids[rows + i + 1]]).

    u_rows [B, D] (h or prefix(h) at the rows), E [V, D], ids int [N] (device), rows int [B] (device)
    -> [B, (i+2)D]. Indices past the end are clipped: those rows have no label for head i, so they never
    reach the loss."""
    xp = array_module(u_rows)
    B, D = u_rows.shape
    a = xp.empty((B, (i + 2) * D), dtype=u_rows.dtype)                          # [B, (i+2)D]
    a[:, :D] = u_rows
    last = ids.shape[0] - 1
    for j in range(1, i + 2):
        a[:, j * D:(j + 1) * D] = E[ids[xp.minimum(rows + j, last)]]
    return a


# ---------------------------------------------------------------------------------------------------------
# The loss of one batch and its gradients
# ---------------------------------------------------------------------------------------------------------
def dropout_mask(shape, rate, rng, xp, dtype):
    """Inverted dropout (Srivastava et al. 2014, with the 1 / (1 - rate) scaling at training time): each entry
    kept with probability 1 - rate and scaled by 1 / (1 - rate), so the mask's mean is 1 and inference runs the
    plain forward. Drawn on the host from rng (deterministic per step).  -> [*shape] on the device"""
    keep = rng.random(shape) >= rate
    return to_device(xp, keep.astype(np.float64) / (1 - rate)).astype(dtype)


def heads_loss(heads, u_rows, hidden, E, W_out, ids, labels, rows, lm_weight=1.0, teacher_weight=0.0, dropout=0.0,
               rng=None):
    """Σ_i loss_i over the K heads at positions `rows`, and the gradients.

    u_rows [B, D]: the heads' first input at the rows (h or prefix(h)); hidden [N, D] base hidden states
    (the teacher: hidden[t+i+1] W_out); ids int [N], labels int [K, N] (-1 = none), rows int [B], all on the
    device -> (loss float, per-head loss [K] (host), {"heads": [grad dict per head], "u_rows": du [B, D]}).
    dropout > 0 (with rng): inverted dropout on each head's input a_i, where zankner/Hydra's Hydra++ head puts
    its first nn.Dropout (the backward multiplies da_i by the same mask)."""
    xp = array_module(u_rows)
    u = u_rows
    D, last = u.shape[1], hidden.shape[0] - 1
    du = xp.zeros((rows.shape[0], D), dtype=u.dtype)                            # [B, D]
    grads, per_head, total = [], np.zeros(heads.K), 0.0
    for i, p in enumerate(heads.heads):
        lab = labels[i, rows]                                                   # [B]
        a = head_inputs(u, E, ids, rows, i)                                     # [B, (i+2)D]
        mask = dropout_mask(a.shape, dropout, rng, xp, a.dtype) if dropout and rng is not None else None
        logits, saved = head_forward(p, a if mask is None else a * mask, keep=True)      # [B, V]
        teacher = hidden[xp.minimum(rows + i + 1, last)] @ W_out if teacher_weight else None   # [B, V] base at t+i+1
        lm, tl, dlogits = bp.head_ce(logits, lab, teacher, lm_weight, teacher_weight)
        loss = lm_weight * lm + teacher_weight * tl
        da, g = bp.hydra_head_backward(dlogits, p, saved)
        du += da[:, :D] if mask is None else da[:, :D] * mask[:, :D]   # embedding columns: the frozen base's
        grads.append(g)
        per_head[i] = loss
        total += loss
    return total, per_head, {"heads": grads, "u_rows": du}


def batch_loss(heads, data, rows_h, seqs, cfg, rng=None):
    """The loss of one batch and the gradients of every trained array, by name (see `param_dict`).

    Hydra: rows_h int [B] host positions. Hydra++: seqs = [(start, length)] whole sequences, run through the
    prefix layer (causal, sliding window), every position of them a row. rng: the step's dropout draws (None:
    no dropout, whatever cfg.dropout says)."""
    knobs = (cfg.lm_weight, cfg.teacher_weight, cfg.dropout, rng)
    xp, c = heads.xp, heads.model_config
    hidden = data["hidden"]
    if heads.prefix is None:
        rows = to_device(xp, rows_h)
        loss, per_head, g = heads_loss(heads, hidden[rows], hidden, heads.embed, data["W_out"], data["ids"],
                                       data["labels"], rows, *knobs)
        return loss, per_head, named(g["heads"], None)
    # Hydra++: u = prefix(h) over each sequence; rows index the batch's own packed u
    n = sum(length for _, length in seqs)
    u = xp.empty((n, c.dim), dtype=hidden.dtype)                                    # [n, D]
    idx = np.concatenate([np.arange(s, s + length) for s, length in seqs])                # [n] host positions
    kept, at = [], 0
    for s, length in seqs:
        u[at:at + length], saved = prefix_forward(heads.prefix, c, hidden[s:s + length], keep=True)
        kept.append(saved)
        at += length
    pos_d = to_device(xp, idx)
    loss, per_head, g = heads_loss(heads, u, hidden, heads.embed, data["W_out"], data["ids"],
                                   data["labels"], pos_d, *knobs)
    gp = {k: xp.zeros_like(v) for k, v in heads.prefix.items()}
    at = 0
    for (s, length), saved in zip(seqs, kept):
        _, gl = bp.prefix_backward(g["u_rows"][at:at + length], heads.prefix, saved, c.n_heads, c.n_kv_heads,
                                   c.norm_eps)
        for k in gp:
            gp[k] += gl[k]
        at += length
    return loss, per_head, named(g["heads"], gp)


# ---------------------------------------------------------------------------------------------------------
# Parameters by name (for Adam and the checkpoint)
# ---------------------------------------------------------------------------------------------------------
def param_dict(heads):
    """{"head.{i}.{name}": array, "prefix.{name}": array}: views of the heads' own arrays (updated in place);
    arrays with no entries (ws/bs of 1-block heads) are left out, and so is a shared output layer (the base
    model's, frozen: "proj_w" of heads.shared_output heads)."""
    frozen = ("proj_w",) if heads.shared_output else ()
    return named([{k: v for k, v in p.items() if k not in frozen} for p in heads.heads], heads.prefix)


def named(head_dicts, prefix_dict):
    """The per-head dicts and the prefix dict (or None) of parameters or of their gradients, by param_dict's names."""
    out = {f"head.{i}.{k}": v for i, p in enumerate(head_dicts) for k, v in p.items() if v.size}
    if prefix_dict is not None:
        out.update({f"prefix.{k}": v for k, v in prefix_dict.items()})
    return out


# ---------------------------------------------------------------------------------------------------------
# The training loop, resumable
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HydraTrainConfig:
    """Runtime knobs of a training run (the architecture lives in HydraHeads)."""
    epochs: int = 1
    lr: float = 1e-3
    batch: int = 256             # positions per step (Hydra++: whole sequences up to about this many tokens)
    warmup: float = 0.05         # fraction of the steps spent warming up linearly, then cosine to 0
    lm_weight: float = 1.0
    teacher_weight: float = 0.0
    weight_decay: float = 0.0    # AdamW's decoupled decay (zankner/Hydra's Hydra++ recipe: 0.1)
    dropout: float = 0.0         # on each head's input (zankner/Hydra's Hydra++ recipe: 0.2)
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    seed: int = 0


def make_batches(labels, seq_bounds, cfg, rng, by_sequence):
    """One epoch's batches, the same number every epoch: arrays of positions (Hydra: rows with a label,
    shuffled) or lists of (start, length) whole sequences, as many per batch as make about cfg.batch tokens on
    average (Hydra++)."""
    if not by_sequence:
        rows = rng.permutation(np.flatnonzero((labels >= 0).any(axis=0)))
        return [rows[s:s + cfg.batch] for s in range(0, len(rows), cfg.batch)]
    per = max(1, int(round(cfg.batch / np.mean([length for _, length in seq_bounds]))))
    order = [tuple(map(int, seq_bounds[j])) for j in rng.permutation(len(seq_bounds))]
    return [order[s:s + per] for s in range(0, len(order), per)]


def train(heads, data, cfg=HydraTrainConfig(), checkpoint=None, checkpoint_every=100, stop_after=None,
          progress=True):
    """Train `heads` in place. data: {"hidden" [N, D], "ids" [N], "labels" [K, N] (device), "labels_h" (host),
    "W_out" [D, V], "seqs" [(start, length)] (host)}. Hydra++ (heads.prefix set) trains on whole sequences.

    checkpoint: a path stem; if its files exist training resumes from them, bit-identically (optim.fit), and
    they are rewritten every checkpoint_every steps and at the end. stop_after: stop after this many steps in
    all (tests, time limits). Returns the loss of every step run in this call (host floats)."""
    by_seq = heads.prefix is not None

    def batch(b, step):
        rows, seqs = (None, b) if by_seq else (b, None)
        rng = np.random.default_rng([cfg.seed, step]) if cfg.dropout else None      # a resume redraws the same
        return batch_loss(heads, data, rows, seqs, cfg, rng)

    return fit(param_dict(heads), batch, lambda rng: make_batches(data["labels_h"], data["seqs"], cfg, rng, by_seq),
               cfg, checkpoint=checkpoint, checkpoint_every=checkpoint_every, stop_after=stop_after,
               progress=progress, desc=f"train {heads.kind}")


# ---------------------------------------------------------------------------------------------------------
# Held-out: top-k accuracies per head and the teacher-forced τ of a tree
# ---------------------------------------------------------------------------------------------------------
def heldout_ranks(heads, data, k=10, batch=512):
    """rank[i, t] = the rank of x_{t+i+2} among head i's top-k at t (teacher-forced), k if it is not among
    them, -1 where head i has no label. Also the mean loss per head. -> (int64 [K, N] host, float [K])."""
    xp, c = heads.xp, heads.model_config
    hidden, N = data["hidden"], data["hidden"].shape[0]
    u = hidden
    if heads.prefix is not None:            # Hydra++: the prefix layer over each held-out sequence
        u = xp.empty_like(hidden)
        for s, length in data["seqs"]:
            u[s:s + length] = prefix_forward(heads.prefix, c, hidden[s:s + length])
    ranks = np.full((heads.K, N), -1, dtype=np.int64)
    tot, cnt = np.zeros(heads.K), np.zeros(heads.K)
    for s in range(0, N, batch):
        rows = xp.arange(s, min(N, s + batch))
        for i, p in enumerate(heads.heads):
            lab_h = data["labels_h"][i, s:s + batch]
            logits = head_forward(p, head_inputs(u[rows], heads.embed, data["ids"], rows, i))   # [B, V]
            top = to_host(topk_ids(logits, k))                                      # [B, k]
            hit = top == lab_h[:, None]
            r = np.where(hit.any(axis=1), hit.argmax(axis=1), k)
            ranks[i, s:s + batch] = np.where(lab_h >= 0, r, -1)
            n = int((lab_h >= 0).sum())
            if n:
                tot[i] += float(bp.cross_entropy(logits, data["labels"][i, rows])[0]) * n
                cnt[i] += n
    return ranks, tot / np.maximum(cnt, 1)


def rank_accuracies(ranks, k=10):
    """acc[i][r] = P(head i's rank-r candidate is the label), over positions with a label for head i.
    -> float64 [K, k]: what minispec.speculative.tree.build_tree takes."""
    K = ranks.shape[0]
    acc = np.zeros((K, k))
    for i in range(K):
        r = ranks[i][ranks[i] >= 0]
        acc[i] = np.bincount(r, minlength=k + 1)[:k] / max(1, len(r))
    return acc


def teacher_forced_tau(tree, ranks):
    """Mean over held-out positions of 1 + the number of tree nodes whose whole path is right, with head d's
    ranking taken teacher-forced at t: for greedy decoding this is the accepted length (bonus included) of a
    step taken at t. Positions where some head the tree uses has no label are left out.  -> float"""
    depth = tree.max_depth
    if depth == 0:
        return 1.0
    ok = (ranks[:depth] >= 0).all(axis=0)
    r = ranks[:depth, ok]                                                       # [depth, n]
    right = np.ones((tree.N, r.shape[1]), dtype=bool)                           # [N, n]
    for n in range(1, tree.N):                  # node order puts parents before children
        d = tree.depths[n] - 1
        right[n] = right[tree.parents[n]] & (r[d] == tree.rank[n])
    return float(right.sum(axis=0).mean())


# ---------------------------------------------------------------------------------------------------------
# The driver: `minispec train-heads --kind hydra|hydra++`
# ---------------------------------------------------------------------------------------------------------
def prepare(model, seqs, num_heads):
    """The frozen base model's hidden states over the sequences, once, and what training reads."""
    xp = model.xp
    hidden, labels = hidden_states(model, seqs, num_heads)                    # [N, D] device, [K, N] host
    lens = np.array([len(s) for s, _ in seqs])
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    ids = np.concatenate([np.asarray(s, np.int64) for s, _ in seqs])
    return {"hidden": hidden, "ids": to_device(xp, ids), "labels": to_device(xp, labels), "labels_h": labels,
            "W_out": model.output, "seqs": list(zip(starts.tolist(), lens.tolist()))}


def train_hydra(model_dir, kind="hydra", out=None, num_heads=4, num_layers=None, data="self", text=None,
                data_cache=None, n_tokens=150_000, seq_len=512, epochs=2, lr=1e-3, batch=256, lm_weight=None,
                teacher_weight=None, budget=10, gpu_budget=32, top_k=10, heldout=0.1, seed=0, device="auto",
                dtype="float32", prompt_len=16, gen_len=112, checkpoint=None, weight_decay=0.0, dropout=0.0,
                extra_data=(), shared_output=False, progress=True):
    """Train Hydra (kind "hydra") or Hydra++ ("hydra++") heads for the model in model_dir and save them
    (default <model_dir>/<kind>/, float16), with trees built from their held-out accuracies (`budget` nodes
    for "tree", `gpu_budget` for "tree_cuda"). Defaults per kind: hydra 1 block, lm 1 / teacher 0; hydra++
    4 blocks, lm 0 / teacher 1 (zankner/Hydra's Hydra++ recipe). weight_decay, dropout: HydraTrainConfig's.
    extra_data: more .npz sequence caches (save_sequences' format), added to the training split only, so the
    held-out sequences stay those of `data_cache` / the generated data. shared_output: heads whose projection is
    the model's frozen output layer (hydra_heads.py), trained without it. Returns (heads, report dict)."""

    num_layers, lm_weight, teacher_weight, text = check_hydra_training(
        kind, num_heads, num_layers, data, text, data_cache, n_tokens, seq_len, epochs, lr, batch, lm_weight,
        teacher_weight, budget, gpu_budget, top_k, heldout, seed, Path(model_dir) / kind if out is None else out,
        checkpoint, weight_decay=weight_decay, dropout=dropout)
    say = print if progress else (lambda *a, **k: None)
    cached = data_cache is not None and Path(data_cache).exists()
    t_start = time.time()
    model = load(model_dir, dtype=dtype, device=device)
    tok = Tokenizer.from_dir(model_dir)
    seq_len = min(seq_len, model.config.sliding_window or seq_len, model.config.cache_slots)
    if cached:
        seqs = load_sequences(data_cache, model.config.vocab_size)
        say(f"data: {len(seqs)} sequences from {data_cache}")
    else:
        seqs = training_sequences(model, tok, data, text, n_tokens, seq_len, seed, prompt_len, gen_len, progress)
        if data_cache is not None:
            save_sequences(data_cache, seqs)
    train_seqs, held_seqs = split_heldout(seqs, heldout)
    for path in extra_data:
        train_seqs = train_seqs + load_sequences(path, model.config.vocab_size)
    say(f"computing the base model's hidden states once over {sum(len(s) for s, _ in train_seqs + held_seqs):,} "
        f"tokens ...")
    train_d, held_d = prepare(model, train_seqs, num_heads), prepare(model, held_seqs, num_heads)
    t_data = time.time()

    heads = HydraHeads.create(model, num_heads, num_layers, KIND_ARCH[kind], seed=seed, shared_output=shared_output)
    heads.base_model = Path(model_dir).resolve().name
    _, before = heldout_ranks(heads, held_d, top_k)
    cfg = HydraTrainConfig(epochs=epochs, lr=lr, batch=batch, lm_weight=lm_weight, teacher_weight=teacher_weight,
                           weight_decay=weight_decay, dropout=dropout, seed=seed)
    history = train(heads, train_d, cfg, checkpoint=checkpoint, progress=progress)
    t_train = time.time()
    steps = json.loads(Path(checkpoint).with_suffix(".json").read_text())["step"] if checkpoint else len(history)
    ranks, after = heldout_ranks(heads, held_d, top_k)
    acc = rank_accuracies(ranks, top_k)
    tree, tau = build_tree(acc, budget)
    gpu_tree, gpu_tau = build_tree(acc, gpu_budget)
    heads.choices = [list(p) for p in tree.choices[1:]]
    heads.choices_cuda = [list(p) for p in gpu_tree.choices[1:]]
    heads.accuracies = np.round(acc, 4).tolist()
    tf_tau, tf_gpu = teacher_forced_tau(tree, ranks), teacher_forced_tau(gpu_tree, ranks)
    say("held-out CE per head, before -> after: " + ", ".join(f"{b:.3f} -> {a:.3f}" for b, a in zip(before, after)))
    say("held-out top-1 / top-5 accuracy per head: " + ", ".join(f"{a[0]:.3f} / {a[:5].sum():.3f}" for a in acc))
    say(f"tree of {budget} nodes: tau {tau:.3f} (independence estimate), {tf_tau:.3f} (teacher-forced held-out); "
        f"{gpu_budget} nodes: {gpu_tau:.3f} / {tf_gpu:.3f}")
    report = {"data": data, "text": text_record(text), "sequences": len(seqs),
              "train_tokens": int(train_d["hidden"].shape[0]), "heldout_tokens": int(held_d["hidden"].shape[0]),
              "epochs": epochs, "lr": lr, "batch": batch, "lm_weight": lm_weight, "teacher_weight": teacher_weight,
              "weight_decay": weight_decay, "dropout": dropout, **({"shared_output": True} if shared_output else {}),
              "seed": seed, "steps": steps, "final_train_loss": round(history[-1], 4) if history else None,
              "heldout_ce_before": np.round(before, 4).tolist(), "heldout_ce_after": np.round(after, 4).tolist(),
              "budget": budget, "expected_tau": round(tau, 4), "teacher_forced_tau": round(tf_tau, 4),
              "gpu_budget": gpu_budget, "gpu_expected_tau": round(gpu_tau, 4),
              "gpu_teacher_forced_tau": round(tf_gpu, 4), "data_seconds": round(t_data - t_start, 1),
              "train_seconds": round(t_train - t_data, 1)}
    if data == "self":
        report.update(prompt_len=prompt_len, gen_len=gen_len)
    if extra_data:
        report.update(extra_data=[Path(x).name for x in extra_data])
    out = Path(model_dir) / kind if out is None else Path(out)
    save(heads, out, extra={"training": report}, dtype=np.float16)
    say(f"saved {out} ({report['train_seconds']:.0f} s of training)")
    return heads, report
