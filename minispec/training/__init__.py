"""Layer 4, training and search: the heads' trainers (hand-derived gradients, Adam) and Draft & Verify's skip-set
objective and search.

Reading order: progress -> data (corpus, self-distillation, hidden states) -> checks (the options' rules, before a
model loads) -> optim (Adam, the schedule, the resumable loop) -> backprop (every backward pass) -> train_medusa ->
train_hydra -> skip_objective -> skip_search.
"""
