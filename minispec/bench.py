"""Benchmarks that print the limit next to the result (STYLE.md #11).

`bench_forward`: plain greedy decoding, tokens/s on generated tokens only — the prompt is prefilled, the timer
starts after the first new token, the median of `runs` runs after a warm-up run is reported — and, where torch
and transformers are installed, HF transformers' MistralForCausalLM decoding the same weights the same way in the
same process, with the ratio. The environment (CPU, BLAS, threads, versions) is printed first.
"""
import os
import platform
import statistics
import time

import numpy as np

from .backend import to_host
from .model import load


def environment():
    cpu = platform.processor() or "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}
    blas = "?"
    try:
        cfg = np.show_config(mode="dicts")
        blas = cfg["Build Dependencies"]["blas"]["name"]
    except Exception:
        pass
    return (f"python {platform.python_version()}, numpy {np.__version__} ({blas}), {os.cpu_count()} cpus: {cpu}, "
            f"threads env {threads or 'unset'}")


def _decode_rate(step, first, n_tokens, runs):
    """Median tokens/s of `runs` timed runs after one warm-up; step(token) -> next token; timer after token 1."""
    rates = []
    for r in range(runs + 1):
        tok = first(r)
        t0 = time.perf_counter()
        for _ in range(n_tokens - 1):
            tok = step(tok)
        dt = time.perf_counter() - t0
        if r > 0:
            rates.append((n_tokens - 1) / dt)
    return statistics.median(rates), rates


