"""Prompt lookup decoding: the context drafts itself (A. Saxena, 2023, github.com/apoorvumang/prompt-lookup-decoding;
HF transformers' `prompt_lookup_num_tokens`; "PLD" in Spec-Bench, Xia et al., arXiv 2401.07851).

Wherever the output repeats earlier text (an edit of the prompt, a docstring that restates code, the loops of a
small model's greedy output), the tokens that followed the last occurrence of the current suffix are a good guess
of what comes next, and finding them costs a dictionary lookup, not a forward:

    context   ... a b c d ... x a b      the last n-gram "a b" (n from max_ngram down to min_ngram)
    match     ... a b|c d ...            an earlier occurrence of it (the latest; HF and the PLD code take the
                                         first, match="first")
    draft     c d ...                    what followed it, max_draft tokens, as a chain (continued periodically
                                         where it runs into the text's end: the text repeats itself)

The draft is a deterministic function of the context (a point mass, Draft.q = None), so greedy verification
keeps exactly the model's greedy tokens and recursive rejection sampling keeps sampling lossless. How many of
the drafted tokens are verified is the cost rule of minispec.speculative.draft_length (sizing="cost", the default):
K maximises expected tokens per unit time from per-depth acceptance estimates and this backend's verify cost
curve c(T), and K = 0 (plain decoding) when no draft pays; sizing="max" verifies all max_draft tokens (as HF and
PLD verify all that a match offers).
"""
from ..errors import UserError, check_int
from ..speculative.draft_length import AcceptanceEstimate, best_length, step_costs, verify_costs
from ..speculative.tree import Tree
from ..speculative.verify import Draft, count

MATCHES = ("first", "last")
SIZINGS = ("cost", "max")


class NgramIndex:
    """Where every n-gram (min_n <= n <= max_n) of a growing token list occurs, for lookups in O(max_n).

    first[g]: the end index of g's first occurrence; last[g] / before[g]: of its latest and the one before it
    (the latest occurrence of the text's own suffix is the suffix itself, so a match is the one before it)."""

    def __init__(self, min_n, max_n):
        self.min_n, self.max_n = min_n, max_n
        self.text, self.first, self.last, self.before = [], {}, {}, {}

    def extend(self, tokens):
        for t in tokens:
            self.text.append(int(t))
            end = len(self.text) - 1
            for n in range(self.min_n, min(self.max_n, end + 1) + 1):
                g = tuple(self.text[end - n + 1:end + 1])
                self.first.setdefault(g, end)
                if g in self.last:
                    self.before[g] = self.last[g]
                self.last[g] = end

    def continuation(self, start, max_len):
        """Up to max_len tokens from text[start:], continued periodically past the text's end: a match ending p
        tokens before the suffix says the text repeats with period p, so x[j] = x[j - p] drafts on."""
        out = self.text[start:start + max_len]
        p = len(self.text) - start                      # the period (start = e + 1, e the match's end)
        while len(out) < max_len:
            out.append(out[len(out) - p])
        return out

    def match(self, which="last"):
        """(n, start): the longest suffix n-gram of the text (n from max_n down to min_n) that also occurs
        earlier, and the index of the token that followed that earlier occurrence (its latest one, or its first
        with which="first"); (0, None) when no suffix of min_n tokens or more occurs earlier."""
        end = len(self.text) - 1
        for n in range(min(self.max_n, end), self.min_n - 1, -1):
            g = tuple(self.text[end - n + 1:])
            e = self.first.get(g) if which == "first" else self.before.get(g)
            if e is not None and e < end:
                return n, e + 1
        return 0, None


