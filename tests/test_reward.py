"""reward.py / advantage.py stages (and the collapse metric): weights per reward preset, length penalty, collapse signal, errors."""
import math

import pytest
import torch

from minigrace.advantage import compute_advantages
from minigrace.config import GraceConfig
from minigrace.metrics import cross_text_cosine
from minigrace.reward import apply_length_penalty, compute_rewards as compute_rewards_plain, nonfinite_rewards, reward_weights


def compute_rewards(docs, queries, negs, truncated, cfg: GraceConfig, mode: str):
    """reward.compute_rewards with the values a run's config gives it (as step.py passes them)."""
    weights = reward_weights(cfg.reward, cfg.w_positive, cfg.w_negative, cfg.w_consistency, cfg.w_cross_group,
                             cfg.w_discriminative)
    return compute_rewards_plain(docs, queries, negs, truncated, cfg.group_size, weights, cfg.tau, mode,
                                 cfg.length_penalty, cfg.length_penalty_mode)


def unit(*v):
    t = torch.tensor(v, dtype=torch.float32)
    return t / t.norm()


def test_grace_formula_hand_computed():
    # 2 groups of 2, 2-D unit vectors. Group 0: query e1; docs e1 and e2. Group 1: query e2; docs e2, e2.
    e1, e2 = unit(1.0, 0.0), unit(0.0, 1.0)
    docs = torch.stack([e1, e2, e2, e2])
    queries = torch.stack([e1, e2])
    negs = torch.stack([e2, e1])
    cfg = GraceConfig(reward="grace", group_size=2, tau=0.5)
    r = compute_rewards(docs, queries, negs, torch.zeros(4, dtype=torch.bool), cfg, "supervised")
    # positive: cos(q, d) = 1, 0, 1, 1;  negative: −cos(q_g, n_g) = 0 for both groups
    # consistency: cos(d0, d1)=0, same for d1; group 1: 1, 1
    # cross_group (supervised): −max_j cos(q_i, d_j) over the other group: q0=e1 vs {e2,e2} → 0; q1=e2 vs {e1,e2} → −1
    expected = torch.tensor([(1 + 0.2 * 0 + 0.2 * 0) / 0.5, (0 + 0 + 0) / 0.5,
                             (1 + 0.2 * 1 - 0.2 * 1) / 0.5, (1 + 0.2 * 1 - 0.2 * 1) / 0.5])
    torch.testing.assert_close(r.total, expected)
    torch.testing.assert_close(r.parts["cross_group"], torch.tensor([0.0, 0.0, -1.0, -1.0]))


def test_custom_adds_the_in_batch_infonce_term_to_grace():
    e1, e2 = unit(1.0, 0.0), unit(0.0, 1.0)
    docs, queries = torch.stack([e1, e2, e2, e2]), torch.stack([e1, e2])
    grace = compute_rewards(docs, queries, None, torch.zeros(4, dtype=torch.bool),
                            GraceConfig(reward="grace", group_size=2, tau=0.5), "supervised")
    contrastive = compute_rewards(docs, queries, None, torch.zeros(4, dtype=torch.bool),
                                  GraceConfig(reward="custom", group_size=2, tau=0.5, w_discriminative=2.0),
                                  "supervised")
    # doc 0 = e1: logits cos/τ against (q0=e1, q1=e2) = (2, 0) → log softmax at 0 = 2 − log(e² + 1)
    disc0 = 2 - math.log(math.exp(2) + 1)
    assert contrastive.total[0].item() == pytest.approx(grace.total[0].item() + 2.0 * disc0, abs=1e-5)


def test_length_penalty_constant_is_grace_and_relative_ranks_truncated_last():
    total = torch.tensor([-5.0, -7.0, -6.0, 2.0, 3.0, 4.0, 1.0, 1.0, 1.0])
    truncated = torch.tensor([False, True, False, True, False, False, True, True, True])
    grace = apply_length_penalty(total, truncated, 3, -1.0, "constant")
    torch.testing.assert_close(grace, torch.tensor([-5.0, -1.0, -6.0, -1.0, 3.0, 4.0, -1.0, -1.0, -1.0]))
    # constant −1 would rank the truncated rationale of group 0 *first*; relative puts it below −6.
    relative = apply_length_penalty(total, truncated, 3, -1.0, "relative")
    torch.testing.assert_close(relative, torch.tensor([-5.0, -7.0, -6.0, 2.0, 3.0, 4.0, -1.0, -1.0, -1.0]))
    # group 0: worst complete −6 → −7; group 1: worst complete 3 → 2; group 2: all cut → the penalty
    # none: cut rationales keep their reward (short budgets, where most rationales are cut)
    torch.testing.assert_close(apply_length_penalty(total, truncated, 3, -1.0, "none"), total)


def test_compute_rewards_applies_the_length_penalty():
    docs, queries = torch.randn(6, 4), torch.randn(2, 4)
    truncated = torch.tensor([False, True, False, False, False, True])
    cfg = GraceConfig(group_size=3, length_penalty=-1.0, length_penalty_mode="constant")
    r = compute_rewards(docs, queries, None, truncated, cfg, "supervised")
    assert r.total[1] == -1.0 and r.total[5] == -1.0 and r.total[0] != -1.0


def test_non_finite_reward_is_reported_never_zero():
    docs = torch.randn(4, 3)
    r = compute_rewards(docs, torch.randn(2, 3), None, torch.zeros(4, dtype=torch.bool), GraceConfig(group_size=2),
                        "supervised")
    assert nonfinite_rewards(r) == ""
    docs[2, 0] = float("nan")  # one rollout's embedding: its reward, and the in-batch terms it enters
    r = compute_rewards(docs, torch.randn(2, 3), None, torch.zeros(4, dtype=torch.bool), GraceConfig(group_size=2),
                        "supervised")
    assert torch.isnan(r.total[2])  # NaN stays NaN, never replaced by a number
    assert "not finite" in nonfinite_rewards(r) and "discriminative" in nonfinite_rewards(r)


def test_cross_text_cosine_equals_brute_force():
    torch.manual_seed(0)
    docs, G = torch.randn(12, 5), 3
    d = torch.nn.functional.normalize(docs, dim=-1)
    pairs = [float(d[i] @ d[j]) for i in range(12) for j in range(12) if i // G != j // G]
    assert cross_text_cosine(docs, G) == pytest.approx(sum(pairs) / len(pairs), abs=1e-5)
    same = torch.ones(6, 4)  # collapse: every embedding equal → 1
    assert cross_text_cosine(same, 2) == pytest.approx(1.0, abs=1e-6)


def test_advantages_center_groups_and_count_zero_variance():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    adv, frac_zero = compute_advantages(rewards, 3, scale_std=False)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    assert frac_zero == 0.5
    adv, _ = compute_advantages(rewards, 3, scale_std=True)
    assert adv[2].item() == pytest.approx(1.0 / (1.0 + 1e-6), rel=1e-5)  # std of (1,2,3) = 1
    assert (adv[3:] == 0).all()


def test_contrastive_default_is_the_infonce_term_alone():
    docs, queries = torch.randn(6, 4), torch.randn(2, 4)
    r = compute_rewards(docs, queries, torch.randn(2, 4), torch.zeros(6, dtype=torch.bool),
                        GraceConfig(group_size=3), "supervised")
    torch.testing.assert_close(r.total, r.parts["discriminative"])
