"""Layer 4, training and search: the heads' trainers (hand-derived gradients, Adam) and Draft & Verify's skip-set
objective and search.

Reading order: progress -> data (corpus, self-distillation, hidden states, Adam) -> train_medusa -> backprop
(the Hydra++ prefix layer's backward) -> train_hydra -> skip_objective -> skip_search.
"""
