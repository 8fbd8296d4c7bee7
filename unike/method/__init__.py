"""UniKE (Pan et al., NeurIPS 2024): unified intrinsic and in-context knowledge editing.

knowledge.py  hallucination triplets and their hidden states (rules collect_triplets,
              extract_hidden_states)
encoders.py   semantic and truthfulness encoders, contrastive Eq. 4 / Eq. 5, zeta
              (rule pretrain_encoders)
"""
