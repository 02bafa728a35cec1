"""The skip-set search: its encoding, its objectives on hand-checkable cases, resumability, the baselines."""
import json
import sys

import numpy as np
import pytest

from conftest import random_tensors, tiny_config
from minispec.decoders.draft_verify import SkipSet
from minispec.mistral.model import Model
from minispec.training.skip_objective import (Calibration, CostModel, PredictedObjective, calibrate, chain_steps, chain_tau, cost_rule_rate, depth_acceptance, free_decisions, from_code, from_params, iid_tau, match_list, best_chain_speedup, search_space, to_code, to_params, to_vector)
from minispec.training.skip_search import Trace, best, best_so_far, bo_search, exhaustive_search, random_search

L = 3


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config(n_layers=L, sliding_window=32)
    return Model(cfg, random_tensors(cfg, seed=3), dtype="float64", device="cpu")


@pytest.fixture(scope="module")
def calib(model):
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, 61, size=5)) for _ in range(3)]
    return calibrate(model, prompts, n_new=10)


# ---- encoding ----------------------------------------------------------------------------------------------------
def test_the_decision_vector_lists_attention_of_every_layer_first_then_mlp_as_the_authors_x_variables():
    s = SkipSet.from_lists(6, attn=[1], mlp=[2])
    assert to_vector(s).tolist() == [0, 1, 0, 0, 0, 0] + [0, 0, 1, 0, 0, 0]
    assert to_code(s) == 2 ** 1 + 2 ** (6 + 2)
    assert {k for k, v in to_params(s).items() if v == 1.0} == {"x1", "x8"}


def test_every_code_round_trips_through_a_skip_set_and_the_bo_parameters():
    for code in range(2 ** 12):
        s = from_code(code, 6)
        assert to_code(s) == code
        assert from_params(to_params(s), 6) == s
    # BO proposes continuous points: a decision is skipped above 0.5, as in the authors' searching.py
    assert from_params({"x0": 0.51, "x1": 0.5, "x6": 0.9}, 6) == SkipSet.from_lists(6, attn=[0], mlp=[0])


def test_keeping_the_ends_leaves_2_to_the_2L_minus_4_sets_none_touching_the_first_or_last_layer():
    space = search_space(6, keep_ends=True)
    assert len(space) == 2 ** 8 == len(set(space))
    for code in space:
        s = from_code(code, 6)
        assert not (s.attn[0] or s.mlp[0] or s.attn[5] or s.mlp[5])
    assert sorted(search_space(6, keep_ends=False)) == list(range(4096))
    assert free_decisions(3, keep_ends=True).tolist() == [False, True, False, False, True, False]


# ---- the objective -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("context", ["committed", "own"])
def test_skipping_nothing_reproduces_every_greedy_token(model, calib, context):
    m = match_list(model, calib, SkipSet.none(L), context)
    assert [len(x) for x in m] == [10, 10, 10]
    assert all(x.all() for x in m)


@pytest.mark.parametrize("context", ["committed", "own"])
def test_with_every_sublayer_skipped_the_draft_predicts_from_the_token_embedding_alone(model, calib, context):
    # independent reference: logits = output . rms_norm(embed[token]) (no layer runs), written out here
    c = model.config
    skip_all = SkipSet((True,) * L, (True,) * L)
    got = match_list(model, calib, skip_all, context)
    for seq, s, m in zip(calib.sequences, calib.starts, got):
        e = model.tok_embeddings[np.asarray(seq[s - 1:-1])]                                # [n, D]
        h = e / np.sqrt((e ** 2).mean(-1, keepdims=True) + c.norm_eps) * model.norm
        want = (h @ model.output).argmax(-1) == np.asarray(seq[s:])
        assert m.tolist() == want.tolist()
    assert np.mean(np.concatenate(got)) < 1.0          # and on this model it is worse than the full model


def test_the_committed_context_match_is_what_the_first_draft_token_after_each_commit_predicts(model, calib):
    # independent path: the draft's own one-token forward_block after the full model committed tokens 0..t-1
    skip = SkipSet.from_lists(L, attn=[1], mlp=[0, 2])
    got = match_list(model, calib, skip, "committed")
    for seq, s, m in zip(calib.sequences, calib.starts, got):
        want = []
        for t in range(s - 1, len(seq) - 1):
            cache = model.new_cache()
            model.forward(seq[:t], cache)
            logits = model.forward_block([seq[t]], cache, skip=skip).logits[0]
            want.append(int(logits.argmax()) == seq[t + 1])
        assert m.tolist() == want