def private_memory():
    """Resident anonymous memory of this process in bytes (RssAnon: not counting mapped files), 0 without /proc."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def memory_bandwidth(mb=512, reps=3):
    """This machine's DRAM read bandwidth in bytes/s: the best of `reps` sums over a `mb` MB array (far larger
    than the caches), i.e. the speed at which a decode step could at best stream its weights."""
    a = np.ones(mb << 17, np.uint64)                                # mb MB
    best = min(_timed(lambda: np.add.reduce(a)) for _ in range(reps))
    return a.nbytes / best


def _timed(f):
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def bench_forward(model_dir, n_tokens=64, runs=5, device="auto", dtype="float32", compare_hf=True, prompt_len=16,
                  weights="auto"):
    print("environment:", environment())
    mem0, t0 = private_memory(), time.perf_counter()
    model = load(model_dir, dtype=dtype, device=device, weights=weights)
    load_s, mem_load = time.perf_counter() - t0, private_memory() - mem0
    c = model.config
    prompt = (np.arange(prompt_len) * 7 + 1) % c.vocab_size
    state = {"peak": mem_load, "prefill": [], "bw": []}

    def first(_):
        state["bw"].append(memory_bandwidth())                      # interleaved with the decode runs
        state["cache"] = model.new_cache()
        t = time.perf_counter()
        tok = int(to_host(model.forward(prompt, state["cache"])[-1].argmax()))
        state["prefill"].append(time.perf_counter() - t)
        state["cpu0"] = state["cpu1"] = time.process_time()
        state["n"] = 0
        return tok

    def step(tok):
        tok = int(to_host(model.forward([tok], state["cache"])[-1].argmax()))
        state["peak"] = max(state["peak"], private_memory() - mem0)
        state["cpu1"], state["n"] = time.process_time(), state["n"] + 1
        return tok

    med, rates = _decode_rate(step, first, n_tokens, runs)
    n_params = sum(a.size for a in [model.tok_embeddings, model.output]) + sum(
        a.size for lw in model.layers for a in lw.values())
    print(f"model: {model_dir} ({n_params / 1e6:.2f} M parameters, L={c.n_layers} D={c.dim} H={c.n_heads} "
          f"Hkv={c.n_kv_heads} W={c.sliding_window} V={c.vocab_size}), {dtype} on {model.device}")
    print(f"minispec decode: {med:.1f} tokens/s (median of {runs} runs of {n_tokens - 1} timed tokens; "
          f"runs {', '.join(f'{r:.0f}' for r in rates)})")
    # the weight-streaming limit: each token reads every weight once (embedding row aside)
    bytes_per_token = model.weight_bytes()
    bw = statistics.median(state["bw"])
    print(f"  weights ({model.weights}): loaded in {load_s:.2f} s; private memory (RssAnon) +{mem_load / 1e9:.3f} GB "
          f"after load, peak +{state['peak'] / 1e9:.3f} GB while decoding")
    print(f"  prefill: {prompt_len / statistics.median(state['prefill']):.1f} tokens/s ({prompt_len} tokens)")
    print(f"  weights read per token: {bytes_per_token / 1e6:.1f} MB -> {med * bytes_per_token / 1e9:.2f} GB/s achieved; "
          f"memory read bandwidth measured here (interleaved): {bw / 1e9:.2f} GB/s")
    cpu = (state["cpu1"] - state["cpu0"]) / max(state["n"], 1)
    print(f"  {1 / med:.3f} s per token = {(1 / med) / (bytes_per_token / bw):.2f}x the "
          f"bandwidth limit ({bytes_per_token / bw:.3f} s to read the weights once); CPU time of this process "
          f"{cpu:.3f} s per token (all threads; wall < CPU/threads means the cores were shared)")
    if not compare_hf:
        return {"minispec": med}
    try:
        import torch
        from transformers import MistralForCausalLM
    except ImportError:
        print("HF transformers: not installed (pip install 'minispec[reference]' to compare)")
        return {"minispec": med}
    try:
        hf = MistralForCausalLM.from_pretrained(model_dir, torch_dtype=getattr(torch, dtype),
                                                attn_implementation="eager").eval()
    except Exception as e:
        print(f"HF transformers: cannot load {model_dir} ({type(e).__name__}: {str(e)[:120]})")
        return {"minispec": med}
    hstate = {}

    @torch.no_grad()
    def hf_first(_):
        out = hf(torch.as_tensor(prompt)[None], use_cache=True)
        hstate["past"] = out.past_key_values
        return int(out.logits[0, -1].argmax())

    @torch.no_grad()
    def hf_step(tok):
        out = hf(torch.tensor([[tok]]), past_key_values=hstate["past"], use_cache=True)
        hstate["past"] = out.past_key_values
        return int(out.logits[0, -1].argmax())

    hmed, hrates = _decode_rate(hf_step, hf_first, n_tokens, runs)
    print(f"HF transformers {__import__('transformers').__version__} (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, eager) decode: {hmed:.1f} tokens/s "
          f"(runs {', '.join(f'{r:.0f}' for r in hrates)})")
    print(f"ratio minispec / HF: {med / hmed:.2f}x")
    return {"minispec": med, "hf": hmed}


# ---------------------------------------------------------------------------------------------------------
# Speculative decoding: tau, tokens/s and wall speedup vs AR in one run; the verify cost curve c(T)
# ---------------------------------------------------------------------------------------------------------
def heldout_prompts(model_dir, tok, n_prompts=8, prompt_tokens=48):
    """Prompts cut from the shipped held-out files (heldout_sample.txt next to the weights): each starts at
    a line start and holds ~prompt_tokens tokens. Falls back to a fixed code prompt where there is no sample."""
    from pathlib import Path
    sample = Path(model_dir) / "heldout_sample.txt"
    if not sample.exists():
        return [tok.encode("def quicksort(arr):\n")] * n_prompts
    lines = sample.read_text(encoding="utf-8").replace("\0", "").split("\n")
    prompts, step = [], max(1, len(lines) // n_prompts)
    for i in range(n_prompts):
        ids, j = [tok.bos_id], i * step
        while len(ids) < prompt_tokens and j < len(lines):
            ids += tok.encode(lines[j] + "\n", bos=False)
            j += 1
        prompts.append(ids[:prompt_tokens])
    return prompts


def cost_curve(model, sizes=(1, 2, 4, 8, 16, 32, 64), reps=15, context=200):
    """c(T) = time of one block forward of T tokens / time for 1 token, against a cache holding `context`
    tokens (median of reps). Speculation pays only where c(T) stays well under the accepted tokens per step."""
    cache = model.new_cache()
    model.forward(np.arange(context) % model.config.vocab_size, cache)
    times = {}
    for T in sizes:
        ids = np.arange(T) % model.config.vocab_size
        model.forward_block(ids, cache)                         # warm-up
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            out = model.forward_block(ids, cache)
            to_host(out.logits[-1, :1])                         # wait for the device
            ts.append(time.perf_counter() - t0)
        times[T] = statistics.median(ts)
    return {T: times[T] / times[1] for T in sizes}, times[1]


def heads_cost(model, heads, t1, top_k=3, reps=20):
    """Median time of one Medusa proposal (all heads' top-k on one hidden state), in units of t1 (one AR step)."""
    hidden = model.forward([1], model.new_cache(), return_hidden=True)[1][0]
    heads.topk(hidden, top_k)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        heads.topk(hidden, top_k)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) / t1


