"""bench/memory_model.py: the README's memory arithmetic equals what the tiny model allocates, and
every GRACE backbone's model preset fits one 80 GB GPU by it."""
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `bench` sits beside `minigrace`

from bench import memory_model  # noqa: E402
from minigrace.config import GRACE_RECIPE, PRESET_WHY, PRESETS  # noqa: E402
from minigrace.models import ALIASES  # noqa: E402

GiB = 2**30
MEMORY_SETTINGS = {"rollout_rows", "grad_checkpointing", "max_tokens_per_microbatch"}


def test_memory_formulas_match_the_tiny_model(tiny, one_thread):
    results = memory_model.checks()
    assert len(results) == 6
    for name, formula, measured in results:
        assert formula == measured, name


def test_backbone_parameter_counts():
    # Published sizes: Qwen2.5-1.5B 1.54B, Qwen2.5-3B 3.09B, Llama-3.2-3B 3.21B, Qwen3-4B 4.02B.
    sizes = {name: memory_model.n_params(m) / 1e9 for name, m in memory_model.BACKBONES.items()}
    assert [round(v, 2) for v in sizes.values()] == [1.54, 3.09, 3.21, 4.02], sizes


@pytest.mark.parametrize("alias", list(ALIASES))
@pytest.mark.parametrize("recipe", ["minigrace", "grace"])
def test_every_backbone_preset_fits_one_80gb_gpu(alias, recipe):
    assert set(memory_model.ALIAS_BACKBONE) == set(ALIASES)
    cfg, phases = memory_model.preset_phases(alias, recipe)
    peak = max(phases.values()) / GiB
    assert peak <= memory_model.FIT_GIB, (alias, {k: round(v / GiB, 1) for k, v in phases.items()})
    # GRACE's batch as GRACE ran it; the preset only bounds memory (no sampled token or update changes)
    assert (cfg.batch_size, cfg.group_size, cfg.max_prompt_len, cfg.max_new_tokens, cfg.lora_r) == (64, 8, 1024, 2048, 0)
    assert set(PRESETS[alias]) == MEMORY_SETTINGS and not MEMORY_SETTINGS & set(GRACE_RECIPE)


@pytest.mark.parametrize("alias", list(ALIASES))
def test_help_states_the_memory_model_numbers(alias):
    """The GiB in --help (config.PRESET_WHY) are the memory model's: the preset's peak, and the peak
    without it (all 640 rollouts sampled at once, no checkpointing) that does not fit."""
    _, phases = memory_model.preset_phases(alias)
    bare = memory_model.phases(memory_model.BACKBONES[memory_model.ALIAS_BACKBONE[alias]], rollout_rows=0,
                               microbatch_tokens=16384, checkpointing=False)
    peak, unbounded = (int(x) for x in re.search(r"peak (\d+) GiB.*unbounded: (\d+) GiB", PRESET_WHY[alias]).groups())
    assert peak == round(max(phases.values()) / GiB)
    assert unbounded == round(max(bare.values()) / GiB) > 80