def test_chain_drafting_is_simulated_on_the_match_sequence_as_worked_by_hand():
    m = [1, 1, 0, 1, 1, 1, 0]
    # k=2: [1 1]+bonus(token 2) | [1 1]+bonus(token 5) | []+bonus(token 6): 7 tokens in 3 steps
    assert chain_steps(m, 2) == (7, 3)
    # k=8: [1 1]+bonus | [1 1 1]+bonus: 7 tokens in 2 steps
    assert chain_steps(m, 8) == (7, 2)
    assert chain_steps([0, 0, 0], 4) == (3, 3)                  # nothing accepted: plain decoding
    assert chain_tau([m, [0, 0, 0]], 2) == (7 + 3) / (3 + 3)


def test_simulated_tau_of_independent_matches_follows_the_geometric_formula():
    rng = np.random.default_rng(1)
    for alpha, k in [(0.3, 2), (0.7, 3), (0.9, 6)]:
        m = rng.random(400_000) < alpha
        assert chain_tau([m], k) == pytest.approx(iid_tau(alpha, k), rel=0.01)
    assert iid_tau(1.0, 4) == 5.0


def test_per_depth_acceptance_counts_every_window_of_the_match_sequence_as_worked_by_hand():
    m = [1, 1, 0, 1, 1, 1, 0]
    # depth 1: 5 of the 7 tokens match. depth 2: windows j = 0..5 whose first token matches: j = 0, 1, 3, 4, 5;
    # their second matches at j = 0, 3, 4. depth 3: j = 0..4 with two matches first: j = 0, 3, 4; a third at j = 3
    # only. depth 4: j = 0..3 with three first: j = 3; token 6 does not match. depth 5: no window of 4 matches, so
    # the depth before it (0) is kept
    assert depth_acceptance([m], 5) == pytest.approx([5 / 7, 3 / 5, 1 / 3, 0.0, 0.0])
    # a second sequence adds its windows: [0, 0, 0] adds 3 tokens to depth 1 and reaches no depth 2; a 1-token
    # sequence has no window of 2
    assert depth_acceptance([m, [0, 0, 0], [1]], 3) == pytest.approx([6 / 11, 3 / 5, 1 / 3])
    # independent matches of probability alpha: alpha at every depth
    rng = np.random.default_rng(2)
    assert depth_acceptance([rng.random(200_000) < 0.7], 4) == pytest.approx([0.7] * 4, abs=0.01)


def test_the_cost_rule_picks_the_draft_length_with_the_most_tokens_per_unit_time_as_worked_by_hand():
    costs = {1: 1.0, 2: 1.2, 3: 1.5}
    # acc [0.9, 0.5], r = 0.1: K = 0: 1 / 1; K = 1: 1.9 / (1.2 + 0.1) = 1.46; K = 2: 2.35 / (1.5 + 0.2) = 1.38
    K, rate = cost_rule_rate([0.9, 0.5], 0.1, costs, max_len=2)
    assert K == 1 and rate == pytest.approx(1.9 / 1.3)
    # r = 0.9: K = 1: 1.9 / 2.1 = 0.90 < 1, K = 2: 2.35 / 3.3: plain decoding wins
    assert cost_rule_rate([0.9, 0.5], 0.9, costs, max_len=2) == (0, 1.0)
    # one draft token breaks even at acceptance c(2) + r - 1 = 0.3 (a tie goes to plain decoding), pays above it
    assert cost_rule_rate([0.3], 0.1, costs, max_len=1)[0] == 0
    K, rate = cost_rule_rate([0.31], 0.1, costs, max_len=1)
    assert K == 1 and rate == pytest.approx(1.31 / 1.3)


