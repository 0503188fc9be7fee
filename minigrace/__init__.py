"""minigrace: GRACE (Generative Representation Learning via Contrastive Policy Optimization), one file per stage."""
__version__ = "0.1.0"