def pick_budget(accuracies, costs, proposal_cost=0.0):
    """The tree budget (nodes besides the root) maximising the expected speedup over AR on this backend,
    tau(budget) / (c(budget + 1) + proposal_cost), with c interpolated between measured sizes and
    proposal_cost the drafting time per step in units of one AR step. Returns (budget, expected speedup)."""
    from .tree import build_tree
    sizes = sorted(costs)
    best = (0.0, 0)
    for budget in range(1, sizes[-1]):
        _, tau = build_tree(accuracies, budget)
        c = float(np.interp(budget + 1, sizes, [costs[s] for s in sizes]))
        best = max(best, (tau / (c + proposal_cost), budget))
    return best[1], best[0]


def bench_decode(model_dir, decoders=("ar", "medusa"), n_tokens=128, n_prompts=8, runs=2, device="auto",
                 dtype="float32"):
    from .generate import generate
    from .tokenizer import Tokenizer
    print("environment:", environment())
    model = load(model_dir, dtype=dtype, device=device)
    tok = Tokenizer.from_dir(model_dir)
    prompts = heldout_prompts(model_dir, tok, n_prompts)
    print(f"model {model_dir} on {model.device} ({dtype}); {len(prompts)} held-out prompts of {len(prompts[0])} "
          f"tokens, {n_tokens} new tokens each, greedy; median of {runs} interleaved runs after a warm-up")
    for name in decoders:
        generate(model, prompts[0], decoder=name, max_new_tokens=16)        # warm-up (loads heads, trees)
    # runs interleave the decoders (prompt by prompt), so that a slow phase of a shared machine hits all alike
    times = {name: [0.0] * runs for name in decoders}
    outs = {name: [] for name in decoders}
    stats = {name: [] for name in decoders}
    for r in range(runs):
        for p in prompts:
            for name in decoders:
                o = generate(model, p, decoder=name, max_new_tokens=n_tokens, eos_id=None)
                times[name][r] += o.stats.decode_time
                if r == 0:
                    outs[name].append(o.tokens)
                    stats[name].append(o.stats)
    results, results_tau = {}, {}
    for name in decoders:
        new = sum(s.new_tokens for s in stats[name])
        steps = sum(s.steps for s in stats[name])
        hist = np.zeros(max(len(s.histogram) for s in stats[name]), np.int64)
        for s in stats[name]:
            hist[:len(s.histogram)] += s.histogram
        results[name] = statistics.median(new / t for t in times[name])
        results_tau[name] = new / steps
        same = outs[name] == outs[decoders[0]]
        print(f"{name:>8}: {results[name]:7.1f} tokens/s  tau = {results_tau[name]:.2f} tokens/step  "
              f"speedup vs {decoders[0]} {results[name] / results[decoders[0]]:.2f}x  "
              f"identical output: {'yes' if same else 'NO'}  histogram (tokens/step: steps) "
              f"{ {i: int(c) for i, c in enumerate(hist) if c} }")
    costs, t1 = cost_curve(model)
    print(f"verify cost curve on {model.device}: c(T) = time(T tokens) / time(1 token = {t1 * 1e3:.2f} ms): "
          + ", ".join(f"c({T})={c:.2f}" for T, c in costs.items()))
    if "medusa" in decoders:
        from .medusa import load_heads
        from pathlib import Path
        heads = load_heads(Path(model_dir) / "medusa", model)
        if heads.accuracies is not None:
            acc = np.asarray(heads.accuracies)
            expected = 1 + sum(np.prod([acc[d][r] for d, r in enumerate(path)]) for path in heads.choices)
            measured = results_tau.get("medusa")
            print(f"medusa tree of {len(heads.choices)} nodes: expected tau {expected:.2f} (from the heads' held-out "
                  f"top-k accuracies, assumed independent) vs measured {measured:.2f}")
            proposal = heads_cost(model, heads, t1)
            budget, ratio = pick_budget(np.asarray(heads.accuracies), costs, proposal)
            print(f"medusa heads cost {proposal:.2f} AR steps per step; the tree budget maximising the expected "
                  f"speedup tau / (c(budget + 1) + heads) here is {budget} nodes (expected {ratio:.2f}x); the "
                  f"shipped tree has {len(heads.choices)} nodes")
    return results, costs