class ContextChain:
    """Prompt lookup's drafter: the continuation of the context's longest matching suffix n-gram (min_ngram to
    max_ngram tokens; its latest earlier occurrence, or its first with match="first"), up to L = max_draft tokens,
    with the values its own acceptance estimate gives them. The decoder "lookup" drafts it alone
    (LookupProposer); medusa, hydra and hydra++ with tree="dynamic" and lookup=L join it to their trees
    (minispec.speculative.dynamic_tree.add_chain).

    values: the j-th token's value (j = 1..L) is a_1 · ... · a_j, the estimated probability that the chain's
    first j tokens are all accepted, from one AcceptanceEstimate per match length (prior, weight, decay). After each
    step the whole chain found for it is judged against the tokens the step emitted (the accepted path and the
    bonus: the target's own choices): its first min(L, len(emitted)) tokens were reached, and accepted up to
    the first that differs, whether they were drafted or not. Greedy: exactly whether the verifier would have
    accepted them. Sampling: a drafted point mass x is accepted with probability p(x), and the emitted token is
    x with probability p(x) too (the output law is the target's), so the estimate learns the same rate. A step
    that drafted less than it found still teaches the estimate about the rest, so the cost rule can leave a
    stretch of short drafts as soon as the text repeats again.

    The chain alone: `alone` sizes it by the cost rule (draft_length.best_length: K tokens for c(K + 1), no
    proposal paid) on the curve given to `price` (step_cost: [L + 1] times of a step verifying K = 0..L tokens,
    or None: all of them, no rate)."""

    def __init__(self, max_draft, min_ngram=1, max_ngram=3, match="last", prior=0.5, weight=2.0, decay=0.98):
        self.max_draft = check_int("lookup", max_draft, low=1)
        self.min_ngram, self.max_ngram, self.match = min_ngram, max_ngram, match
        self.estimates = {n: AcceptanceEstimate(self.max_draft, prior, weight, decay)
                          for n in range(min_ngram, max_ngram + 1)}
        self.index, self.pending, self.acc, self.step_cost = None, None, None, None
        self.matched, self.start_at = 0, None
        self.chains = [Tree.chain(K) for K in range(self.max_draft + 1)]

    def price(self, costs):
        """The verify cost curve {T: c(T)} (or a function) that sizes and prices the chain alone, or None."""
        self.step_cost = None if costs is None else step_costs(costs, self.max_draft)

    def start(self, prompt):
        """A fresh index over the prompt (ending with the first root), the estimates back to their prior."""
        if prompt is None:
            raise UserError("lookup: the decoding loop gave no prompt ids (Context.prompt) to look up in")
        self.index, self.pending = NgramIndex(self.min_ngram, self.max_ngram), None
        self.index.extend(prompt)
        for e in self.estimates.values():
            e.reset()

    def propose(self):
        """(tokens [L], values [L]) for the text so far (it ends with this step's root), or None with no match;
        `matched` is the match's length (0: none) and `start_at` the text index its continuation starts at."""
        self.matched, self.start_at = self.index.match(self.match)
        if not self.matched:
            self.pending = None
            return None
        tokens = self.index.continuation(self.start_at, self.max_draft)
        values, reach, self.acc = [], 1.0, self.estimates[self.matched].acc
        for a in self.acc:
            reach *= a
            values.append(reach)
        self.pending = (self.matched, tokens)
        return tokens, values

    def alone(self, root, tokens, limit):
        """(K, rate, Draft of the root and the chain's first K tokens): K by the cost rule, at most limit (rate
        its tokens per unit of time), or K = min(L, limit) and rate None without a curve."""
        if self.step_cost is None:
            K, rate = min(len(tokens), limit), None
        else:
            K, rate = best_length(self.acc, self.step_cost[:min(len(tokens), limit) + 1])
        return K, rate, Draft(self.chains[K], [int(root)] + tokens[:K])

    def observe(self, emitted):
        """After a step that emitted `emitted` (accepted draft tokens, then the bonus): judge this step's chain
        against them, then add them to the text."""
        if self.pending is not None:
            n, tokens = self.pending
            reached = min(len(tokens), len(emitted))
            same = 0
            while same < reached and tokens[same] == emitted[same]:
                same += 1
            self.estimates[n].observe(reached, same)
            self.pending = None
        self.index.extend(emitted)


class LookupProposer:
    """Decoder "lookup": n-gram lookup in the context (prompt + generated text) proposes a chain (ContextChain).

    max_ngram / min_ngram: the suffix lengths tried, longest first; max_draft: the most tokens taken from a
    match; match: "last" or "first" occurrence; sizing: "cost" (the cost rule) or "max" (all of them); costs: a
    verify cost curve {T: c(T)} or a function (None: measured once for this model, draft_length.verify_costs);
    prior / weight / decay: the acceptance estimate's (draft_length.AcceptanceEstimate; judged on every step's
    emitted tokens, ContextChain).

    Counts in ctx.stats.counters: "lookup.matched" (steps whose suffix matched earlier text), "lookup.accepted"
    (draft tokens accepted), and of them "lookup.prompt_matched" / "lookup.prompt_accepted": those whose draft
    was copied from the prompt (not from the generated text), which tell a set that copies its prompt from one
    whose output repeats itself.
    """
    name = "lookup"

    def __init__(self, model, max_ngram=3, min_ngram=1, max_draft=8, match="last", sizing="cost", costs=None,
                 prior=0.5, weight=2.0, decay=0.98):
        min_ngram = check_int("min_ngram", min_ngram, low=1)
        max_ngram = check_int("max_ngram", max_ngram, low=min_ngram, what=" (and >= min_ngram)")
        max_draft = check_int("max_draft", max_draft, low=1)
        if match not in MATCHES:
            raise UserError(f"lookup: match must be one of {MATCHES}, not {match!r}")
        if sizing not in SIZINGS:
            raise UserError(f"lookup: sizing must be one of {SIZINGS}, not {sizing!r}")
        self.max_draft = max_draft
        if sizing == "cost" and costs is None:
            costs = verify_costs(model, max_draft + 1)
        if costs is not None and not callable(costs) and (not isinstance(costs, dict) or 1 not in costs):
            raise UserError(f"lookup: costs must be a verify cost curve {{T: c(T)}} with c(1), or a function, "
                            f"not {costs!r}")
        # one estimate per matched n-gram length: a 3-token match predicts far better than a 1-token one
        self.context = ContextChain(max_draft, min_ngram, max_ngram, match, prior, weight, decay)
        self.context.price(costs if sizing == "cost" else None)
        self.from_prompt, self.stats = False, None

    def start(self, ctx, prompt_hidden):
        """A fresh index over the prompt (it ends with the first root); the acceptance estimate back to its prior."""
        self.context.start(ctx.prompt)
        self.prompt_len, self.stats = len(ctx.prompt), ctx.stats       # observe() counts into this run's stats

    def propose(self, ctx):
        chain = self.context.propose()
        if chain is None:
            return Draft(self.context.chains[0], [int(ctx.root)])
        self.from_prompt = self.context.start_at < self.prompt_len
        count(ctx.stats, "lookup.matched")
        if self.from_prompt:
            count(ctx.stats, "lookup.prompt_matched")
        return self.context.alone(ctx.root, chain[0], self.max_draft)[2]

    def observe(self, step):
        if self.context.matched:
            count(self.stats, "lookup.accepted", len(step.path) - 1)
            if self.from_prompt:
                count(self.stats, "lookup.prompt_accepted", len(step.path) - 1)
        self.context.observe(step.tokens)
