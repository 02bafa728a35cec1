"""Draft & Verify's last step (issue 18 part 2; docs/draft_and_verify.md, "The last step"): a step emits at most
K + 1 tokens (K drafted, one bonus), so when the request wants only `remaining` more tokens, drafting more than
remaining - 1 wastes draft forwards on tokens the token limit throws away. As the authors' decoding.py
(`step + step_draft + 2 >= max_new_tokens`), minispec then drafts at most remaining - 1; unlike it, none at all
when one token is left (the bonus alone is that token). The limit therefore never cuts an accepted path.

The loop tells a proposer what is left through ctx.left; the first tests set it themselves (a wrapper that
counts the emitted tokens), the last checks what the loop puts there.
"""
import numpy as np
import pytest

from minispec import generate
from minispec.decoders.draft_verify import DraftVerifyProposer, SkipSet
from minispec.speculative.loop import Context, Stats
from minispec.speculative.sampling import SamplingParams
from test_medusa import tiny_model


def dv(model, **kw):
    return DraftVerifyProposer(model, skip=SkipSet.from_lists(2, attn=[1]), **kw)


@pytest.mark.parametrize("remaining", [1, 2, 3, 4, 5, 9])
def test_the_draft_is_cut_to_one_less_than_the_tokens_the_request_still_wants(remaining):
    model = tiny_model(W=5, seed=11)
    cache = model.new_cache()
    model.forward([1, 5, 3], cache)
    for params in (SamplingParams(), SamplingParams(1.0, top_k=5)):
        stats = Stats()
        ctx = Context(4, None, model, cache, params, np.random.default_rng(0), stats)
        ctx.left = remaining
        draft = dv(model, max_draft=4, gamma0=0.0, adaptive=False).propose(ctx)
        K = min(4, remaining - 1)
        assert len(draft.tokens) - 1 == K == stats.counters["draft_verify.forwards"] == draft.tree.max_depth
        assert draft.q is None if params.greedy or K == 0 else draft.q.shape[0] == K
        assert cache.pos == 3 and cache.block_len == 0              # the ring untouched, the scratch discarded


class Remaining:
    """Sets ctx.left = max_new_tokens - tokens emitted so far (what the loop's field holds) and records
    every step."""

    def __init__(self, inner, n):
        self.inner, self.n, self.emitted, self.log = inner, n, 0, []

    def start(self, ctx, prompt_hidden):
        self.inner.start(ctx, prompt_hidden)

    def propose(self, ctx):
        ctx.left = self.n - self.emitted
        draft = self.inner.propose(ctx)
        self.log.append((ctx.left, len(draft.tokens) - 1))
        return draft

    def observe(self, step):
        self.emitted += len(step.tokens)
        self.log[-1] += (step,)
        self.inner.observe(step)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("n,drafts", [(13, [4, 4, 2]), (11, [4, 4, 0])])
def test_no_step_drafts_past_the_token_limit_and_the_limit_never_cuts_an_accepted_path(temperature, n, drafts):
    """A draft that skips nothing is always accepted, so every step emits K + 1 tokens: with max_draft = 4 and
    13 tokens wanted, the steps draft 4, 4, 2 (13 = 5 + 5 + 3); uncut, the last would draft 4 and throw 2
    accepted tokens away. 11 tokens: 4, 4, then the root alone (its bonus is the 11th token)."""
    model = tiny_model(W=5, seed=12)
    full = SkipSet.none(2)
    rec = Remaining(DraftVerifyProposer(model, skip=full, max_draft=4, gamma0=0.0, adaptive=False), n)
    out = generate(model, [1, 5, 3], decoder=rec, max_new_tokens=n, temperature=temperature, eos_id=None)
    assert [K for _, K, _ in rec.log] == drafts
    assert out.stats.counters["draft_verify.forwards"] == sum(drafts) and len(out.tokens) == n
    for remaining, K, step in rec.log:
        assert K <= remaining - 1
        assert len(step.path) == len(step.tokens)             # every accepted node's token was emitted
    ref = generate(model, [1, 5, 3], max_new_tokens=n, eos_id=None).tokens
    assert temperature or out.tokens == ref


def test_with_the_adaptive_threshold_the_output_is_still_ar_and_no_draft_forward_is_wasted_on_the_last_step():
    model = tiny_model(W=5, seed=13)
    for n in (1, 2, 7, 20):
        rec = Remaining(dv(model, max_draft=5), n)
        out = generate(model, [1, 5, 3], decoder=rec, max_new_tokens=n, eos_id=None)
        assert out.tokens == generate(model, [1, 5, 3], max_new_tokens=n, eos_id=None).tokens
        assert all(K <= r - 1 for r, K, _ in rec.log)
        assert rec.log[-1][1] <= n - sum(len(s.tokens) for *_, s in rec.log[:-1]) - 1


def test_the_loops_context_holds_the_tokens_still_wanted():
    model = tiny_model(W=5, seed=14)
    seen = []

    class Spy:
        inner = dv(model, max_draft=3, gamma0=0.0, adaptive=False)

        def start(self, ctx, h):
            self.inner.start(ctx, h)

        def propose(self, ctx):
            seen.append(ctx.left)
            return self.inner.propose(ctx)

        def observe(self, step):
            seen.append(-len(step.tokens))
            self.inner.observe(step)
    generate(model, [1, 5, 3], decoder=Spy(), max_new_tokens=11, eos_id=None)
    left = 11
    for i in range(0, len(seen), 2):
        assert seen[i] == left
        left += seen[i + 1]
