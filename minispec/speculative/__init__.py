"""Layer 2, the speculative core: what every speculative decoder shares and no decoder owns.

Reading order: tree (draft trees and their masks) -> sampling (the target's processed distribution) ->
acceptance (the acceptance rules: greedy, typical, chain and tree rejection sampling) -> verify (one forward,
accept, commit) -> costs (the cost model: c(T) and predicted speed-ups) -> draft_length (the cost rule: how long
a chain draft pays this step) -> loop (the Proposer protocol and the decoding loop). Imports only the model layer
and the foundation; it knows no decoder.
"""
