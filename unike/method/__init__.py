"""UniKE (Pan et al., NeurIPS 2024): unified intrinsic and in-context knowledge editing.

knowledge.py  hallucination triplets and their hidden states (rules collect_triplets,
              extract_hidden_states)
encoders.py   semantic and truthfulness encoders, contrastive Eq. 4 / Eq. 5, zeta
              (rule pretrain_encoders); their spaces in 2-D for Figure 5a (rule embed_spaces)
tsne.py       exact t-SNE in torch (Figure 5a)
latent_ike.py latent in-context knowledge in self-attention (Eq. 2, Eq. 7)
editor.py     the UniKE editor and its Table 4 / Figure 4 variants
"""
