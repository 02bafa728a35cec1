"""The shared training pieces beyond the backward passes: batched self-distillation equals one-prompt-at-a-time
generation, AdamW's decoupled decay by hand, and Hydra++'s input dropout (its gradient against finite differences
of the same masked loss, and a resumed run with dropout and decay equal to an uninterrupted one)."""
import numpy as np
import pytest

from conftest import numgrad, random_tensors, tiny_config
from test_train_hydra import tiny_setup

from minispec.mistral.model import Model
from minispec.training.data import self_distilled_sequences
from minispec.training.optim import Adam
from minispec.training.train_hydra import HydraTrainConfig, batch_loss, param_dict, train


def test_batched_self_distillation_gives_the_sequences_of_one_prompt_at_a_time_generation():
    cfg = tiny_config(sliding_window=16, vocab_size=23)
    model = Model(cfg, random_tensors(cfg, seed=3), dtype="float64", device="cpu")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 23, 4).tolist() for _ in range(5)] + [rng.integers(3, 23, 3).tolist()]
    one = self_distilled_sequences(model, prompts, gen_len=9, eos_id=None, n_tokens=70)
    eos = one[0][0][6]                        # a token the model does generate: the stopping rule is exercised
    one = self_distilled_sequences(model, prompts, gen_len=9, eos_id=eos, n_tokens=70)
    many = self_distilled_sequences(model, prompts, gen_len=9, eos_id=eos, n_tokens=70, batch=4)
    assert many == one
    assert any(len(s) < len(p) + 9 for (s, _), p in zip(one, prompts))     # some stopped at eos or at n_tokens


def test_adamw_decays_the_weights_before_the_adam_step_by_hand():
    p = {"w": np.array([2.0, -1.0])}
    g = {"w": np.array([0.5, -4.0])}
    adam = Adam(p, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    adam.step(g, lr=0.01)
    # step 1: m_hat = g, v_hat = g^2, so p <- p (1 - lr wd) - lr g / (|g| + eps)
    expected = np.array([2.0, -1.0]) * (1 - 0.01 * 0.1) - 0.01 * np.array([0.5, -4.0]) / (np.array([0.5, 4.0]) + 1e-8)
    assert np.allclose(p["w"], expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("kind", ["hydra", "hydra++"])
def test_dropout_gradients_equal_finite_differences_of_the_same_masked_loss(kind):
    model, heads, data, seqs = tiny_setup(kind)
    cfg = HydraTrainConfig(lm_weight=1.0, teacher_weight=0.5, dropout=0.3)
    rows = np.array([0, 2, 4, 10, 17]) if kind == "hydra" else None
    batch = [data["seqs"][0], data["seqs"][2]] if kind == "hydra++" else None
    run = lambda: batch_loss(heads, data, rows, batch, cfg, np.random.default_rng(11))    # noqa: E731
    loss, _, grads = run()
    assert abs(loss - batch_loss(heads, data, rows, batch, cfg)[0]) > 1e-6      # the mask does change the loss
    ref = lambda: run()[0]                                                       # noqa: E731
    rng = np.random.default_rng(7)
    for name, p in param_dict(heads).items():
        entries = [tuple(rng.integers(0, n) for n in p.shape) for _ in range(3)]
        g = numgrad(ref, p, 1e-6, entries)
        for idx in entries:
            assert abs(grads[name][idx] - g[idx]) < 1e-6 * max(1.0, abs(g[idx])), (name, idx)


def test_a_resumed_run_with_dropout_and_weight_decay_equals_the_uninterrupted_one(tmp_path):
    cfg = HydraTrainConfig(epochs=2, batch=9, lr=1e-2, teacher_weight=0.5, dropout=0.2, weight_decay=0.1, seed=2)
    _, heads_a, data, _ = tiny_setup("hydra++")
    hist_a = train(heads_a, data, cfg, progress=False)
    _, heads_b, data, _ = tiny_setup("hydra++")
    hist_b = train(heads_b, data, cfg, checkpoint=tmp_path / "ck", stop_after=len(hist_a) // 2 + 1, progress=False)
    _, heads_c, data, _ = tiny_setup("hydra++")
    hist_c = train(heads_c, data, cfg, checkpoint=tmp_path / "ck", progress=False)
    assert hist_b + hist_c == hist_a
    for name, a in param_dict(heads_a).items():
        assert np.array_equal(a, param_dict(heads_c)[name]), name
