"""step.py: one GRACE step on the real tiny model, driven as the harness drives it."""
import torch

from minigrace.config import GraceConfig
from minigrace.data import load_examples
from minigrace.metrics import step_metrics
from minigrace.step import Policy, grace_step
from minigrace.worlds.builtin import builtin_corpus


def one_step(model, tok, reward: str):
    cfg = GraceConfig(reward=reward, batch_size=2, mini_batch_size=2, group_size=2, max_new_tokens=6,
                      max_prompt_len=128, lr=1e-4)
    examples, mode = load_examples(builtin_corpus(seed=0).train[:2], "supervised")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    result = grace_step(Policy.single_process(model, tok), optimizer, scheduler, examples, cfg, mode,
                        torch.Generator().manual_seed(0))
    return result, step_metrics(result, cfg.lr)


def test_hard_negatives_are_rolled_out_only_when_the_reward_reads_them(tiny, one_thread):
    import copy
    model, tok = tiny
    grace, grace_row = one_step(copy.deepcopy(model), tok, "grace")
    contrastive, row = one_step(copy.deepcopy(model), tok, "contrastive")
    assert "negative" in grace.rewards.parts and "reward_negative" in grace_row
    assert "negative" not in contrastive.rewards.parts and "reward_negative" not in row
    assert grace.rewards.total.shape == contrastive.rewards.total.shape == (4,)
    assert row["clip_frac"] == 0.0  # one update on the rollouts' own policy: ratio 1 everywhere (fp32)
