"""minigrace: GRACE (Generative Representation Learning via Contrastive Policy Optimization), one file per stage."""
__version__ = "0.1.0"


def __getattr__(name):
    # `from minigrace import Encoder` without paying for torch on `import minigrace`.
    if name == "Encoder":
        from .encode import Encoder
        return Encoder
    raise AttributeError(f"module 'minigrace' has no attribute {name!r}")
