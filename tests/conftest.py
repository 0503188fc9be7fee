"""Test setup: Triton's interpreter on CPU, offline hub, one cached tiny model for the session."""
import os

# Must be set before any @triton.jit decorator runs (i.e. before kernels are imported).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