def test_the_predicted_speedup_is_tau_over_draft_plus_verify_cost_at_the_best_draft_length():
    # every token matches: tau_k = k + 1 exactly (20 tokens: k = 4 -> 4 steps of 5); S_k = (k+1) / (0.5 k + 1)
    r = best_chain_speedup([np.ones(20, bool)], draft_cost=0.5, verify_cost=lambda T: 1.0, k_max=4)
    assert (r["k"], r["tau"], r["alpha"]) == (4, 5.0, 1.0)
    assert r["speedup"] == pytest.approx(5 / (4 * 0.5 + 1))
    # a steep verify cost curve makes one draft token the best choice
    r = best_chain_speedup([np.ones(20, bool)], draft_cost=0.5, verify_cost=lambda T: T, k_max=4)
    assert r["k"] == 1 and r["speedup"] == pytest.approx(2 / (0.5 + 2))


def test_the_draft_cost_counts_the_sublayers_that_still_run():
    c = CostModel(2, base=1.0, attn=2.0, mlp=3.0, curve={1: 1.0, 4: 2.5})
    assert c.full == 11.0
    assert c.draft(SkipSet.none(2)) == 1.0
    assert c.draft(SkipSet.from_lists(2, attn=[0], mlp=[0, 1])) == pytest.approx((1 + 2) / 11)
    assert c.verify(2) == pytest.approx(1.5)                    # interpolated between measured sizes
    assert CostModel.from_json(json.loads(json.dumps(c.to_json()))) == c


# ---- the searches ------------------------------------------------------------------------------------------------
def fake_objective(skip):
    """Deterministic and cheap, with one best set: agreement with a target pattern, minus a cost per kept one."""
    target = np.array([0, 1, 1, 0, 1, 0], bool)
    x = to_vector(skip)
    return dict(value=float((x == target).sum()) + 0.01 * x.sum())


def test_random_search_spends_its_budget_on_distinct_sets_of_the_space():
    ev = random_search(fake_objective, L, budget=10, seed=4, keep_ends=False)
    codes = [e["code"] for e in ev]
    assert len(codes) == 10 == len(set(codes))
    assert codes == list(np.random.default_rng(4).permutation(64)[:10])      # the seeded order, no repeats
    assert \
        {e["code"] for e in random_search(fake_objective, L, 100, seed=4)} == set(search_space(L, keep_ends=True))
    assert len(random_search(fake_objective, L, budget=100, seed=4, keep_ends=True)) == 4     # a space of 4


def test_exhaustive_search_finds_the_best_set_of_the_whole_space():
    ev = exhaustive_search(fake_objective, L)
    assert sorted(e["code"] for e in ev) == list(range(64))
    # single sublayers first, then the sets keeping the first and last layers: a partial run holds them whole
    assert [e["code"] for e in ev[:8]] == [1, 2, 4, 8, 16, 32, 0, 2 ** 1 + 2 ** 4]
    assert from_code(best(ev)["code"], L) == from_code(0b010110, L)
    assert best_so_far(ev)[-1] == max(fake_objective(from_code(c, L))["value"] for c in range(64))


@pytest.mark.parametrize("method", ["random", "bo"])
def test_a_resumed_search_continues_exactly_as_the_uninterrupted_one(tmp_path, method):
    if method == "bo":
        pytest.importorskip("bayes_opt")
    search = {"random": random_search, "bo": bo_search}[method]
    kw = dict(seed=2, keep_ends=False, **({"init_points": 3} if method == "bo" else {}))
    whole = search(fake_objective, L, 8, **kw)

    path = str(tmp_path / "trace.json")
    trace = Trace.open(path, {"n_layers": L})
    settings = {"method": method}
    done = search(fake_objective, L, 4, evaluations=trace.evaluations("run", settings),
                  save=lambda ev: trace.store("run", ev), **kw)
    trace.store("run", done)
    again = Trace.open(path, lambda: pytest.fail("a resumed trace must not rebuild its header"))
    resumed = search(fake_objective, L, 8, evaluations=again.evaluations("run", settings), **kw)
    assert resumed == whole
    with pytest.raises(ValueError, match="made with"):
        again.evaluations("run", {"method": "other"})


def test_bo_spends_its_budget_on_distinct_sets_and_reuses_known_values_for_duplicates():
    pytest.importorskip("bayes_opt")
    ev = bo_search(fake_objective, L, 8, seed=0, keep_ends=False, init_points=3)
    distinct = [e for e in ev if not e.get("duplicate")]
    assert len(distinct) == 8 == len({e["code"] for e in distinct})
    assert all(e["value"] == fake_objective(from_code(e["code"], L))["value"] for e in ev)


