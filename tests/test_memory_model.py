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
    assert len(results) == 7
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
    # (and the held-out eval schedule, which changes no update either)
    assert set(PRESETS[alias]) - {"eval_every"} == MEMORY_SETTINGS and not MEMORY_SETTINGS & set(GRACE_RECIPE)


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


def test_memory_model_against_measured_rss_on_cpu():
    """Each phase's peak RSS growth on CPU (a Qwen2 model widened to ≥ 50 MB terms, one fresh process) against
    phases(device="cpu"): a term the model leaves out shows up as a measured growth above the prediction.
    The train phase is a sum of terms that do not all coexist (layer gradients replace activations during the
    backward): it may over-predict, within the tolerance."""
    for phase, predicted, measured in memory_model.rss_checks():
        assert predicted >= 50 * 2**20 or "step" in phase, (phase, predicted)
        slack = memory_model.RSS_TOLERANCE * predicted + memory_model.PAGE_SLACK
        assert abs(measured - predicted) <= slack, (phase, round(predicted / 2**20), round(measured / 2**20))


# vLLM's LLM(...) keywords, read in vLLM's source: vllm/entrypoints/llm.py (commit 0012cf691b7e, LLM.__init__'s
# named parameters; the rest go to EngineArgs through **kwargs) and vllm/engine/arg_utils.py (commit 001999d2f360,
# the EngineArgs dataclass: max_model_len, distributed_executor_backend, enable_sleep_mode, ...).
VLLM_LLM_PARAMETERS = {"model", "task", "tokenizer", "tokenizer_mode", "skip_tokenizer_init", "trust_remote_code",
                       "tensor_parallel_size", "dtype", "quantization", "revision", "seed", "gpu_memory_utilization",
                       "swap_space", "cpu_offload_gb", "enforce_eager", "compilation_config"}
VLLM_ENGINE_ARGS = {"max_model_len", "distributed_executor_backend", "enable_sleep_mode", "enable_prefix_caching",
                    "max_num_seqs", "kv_cache_dtype", "gpu_memory_utilization", "seed", "dtype", "model"}


def vllm_accepted_keywords() -> set[str]:
    """LLM(...)'s keywords: from the installed vLLM when there is one, else the lists above."""
    try:
        import dataclasses
        import inspect

        import vllm
    except ImportError:
        return VLLM_LLM_PARAMETERS | VLLM_ENGINE_ARGS
    return set(inspect.signature(vllm.LLM.__init__).parameters) | {f.name for f in dataclasses.fields(vllm.EngineArgs)}


def test_vllm_engine_kwargs_are_llm_parameters():
    from minigrace.config import GraceConfig
    from minigrace.vllm_rollout import vllm_engine_kwargs

    kwargs = vllm_engine_kwargs(GraceConfig(), "Qwen/Qwen3-4B", distributed=True)
    assert set(kwargs) <= vllm_accepted_keywords(), set(kwargs) - vllm_accepted_keywords()
    assert kwargs["enable_sleep_mode"] and kwargs["distributed_executor_backend"] == "external_launcher"


def test_vllm_engine_sleeps_outside_its_rollouts(monkeypatch):
    """The engine's GPU share is taken only from the weight sync to the end of generation. LLM.sleep(level=1)
    and LLM.wake_up(tags=None) as vllm/entrypoints/llm.py defines them (sleep also resets the prefix cache)."""
    import types

    import torch

    from minigrace.config import GraceConfig
    from minigrace.prompts import ChatPrompt
    from minigrace.vllm_rollout import VLLMRollout

    calls = []

    class RecordingLLM:
        def __init__(self, **kwargs):
            calls.append("init")

        def sleep(self, level: int = 1):
            calls.append(f"sleep {level}")

        def wake_up(self, tags=None):
            calls.append("wake_up")

        def apply_model(self, fn):
            calls.append("load weights")

        def reset_prefix_cache(self):
            calls.append("reset prefix cache")

        def generate(self, prompts, params, use_tqdm=False):
            calls.append("generate")
            output = types.SimpleNamespace(token_ids=[7, 2], finish_reason="stop")
            return [types.SimpleNamespace(outputs=[output]) for _ in prompts]

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = RecordingLLM, lambda **kw: kw
    fake_inputs = types.ModuleType("vllm.inputs")
    fake_inputs.TokensPrompt = dict
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.inputs", fake_inputs)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    engine = VLLMRollout("some/model", GraceConfig(), distributed=False)
    engine.sync_weights(torch.nn.Linear(2, 2), lora=False)
    engine.generate([ChatPrompt([1, 5, 6], 1, False)], torch.ones(1), torch.rand(1, 4), max_new_tokens=4,
                    eos_ids=[2], pad_id=0, top_p=1.0, device=torch.device("cpu"))
    assert calls == ["init", "sleep 1", "wake_up", "load weights", "reset prefix cache", "generate", "sleep 1"]


@pytest.mark.parametrize("alias", list(ALIASES))
def test_every_backbone_preset_fits_with_vllm_rollouts_that_sleep(alias):
    _, awake_only_to_sample = memory_model.preset_phases(alias, flags=("--rollout", "vllm"))
    assert max(awake_only_to_sample.values()) / GiB <= memory_model.FIT_GIB
    m = memory_model.BACKBONES[memory_model.ALIAS_BACKBONE[alias]]
    awake = memory_model.phases(m, rollout_rows=0, microbatch_tokens=4096, rollout="vllm", vllm_sleep=False)
    asleep = memory_model.phases(m, rollout_rows=0, microbatch_tokens=4096, rollout="vllm")
    assert awake["step"] - asleep["step"] == pytest.approx(0.3 * memory_model.GPU_GIB * GiB)


def test_fsdp_accumulation_without_reduce_scatter_holds_a_full_gradient():
    m = memory_model.BACKBONES["Qwen3-4B"]
    kw = dict(rollout_rows=64, microbatch_tokens=16384, setup="fsdp+offload", gpus=4)
    held = memory_model.phases(m, fsdp_accumulate="unsharded", **kw)["train"]
    assert held - memory_model.phases(m, **kw)["train"] == pytest.approx(4 * memory_model.n_params(m))
