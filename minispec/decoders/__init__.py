"""Layer 3, the decoders: one proposer per file, its file formats beside it, and the registry with generate().

Reading order: heads (what Medusa's and Hydra's head files share) -> medusa, medusa_files -> hydra,
hydra_files -> draft_verify -> lookup -> registry (names -> proposers, and minispec.generate). Each decoder is a
Proposer (minispec.speculative.loop) and imports only the layers below.
"""
