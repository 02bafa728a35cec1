"""One call on a GPU machine: CuPy vs NumPy logits on every fixture, the GPU tests, and decode timings: the
shipped model's speculative decoders against AR on the GPU (`bench decode --device cuda`, dynamic trees and
prompt lookup's chain in them included), and float16 decoding of a Mistral-7B-shaped checkpoint against the
bandwidth roofline.

    python tools/gpu_check.py            # prints a report; exit status 1 if any comparison fails
    python tools/gpu_check.py --no-7b    # skip the 7B-shaped part (it writes 14.5 GB to a temporary folder)

The 7B part builds the checkpoint on the GPU machine itself (tools/make_shaped_checkpoint.py --fast: nothing
large is copied there), loads it with dtype="float16" (bf16 -> fp16 on the device, with the overflow check),
times greedy decoding and prints tokens/s next to the roofline: the GPU's measured copy bandwidth divided by the
bytes of weights one token reads (14.5 GB fp16 + the float32 output layer). Budget: under 5 minutes in all.

Run it where CuPy and a CUDA device exist (the project's lent H200, through the `device` tool). It needs only
minispec's runtime dependencies plus cupy and pytest.
"""
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minispec import generate, load                         # noqa: E402
from minispec.backend import resolve_device, to_host       # noqa: E402
from minispec.mistral.weights import read_safetensors              # noqa: E402

sys.path.insert(0, str(ROOT / "tools"))
import make_shaped_checkpoint                               # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"


def rel_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def main():
    xp, name = resolve_device("auto")
    if name != "cuda":
        print("no usable CuPy + CUDA device here; nothing to check")
        return 1
    import cupy
    print("cupy", cupy.__version__, "device", cupy.cuda.runtime.getDeviceProperties(0)["name"].decode())
    ok = True
    for folder in sorted(p for p in FIXTURES.iterdir() if (p / "reference.safetensors").exists()):
        ref = read_safetensors(folder / "reference.safetensors")
        ids = np.array(ref["ids"])
        want = {}                                                   # NumPy's logits per dtype
        for dtype, tol in (("float32", 1e-5), ("float64", 1e-12)):
            gpu = load(folder, dtype=dtype, device="cuda")
            want[dtype] = load(folder, dtype=dtype, device="cpu").forward(ids)
            e_full = rel_err(to_host(gpu.forward(ids)), want[dtype])
            cache = gpu.new_cache()
            steps = np.concatenate([to_host(gpu.forward(ids[i:i + 1], cache)) for i in range(len(ids))])
            e_dec = rel_err(steps, want[dtype])
            good = e_full < tol and e_dec < 10 * tol
            ok &= good
            print(f"{folder.name:24s} {dtype}: cupy vs numpy one-shot {e_full:.1e}, decode {e_dec:.1e} "
                  f"{'ok' if good else 'FAIL'}")
        # float16 on the GPU against the NumPy float32 model, at the tolerance tests/test_mapped.py states
        g16 = load(folder, dtype="float16", device="cuda")
        e16 = rel_err(to_host(g16.forward(ids)), want["float32"])
        ok &= e16 < 2e-2
        print(f"{folder.name:24s} float16 (cupy) vs float32 (numpy): {e16:.1e} {'ok' if e16 < 2e-2 else 'FAIL'}")
    shipped = ROOT / "weights" / "stdlib-mistral"
    if (shipped / "config.json").exists():
        for device in ("cpu", "cuda"):
            m = load(shipped, device=device)
            generate(m, [1, 100], max_new_tokens=8)           # warm-up (kernel compilation on CuPy)
            t = []
            for _ in range(3):
                out = generate(m, [1, 100, 200], max_new_tokens=64, eos_id=None)
                t.append(out.stats.tokens_per_s)
            print(f"shipped model decode on {device}: {np.median(t):.1f} tokens/s (median of 3 x 64 tokens)")
        ok &= bench_decoders()
    if "--no-7b" not in sys.argv:
        ok &= check_7b()
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", str(ROOT / "tests"), "-x"], cwd=ROOT)
    print(f"pytest exit {r.returncode} in {time.time() - t0:.0f} s")
    return 0 if ok and r.returncode == 0 else 1


GPU_DECODERS = ("ar,medusa,hydra,hydra++,draft_verify,lookup,medusa:tree=dynamic:max_nodes=auto,"
                "hydra:tree=dynamic:max_nodes=auto,medusa:tree=dynamic:max_nodes=auto:lookup=8,"
                "hydra:tree=dynamic:max_nodes=auto:lookup=8,hydra++:tree=dynamic:max_nodes=auto:lookup=8")


def bench_decoders(decoders=GPU_DECODERS, n=64, prompts=4, runs=2):
    """Every decoder of the shipped model on the GPU against AR, with their GPU trees and the hardware-sized
    dynamic trees (prompt lookup's chain joined or not): `minispec bench decode --device cuda`, its report
    printed as it runs. On a GPU s(N) stays near 1, so the sized trees should grow large and the gates stay
    open (docs/costs.md)."""
    cmd = [sys.executable, "-m", "minispec", "bench", "decode", "--device", "cuda", "--decoders", decoders,
           "-n", str(n), "--prompts", str(prompts), "--runs", str(runs)]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT)
    print(f"bench decode on cuda: exit {r.returncode} in {time.time() - t0:.0f} s")
    return r.returncode == 0


def gpu_bandwidth(cupy, gb=4):
    """Device memory bandwidth in bytes/s: best of 5 device-to-device copies of `gb` GB (read + write counted)."""
    a = cupy.ones(gb << 28, cupy.float32)
    b = cupy.empty_like(a)
    best = 1e9
    for _ in range(5):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        cupy.copyto(b, a)
        end.record()
        end.synchronize()
        best = min(best, cupy.cuda.get_elapsed_time(start, end) / 1e3)
    del a, b
    return 2 * (gb << 30) / best


def check_7b(n_tokens=64):
    """Mistral-7B-shaped float16 decode on CuPy: tokens/s vs the roofline."""
    import tempfile
    import cupy
    bw = gpu_bandwidth(cupy)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        folder = make_shaped_checkpoint.make(Path(tmp) / "mistral7b-shaped", fast=True)
        t1 = time.time()
        m = load(folder, dtype="float16", device="cuda")
        t2 = time.time()
        print(f"7B-shaped checkpoint written in {t1 - t0:.0f} s, loaded as float16 on the GPU in {t2 - t1:.0f} s")
        prompt = list(range(1, 17))
        generate(m, prompt, max_new_tokens=8, eos_id=None)                  # warm-up (kernel compilation)
        rates = [generate(m, prompt, max_new_tokens=n_tokens, eos_id=None).stats.tokens_per_s for _ in range(3)]
        rate = float(np.median(rates))
        roof = bw / m.weight_bytes()
        print(f"7B-shaped float16 decode on cuda: {rate:.1f} tokens/s (median of 3 x {n_tokens}; runs "
              f"{', '.join(f'{r:.1f}' for r in rates)}); weights per token {m.weight_bytes() / 1e9:.2f} GB; "
              f"measured bandwidth {bw / 1e12:.2f} TB/s -> roofline {roof:.0f} tokens/s; {rate / roof:.0%} of it "
              f"(at the H200's 4.8 TB/s spec: {4.8e12 / m.weight_bytes():.0f} tokens/s)")
        logits = to_host(m.forward(prompt))
        good = bool(np.isfinite(logits).all())
        print(f"7B-shaped float16 logits finite: {'ok' if good else 'FAIL'}; load + decode took {time.time() - t1:.0f} s")
        del m
    return good


if __name__ == "__main__":
    sys.exit(main())
