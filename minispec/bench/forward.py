"""`minispec bench forward` (docs/design.md, "Benchmarks").

`bench_forward`: plain greedy decoding, tokens/s on generated tokens only — the prompt is prefilled, the timer
starts after the first new token, the median of `runs` runs after a warm-up run is reported — and, where torch
and transformers are installed, HF transformers' MistralForCausalLM decoding the same weights the same way in the
same process, with the ratio. The environment (CPU, BLAS, threads, versions) is printed first.
"""
import os
import platform
import statistics
import threading
import time

import numpy as np

from ..backend import to_host
from ..decoders.registry import parse_setups
from ..errors import UserError, check_int
from ..mistral.model import load, proc_bytes
from ..speculative.costs import cost_curve


def environment():
    cpu = platform.processor() or "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
               if k in os.environ}
    blas = "?"
    try:
        cfg = np.show_config(mode="dicts")
        blas = cfg["Build Dependencies"]["blas"]["name"]
    except Exception:
        pass
    return (f"python {platform.python_version()}, numpy {np.__version__} ({blas}), {os.cpu_count()} cpus: {cpu}, "
            f"threads env {threads or 'unset'}")


def _decode_rate(step, first, n_tokens, runs, after=None):
    """Median tokens/s of `runs` timed runs after one warm-up; step(token) -> next token; timer after token 1.
    after(r), if given, runs when run r's timer has stopped (what is sampled there is not timed)."""
    rates = []
    for r in range(runs + 1):
        tok = first(r)
        t0 = time.perf_counter()
        for _ in range(n_tokens - 1):
            tok = step(tok)
        dt = time.perf_counter() - t0
        if after is not None:
            after(r)
        if r > 0:
            rates.append((n_tokens - 1) / dt)
    return statistics.median(rates), rates


def check_bench(n_tokens, runs, n_prompts=1, decoders=("ar",)):
    """The bench options that would measure nothing: a rate needs >= 2 tokens (the timer starts after the
    first), >= 1 timed run, >= 1 prompt, and registered decoders (the first is the baseline), each a name with
    options the decoder takes, NAME[:KEY=VALUE]... (minispec.decoders.registry.parse_setup), none twice."""
    check_int("n_tokens", n_tokens, low=2, what=" (the timer starts after the first token)")
    check_int("runs", runs, low=1)
    check_int("n_prompts", n_prompts, low=1)
    if isinstance(decoders, str) or not decoders or not all(decoders):
        raise UserError(f"decoders must be a non-empty list of decoder names (the first is the baseline), "
                        f"got {decoders!r}")
    parse_setups(decoders)


def private_memory():
    """Resident anonymous memory of this process in bytes (RssAnon: not counting mapped files), 0 without /proc."""
    return proc_bytes("/proc/self/status", "RssAnon") or 0


def memory_bandwidth(mb=512, reps=3, threads=1):
    """This machine's DRAM read bandwidth in bytes/s: the best of `reps` sums over a `mb` MB array (far larger
    than the caches), split over `threads` threads (np.add.reduce releases the GIL), i.e. the speed at which a
    decode step could at best stream its weights. One core need not saturate the memory, so `bench forward`
    measures with one thread and with all (docs/real_mistral.md lists what it printed)."""
    a = np.ones(mb << 17, np.uint64)                                # mb MB
    parts = np.array_split(a, threads)

    def read():
        workers = [threading.Thread(target=np.add.reduce, args=(p,)) for p in parts[1:]]
        for w in workers:
            w.start()
        np.add.reduce(parts[0])
        for w in workers:
            w.join()

    best = min(_timed(read) for _ in range(reps))
    return a.nbytes / best


