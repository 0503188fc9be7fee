"""bench/memory_model.py: the README's memory arithmetic equals what the tiny model allocates."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `bench` sits beside `minigrace`

from bench import memory_model  # noqa: E402


def test_memory_formulas_match_the_tiny_model(tiny, one_thread):
    results = memory_model.checks()
    assert len(results) == 5
    for name, formula, measured in results:
        assert formula == measured, name


def test_backbone_parameter_counts():
    # Published sizes: Qwen2.5-1.5B 1.54B, Qwen2.5-3B 3.09B, Llama-3.2-3B 3.21B, Qwen3-4B 4.02B.
    sizes = {name: memory_model.n_params(m) / 1e9 for name, m in memory_model.BACKBONES.items()}
    assert [round(v, 2) for v in sizes.values()] == [1.54, 3.09, 3.21, 4.02], sizes
