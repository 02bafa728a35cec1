"""The same code on NumPy and CuPy: a CPU stand-in for CuPy's strictness, and the real thing where a GPU exists."""
import numpy as np
import pytest

from conftest import FIXTURES, rel_err, random_tensors, tiny_config
from hostguard import GUARD, GuardArray, HostConversionError
from minispec.backend import array_module, resolve_device, to_host
from minispec.mistral.model import Model, load


def test_the_host_guard_refuses_implicit_conversion_and_host_arrays_in_device_math():
    a = GUARD.zeros(3, dtype=np.float32)
    with pytest.raises(HostConversionError):
        np.asarray(a)
    with pytest.raises(HostConversionError):
        a + np.ones(3, dtype=np.float32)
    with pytest.raises(HostConversionError):
        a[np.array([0, 1])]
    assert isinstance(a + GUARD.ones(3, dtype=np.float32), GuardArray) and array_module(a) is GUARD


@pytest.mark.parametrize("window", [5, None])
def test_forward_decode_and_block_forward_run_on_a_strict_device_namespace(window):
    cfg = tiny_config(sliding_window=window, max_seq_len=64)
    t = random_tensors(cfg)
    guarded, plain = Model(cfg, t, device=GUARD), Model(cfg, t, device="cpu")
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, 23)
    one_shot = guarded.forward(ids)
    assert isinstance(one_shot, GuardArray)
    assert np.array_equal(to_host(one_shot), plain.forward(ids))
    cache = guarded.new_cache()
    steps = [to_host(guarded.forward(ids[:9], cache))] + [to_host(guarded.forward(ids[i:i + 1], cache)) for i in range(9, 23)]
    assert rel_err(np.concatenate(steps), plain.forward(ids)) < 1e-5
    out = guarded.forward_block(ids[:3], cache, depths=[0, 1, 1], parents_mask=np.array([[1, 0, 0], [1, 1, 0], [1, 0, 1]], bool))
    cache.commit([0, 2])
    assert isinstance(out.logits, GuardArray) and isinstance(out.hidden, GuardArray)


def test_cpu_device_is_numpy_and_unknown_devices_are_refused():
    assert resolve_device("cpu")[0] is np
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("tpu")


def _cupy_or_skip():
    xp, name = resolve_device("auto")
    if name != "cuda":
        pytest.skip("no CuPy with a usable CUDA device here")
    return xp


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gqa4_hd", "mqa_w6_v5cfg", "gqa2_nowin"])
def test_cupy_logits_equal_numpy_logits_on_the_fixtures(name):
    _cupy_or_skip()
    from minispec.mistral.weights import read_safetensors
    ids = np.array(read_safetensors(FIXTURES / name / "reference.safetensors")["ids"])
    for dtype, tol in (("float32", 1e-5), ("float64", 1e-12)):
        gpu, cpu = load(FIXTURES / name, dtype=dtype, device="cuda"), load(FIXTURES / name, dtype=dtype, device="cpu")
        assert rel_err(to_host(gpu.forward(ids)), cpu.forward(ids)) < tol
        cache = gpu.new_cache()
        steps = np.concatenate([to_host(gpu.forward(ids[i:i + 1], cache)) for i in range(len(ids))])
        assert rel_err(steps, cpu.forward(ids)) < tol * 10