def test_bo_without_the_optional_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "bayes_opt", None)
    with pytest.raises(ImportError, match=r"pip install 'minispec\[search\]'"):
        bo_search(fake_objective, L, 10, seed=0, keep_ends=False)


def test_a_draft_that_is_the_full_model_gains_nothing_and_a_free_draft_gains_its_tau(model, calib):
    # c(T) = 1 and the cost is all in the sublayers: the unskipped draft costs one step per token, so every
    # draft length gives S_k = (k + 1) / (k + 1) = 1; skipping everything costs nothing, so S_k = tau_k
    obj = PredictedObjective(model, calib, CostModel(L, 0.0, 1.0, 1.0, {1: 1.0, 64: 1.0}), k_max=4)
    none = obj(SkipSet.none(L))
    assert none["match"] == 1.0 and none["value"] == pytest.approx(1.0)
    skip_all = SkipSet((True,) * L, (True,) * L)
    m = match_list(model, calib, skip_all)
    assert obj(skip_all)["value"] == pytest.approx(max(chain_tau(m, k) for k in range(1, 5)))
    assert Calibration.from_json(json.loads(json.dumps(calib.to_json()))) == calib


def test_the_depth_first_walk_over_every_set_gives_each_sets_own_matches(model, calib):
    from minispec.training.skip_objective import all_match_lists
    every = all_match_lists(model, calib)
    assert sorted(every) == list(range(4 ** L))
    for code in [0, 1, 5, 18, 33, 63, 4 ** L - 1] + list(range(0, 64, 7)):
        want = match_list(model, calib, from_code(code, L))
        assert [m.tolist() for m in every[code]] == [m.tolist() for m in want], code


def test_the_predicted_objective_is_the_same_precomputed_or_set_by_set(model, calib):
    costs = CostModel(L, 0.2, 0.3, 0.5, {1: 1.0, 2: 1.3, 9: 2.0})
    lazy, eager = PredictedObjective(model, calib, costs), PredictedObjective(model, calib, costs)
    eager.precompute()
    for code in [0, 9, 27, 40, 63]:
        assert lazy(from_code(code, L)) == eager(from_code(code, L))


def test_the_chosen_set_can_be_required_to_reach_a_match_rate():
    ev = [dict(code=1, value=1.2, match=0.7), dict(code=2, value=1.0, match=0.95),
          dict(code=3, value=1.1, match=0.91), dict(code=4, value=9.0, match=0.99, duplicate=True)]
    assert best(ev)["code"] == 1
    assert best(ev, min_match=0.9)["code"] == 3
    with pytest.raises(ValueError, match="0.999"):
        best(ev, min_match=0.999)


def test_a_broken_trace_file_is_refused_naming_its_line_and_saying_to_delete_it(tmp_path):
    from minispec.errors import UserError
    path = tmp_path / "trace.json"
    path.write_text('{"format": 1,\n "runs": }\n')
    with pytest.raises(UserError, match=r"trace\.json, line 2, column 10: invalid JSON .*delete it"):
        Trace.open(str(path), {"n_layers": 2})
    path.write_text("[1, 2]\n")                         # valid JSON, but not a trace
    with pytest.raises(UserError, match=r"trace\.json: must hold a JSON object"):
        Trace.open(str(path), {"n_layers": 2})


def test_a_new_search_fits_the_cost_model_once_and_records_it_in_the_trace(model, tmp_path):
    """run_search on a trace that does not exist yet: the calibration and the sublayer cost model (fit_cost_model,
    with its verify cost curve) are measured and stored in the trace's header, then the runs are recorded."""
    from minispec.training.skip_search import run_search
    prompts = [[1, 5, 9, 2, 7, 3, 8, 4], [2, 6, 1, 9, 3, 7, 5, 8]]
    trace = run_search(model, str(tmp_path / "trace.json"), methods=("random",), budget=3, prompts=prompts, n_new=6,
                       progress=False, log=lambda *a: None)
    cm = CostModel.from_json(json.loads((tmp_path / "trace.json").read_text())["cost_model"])
    assert cm.n_layers == model.config.n_layers and min(cm.base, cm.attn, cm.mlp) >= 0
    assert cm.curve[1] == 1.0 and len(cm.curve) > 1
    assert len(trace.evaluations("random/predicted", trace.data["runs"]["random/predicted"]["settings"])) == 3
