"""One call on a GPU machine: CuPy vs NumPy logits on every fixture, the GPU tests, and decode timings.

    python tools/gpu_check.py            # prints a report; exit status 1 if any comparison fails

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
from minispec.weights import read_safetensors              # noqa: E402

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
        for dtype, tol in (("float32", 1e-5), ("float64", 1e-12)):
            cpu, gpu = load(folder, dtype=dtype, device="cpu"), load(folder, dtype=dtype, device="cuda")
            e_full = rel_err(to_host(gpu.forward(ids)), cpu.forward(ids))
            cache = gpu.new_cache()
            steps = np.concatenate([to_host(gpu.forward(ids[i:i + 1], cache)) for i in range(len(ids))])
            e_dec = rel_err(steps, cpu.forward(ids))
            good = e_full < tol and e_dec < 10 * tol
            ok &= good
            print(f"{folder.name:24s} {dtype}: cupy vs numpy one-shot {e_full:.1e}, decode {e_dec:.1e} "
                  f"{'ok' if good else 'FAIL'}")
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
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", str(ROOT / "tests"), "-x"], cwd=ROOT)
    print(f"pytest exit {r.returncode} in {time.time() - t0:.0f} s")
    return 0 if ok and r.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