def _timed(f):
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def bench_forward(model_dir, n_tokens=64, runs=5, device="auto", dtype="float32", compare_hf=True, prompt_len=16,
                  weights="auto"):
    check_bench(n_tokens, runs)
    print("environment:", environment())
    mem0, t0 = private_memory(), time.perf_counter()
    model = load(model_dir, dtype=dtype, device=device, weights=weights)
    load_s, mem_load = time.perf_counter() - t0, private_memory() - mem0
    c = model.config
    prompt = (np.arange(prompt_len) * 7 + 1) % c.vocab_size
    state = {"peak": mem_load, "prefill": [], "bw": [], "bw_all": []}

    def first(_):
        state["bw"].append(memory_bandwidth())                      # interleaved with the decode runs
        state["bw_all"].append(memory_bandwidth(threads=os.cpu_count() or 1))
        state["cache"] = model.new_cache()
        t = time.perf_counter()
        tok = int(to_host(model.forward(prompt, state["cache"])[-1].argmax()))
        state["prefill"].append(time.perf_counter() - t)
        state["cpu0"] = time.process_time()
        return tok

    def step(tok):
        return int(to_host(model.forward([tok], state["cache"])[-1].argmax()))

    def after(_):   # outside the timer (a /proc read is a system call, not decoding); the cache only grows in a run
        state["peak"] = max(state["peak"], private_memory() - mem0)
        state["cpu"] = (time.process_time() - state["cpu0"]) / (n_tokens - 1)

    med, rates = _decode_rate(step, first, n_tokens, runs, after)
    n_params = sum(a.size for a in [model.tok_embeddings, model.output]) + sum(
        a.size for lw in model.layers for a in lw.values())
    print(f"model: {model_dir} ({n_params / 1e6:.2f} M parameters, L={c.n_layers} D={c.dim} H={c.n_heads} "
          f"Hkv={c.n_kv_heads} W={c.sliding_window} V={c.vocab_size}), {dtype} on {model.device}")
    print(f"minispec decode: {med:.3g} tokens/s (median of {runs} runs of {n_tokens - 1} timed tokens; "
          f"runs {', '.join(f'{r:.3g}' for r in rates)})")
    # the weight-streaming limit: each token reads every weight once (embedding row aside)
    bytes_per_token = model.weight_bytes()
    bw, bw_all = statistics.median(state["bw"]), statistics.median(state["bw_all"])
    print(f"  weights ({model.storage}): loaded in {load_s:.2f} s; private memory (RssAnon) +{mem_load / 1e9:.3f} GB "
          f"after load, peak +{state['peak'] / 1e9:.3f} GB while decoding")
    print(f"  prefill: {prompt_len / statistics.median(state['prefill']):.1f} tokens/s ({prompt_len} tokens)")
    print(f"  weights read per token: {bytes_per_token / 1e6:.1f} MB -> {med * bytes_per_token / 1e9:.2f} GB/s "
          f"achieved; memory read bandwidth measured here (interleaved): {bw / 1e9:.2f} GB/s on one core, "
          f"{bw_all / 1e9:.2f} GB/s on all {os.cpu_count()}")
    cpu = state["cpu"]                                              # of the last run
    print(f"  {1 / med:.3f} s per token = {(1 / med) / (bytes_per_token / bw):.2f}x the one-core "
          f"bandwidth limit ({bytes_per_token / bw:.3f} s to read the weights once), "
          f"{(1 / med) / (bytes_per_token / bw_all):.2f}x the all-core limit ({bytes_per_token / bw_all:.3f} s); "
          f"CPU time of this process {cpu:.3f} s per token (all threads; wall < CPU/threads means the cores were "
          f"shared)")
    # what verifying T drafted tokens costs in decode steps: where speculation can pay on this machine
    reps = 3 if model.storage == "mapped" else 15
    costs, t1 = cost_curve(model, sizes=(1, 2, 4, 8), reps=reps, context=prompt_len)
    print(f"  verify cost curve c(T) = time(T tokens) / time(1 token = {t1 * 1e3:.1f} ms), medians of wall time over "
          f"{reps} interleaved rounds against {prompt_len} cached tokens (a quick look, not the canonical CPU-time "
          f"curve of `bench decode`): " + ", ".join(f"c({T})={v:.2f}" for T, v in costs.items() if T > 1))
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
