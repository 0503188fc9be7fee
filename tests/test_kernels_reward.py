"""grace_reward: hand-computed components, and Triton (interpreter) vs the torch reference."""
import math
import re

import pytest
from kernel_compile import DEVICE, assert_no_spills, compile_for_sm90, spy_guard
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import minigrace.kernels.cosine_reward as cosine_reward
from minigrace.kernels import REWARD_COMPONENTS, RewardWeights, grace_reward, grace_reward_reference


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setenv("MINIGRACE_KERNELS", request.param)
    return request.param


# ----------------------------------------------------------------------------- a case worked out by hand
# P = 2 groups of G = 3, H = 2. Inputs are deliberately not unit length (cosine normalizes).
#   docs:    d0 = (1, 0)  d1 = (0, 1)  d2 = (1, 1)   | d3 = (3, 4)  d4 = (0, -2)  d5 = (-1, 0)
#   units:   (1, 0)       (0, 1)       (s, s)        | (.6, .8)     (0, -1)       (-1, 0)        s = 1/sqrt(2)
#   queries: q0 = (2, 0) -> (1, 0);  q1 = (0, 3) -> (0, 1)
#   negatives: n0 = (1, 1) -> (s, s);  n1 = (2, -2) -> (s, -s)
S = 2 ** -0.5
DOCS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, 4.0], [0.0, -2.0], [-1.0, 0.0]], device=DEVICE)
QUERIES = torch.tensor([[2.0, 0.0], [0.0, 3.0]], device=DEVICE)
NEGATIVES = torch.tensor([[1.0, 1.0], [2.0, -2.0]], device=DEVICE)
TAU = 0.5
HAND = {
    # cos(q_g, d_i): q0.(1,0)=1, q0.(0,1)=0, q0.(s,s)=s | q1.(.6,.8)=.8, q1.(0,-1)=-1, q1.(-1,0)=0
    "positive": [1.0, 0.0, S, 0.8, -1.0, 0.0],
    # -cos(q_g, n_g): -(1,0).(s,s) = -s ; -(0,1).(s,-s) = +s
    "negative": [-S, -S, -S, S, S, S],
    # group 0 pair cosines: c01 = 0, c02 = s, c12 = s -> i0: (0+s)/2, i1: (0+s)/2, i2: (s+s)/2
    # group 1 pair cosines: c34 = -.8, c35 = -.6, c45 = 0 -> i3: -.7, i4: -.4, i5: -.3
    "consistency": [S / 2, S / 2, S, -0.7, -0.4, -0.3],
    # supervised: -max_j cos(q_g, d_j) over the other group: q0 vs {.6, 0, -1} -> -.6; q1 vs {0, 1, s} -> -1
    "cross_group": [-0.6] * 3 + [-1.0] * 3,
    # log_softmax([cos(d_i, q0), cos(d_i, q1)] / 0.5)[own]:
    #   i0 (2, 0) own 0: -log(1 + e^-2)      i1 (0, 2) own 0: -2 - log(1 + e^-2)   i2 (2s, 2s): -log 2
    #   i3 (1.2, 1.6) own 1: -log(1 + e^-.4) i4 (0, -2) own 1: -2 - log(1 + e^-2)  i5 (-2, 0) own 1: -log(1 + e^-2)
    "discriminative": [-math.log1p(math.exp(-2)), -2 - math.log1p(math.exp(-2)), -math.log(2),
                       -math.log1p(math.exp(-0.4)), -2 - math.log1p(math.exp(-2)), -math.log1p(math.exp(-2))],
}
# unsupervised cross group: -cos(d_i, q_other): group 0 vs q1 = (0, 1): -0, -1, -s; group 1 vs q0 = (1, 0): -.6, 0, 1
HAND_UNSUP_CROSS = [0.0, -1.0, -S, -0.6, 0.0, 1.0]


def hand_total(parts, w, tau):
    t = lambda name: torch.tensor(parts[name], device=DEVICE)
    return ((w.positive * t("positive") + w.negative * t("negative") + w.consistency * t("consistency")
             + w.cross_group * t("cross_group")) / tau + w.discriminative * t("discriminative"))


@pytest.mark.parametrize("query_per_rollout", [False, True])
def test_hand_computed_supervised(backend, query_per_rollout):
    queries = QUERIES.repeat_interleave(3, 0) if query_per_rollout else QUERIES
    w = RewardWeights(discriminative=0.5)
    total, parts = grace_reward(DOCS, queries, NEGATIVES, 3, TAU, w)
    assert set(parts) == set(REWARD_COMPONENTS)
    for name in REWARD_COMPONENTS:
        torch.testing.assert_close(parts[name].cpu(), torch.tensor(HAND[name]), msg=name)
    torch.testing.assert_close(total, hand_total(HAND, w, TAU))


def test_hand_computed_unsupervised(backend):
    w = RewardWeights(discriminative=0.5)
    total, parts = grace_reward(DOCS, QUERIES, NEGATIVES, 3, TAU, w, mode="unsupervised")
    expected = dict(HAND, negative=[0.0] * 6, cross_group=HAND_UNSUP_CROSS)  # negatives ignored unsupervised
    for name in REWARD_COMPONENTS:
        torch.testing.assert_close(parts[name].cpu(), torch.tensor(expected[name]), msg=name)
    torch.testing.assert_close(total, hand_total(expected, w, TAU))


def test_degenerate_groups(backend):
    # G = 1: no other members -> consistency 0.  P = 1: no other groups -> cross_group and discriminative 0.
    _, parts = grace_reward(DOCS, QUERIES.repeat_interleave(3, 0), None, 1, TAU)
    assert (parts["consistency"] == 0).all() and (parts["negative"] == 0).all()
    _, parts = grace_reward(DOCS[:3], QUERIES[:1], NEGATIVES[:1], 3, TAU, RewardWeights(discriminative=1.0))
    assert (parts["cross_group"] == 0).all() and (parts["discriminative"] == 0).all()
    torch.testing.assert_close(parts["consistency"].cpu(), torch.tensor(HAND["consistency"][:3]))


# ----------------------------------------------------------------------------- Triton vs reference
def random_embeddings(P, G, H, dtype=torch.float32, query_rows="group", seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = torch.randn(P * G, H, generator=g).to(dtype)
    queries = torch.randn(P * G if query_rows == "rollout" else P, H, generator=g).to(dtype)
    negatives = torch.randn(P, H, generator=g).to(dtype)
    return docs.to(DEVICE), queries.to(DEVICE), negatives.to(DEVICE)


def assert_matches_reference(docs, queries, neg, G, mode, w=RewardWeights(discriminative=0.3), tau=0.1):
    """The Triton result against the reference on the same (fp32-upcast) inputs: all components and the total."""
    total, parts = grace_reward(docs, queries, neg, G, tau, w, mode)
    up = lambda x: None if x is None else x.float()
    ref_total, ref_parts = grace_reward_reference(up(docs), up(queries), up(neg), G, tau, w, mode)
    for name in REWARD_COMPONENTS:
        assert parts[name].dtype == torch.float32 and parts[name].shape == (docs.shape[0],)
        torch.testing.assert_close(parts[name], ref_parts[name], atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(total, ref_total, atol=1e-4, rtol=1e-5)
    return parts


# G from 1 to 64 (64 = one whole supervised tile per group), odd H, P = 1, row blocks that split groups
# (G = 5, 64 against BLOCK_M = 16), more groups than one query tile (P = 70 > BLOCK_N = 64)
@pytest.mark.parametrize("P,G,H", [(1, 1, 1), (3, 1, 5), (1, 4, 7), (3, 3, 37), (2, 5, 300), (4, 2, 33), (3, 8, 16),
                                   (2, 16, 9), (2, 64, 17), (1, 64, 3), (70, 1, 3)])
@pytest.mark.parametrize("mode", ["supervised", "unsupervised"])
def test_triton_matches_reference(monkeypatch, P, G, H, mode):
    monkeypatch.setenv("MINIGRACE_KERNELS", "triton")
    for query_rows in ("group", "rollout"):
        docs, queries, negatives = random_embeddings(P, G, H, query_rows=query_rows, seed=P * 100 + G * 10 + H)
        for neg in (negatives, None):
            parts = assert_matches_reference(docs, queries, neg, G, mode)
    if G > 1:  # not the trivial zero
        assert parts["consistency"].abs().max() > 1e-3
    if P > 1:
        assert parts["cross_group"].abs().max() > 1e-3 and parts["discriminative"].abs().max() > 1e-3


def test_wide_column_blocks(monkeypatch):
    # past FILL_PROGRAMS a program takes 64 query columns: ragged column and row blocks, both query layouts
    monkeypatch.setenv("MINIGRACE_KERNELS", "triton")
    monkeypatch.setattr(cosine_reward, "FILL_PROGRAMS", 0)
    assert cosine_reward._reward_blocks(8, 5, 40, torch.float32)["BLOCK_C"] == 64
    for P, G, H in [(8, 5, 7), (3, 16, 20), (70, 1, 3)]:
        docs, queries, negatives = random_embeddings(P, G, H, query_rows="rollout", seed=G)
        for mode in ("supervised", "unsupervised"):
            assert_matches_reference(docs, queries, negatives, G, mode)


def test_launch_sizes_at_grace_shapes():
    # P = 64, G = 8: 2 groups x 16 query columns per program -> a 32 x 4 grid (128 programs on 132 SMs)
    blocks = cosine_reward._reward_blocks(64, 8, 64, torch.float32)
    assert (blocks["BLOCK_M"], blocks["BLOCK_C"], blocks["num_warps"]) == (16, 16, 4)
    assert cosine_reward._reward_grid(64, 64, blocks) == (32, 4)
    # G = 1: 16 groups of one row per program; G = 128: one group, 8 warps
    assert cosine_reward._reward_blocks(64, 1, 64, torch.float32)["GROUPS_M"] == 16
    assert cosine_reward._reward_blocks(2, 128, 2, torch.float32)["num_warps"] == 8


@pytest.mark.parametrize("P,G,H,query_rows", [(17, 1, 5, "group"), (5, 3, 70, "rollout"), (6, 7, 33, "group")])
def test_ragged_blocks(monkeypatch, P, G, H, query_rows):
    # row blocks past the last group (P = 17 groups of one, 16 per program), padded group slots (G = 3, 7),
    # query columns over several column blocks (P = 17 > 16; 15 rollout queries), H not a multiple of BLOCK_K
    monkeypatch.setenv("MINIGRACE_KERNELS", "triton")
    docs, queries, negatives = random_embeddings(P, G, H, query_rows=query_rows, seed=P + G)
    for mode in ("supervised", "unsupervised"):
        for neg in (negatives, None):
            assert_matches_reference(docs, queries, neg, G, mode)


def test_two_launches_leave_no_partial_unwritten(monkeypatch):
    # the workspace is torch.empty: poison it, and every output must still match (each entry written before read)
    monkeypatch.setenv("MINIGRACE_KERNELS", "triton")
    real_empty = torch.empty
    monkeypatch.setattr(cosine_reward.torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    docs, queries, negatives = random_embeddings(5, 4, 9, query_rows="rollout", seed=3)
    for mode in ("supervised", "unsupervised"):
        assert_matches_reference(docs, queries, negatives, 4, mode)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("P,G,H", [(3, 4, 40), (2, 16, 33)])
def test_half_inputs(backend, dtype, P, G, H):
    # cosines are computed in fp32 from the half inputs: compare with the reference on the same values in fp32
    docs, queries, negatives = random_embeddings(P, G, H, dtype)
    for mode in ("supervised", "unsupervised"):
        assert_matches_reference(docs, queries, negatives, G, mode)


def test_launch_is_guarded_with_the_doc_device(monkeypatch):
    monkeypatch.setenv("MINIGRACE_KERNELS", "triton")
    seen = spy_guard(monkeypatch, cosine_reward)
    docs, queries, negatives = random_embeddings(2, 2, 4)
    grace_reward(docs, queries, negatives, 2, 0.1)
    assert seen == [docs.device]


def test_validation_errors(backend):
    docs, queries, negatives = random_embeddings(2, 3, 4)
    with pytest.raises(ValueError, match="group_size"):
        grace_reward(docs, queries, negatives, 4, 0.1)  # 6 rows, groups of 4
    with pytest.raises(ValueError, match="query_emb"):
        grace_reward(docs, queries[:, :3], negatives, 3, 0.1)  # H mismatch
    with pytest.raises(ValueError, match="query_emb"):
        grace_reward(docs, queries[:1], negatives, 3, 0.1)  # neither P nor P*G rows
    with pytest.raises(ValueError, match="neg_emb"):
        grace_reward(docs, queries, negatives[:1], 3, 0.1)
    with pytest.raises(ValueError, match="mode"):
        grace_reward(docs, queries, negatives, 3, 0.1, mode="semi")
    with pytest.raises(ValueError, match="tau"):
        grace_reward(docs, queries, negatives, 3, 0.0)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(P=st.integers(1, 4), G=st.integers(1, 20), H=st.integers(1, 24), scale=st.floats(0.01, 100.0),
       mode=st.sampled_from(["supervised", "unsupervised"]), seed=st.integers(0, 2**16))
def test_property_triton_matches_reference_and_scale_invariance(monkeypatch, P, G, H, scale, mode, seed):
    monkeypatch.setenv("MINIGRACE_KERNELS", "triton")
    docs, queries, negatives = random_embeddings(P, G, H, seed=seed)
    w = RewardWeights(discriminative=0.5)
    parts = assert_matches_reference(docs, queries, negatives, G, mode, w)
    total, _ = grace_reward(docs, queries, negatives, G, 0.1, w, mode)
    scaled_total, _ = grace_reward(docs * scale, queries * scale, negatives, G, 0.1, w, mode)  # cosine ignores scale
    torch.testing.assert_close(scaled_total, total, atol=1e-4, rtol=1e-4)
    for name in ("positive", "consistency"):
        assert (parts[name].abs() <= 1 + 1e-5).all()
    assert (parts["discriminative"] <= 1e-6).all()  # a log-probability


def reward_builds(P, G, H, dtype, supervised, per_rollout, precision="tf32x3"):
    """kernel_compile builds of both reward kernels at one shape, with the launcher's sizes and warps."""
    ptr = "*fp32" if dtype == torch.float32 else "*bf16"
    N = P * G
    NQ = N if per_rollout else P
    blocks = cosine_reward._reward_blocks(P, G, NQ, dtype)
    warps = dict(num_warps=blocks.pop("num_warps"))
    label = f"P={P} G={G} H={H} {ptr[1:]}" + (" per-rollout" if per_rollout else "")
    tile = dict(doc_ptr=ptr, query_ptr=ptr, neg_ptr=ptr if supervised else None, out_ptr="*fp32",
                row_stats_ptr="*fp32", own_ptr="*fp32", group_max_ptr="*fp32", N=N, P=P, G=G, NQ=NQ, H=H,
                inv_tau=10.0, **blocks, QUERY_PER_ROLLOUT=per_rollout, HAS_NEG=supervised, SUPERVISED=supervised,
                DOT_FP32=dtype == torch.float32, PRECISION=precision)
    finish_blocks = dict(cosine_reward.FINISH_BLOCKS)
    finish_warps = dict(num_warps=finish_blocks.pop("num_warps"))
    finish = dict(out_ptr="*fp32", row_stats_ptr="*fp32", own_ptr="*fp32", group_max_ptr="*fp32", N=N, P=P, G=G,
                  NQ=NQ, CB=cosine_reward._reward_grid(P, NQ, {**blocks, **warps})[1], inv_tau=10.0, w_pos=1.0,
                  w_neg=1.0, w_cons=0.2, w_cross=0.2, w_disc=0.1, **finish_blocks, QUERY_PER_ROLLOUT=per_rollout,
                  SUPERVISED=supervised)
    module = "minigrace.kernels.cosine_reward"
    return [(module, "_reward_tile_kernel", tile, warps, label), (module, "_reward_finish_kernel", finish,
                                                                   finish_warps, label)]


def test_triton_kernel_compiles_for_gpu():
    # GRACE's P = 64 groups; G up to MAX_GROUP and H up to 4096, fp32 (what the trainer passes) and bf16 inputs,
    # one query per group or per rollout, odd H (no vector loads): no spills, the cosines on tensor cores (mma)
    builds = []
    for G, H, dtype, supervised, per_rollout in [(8, 1536, torch.float32, True, False),
                                                 (8, 1536, torch.bfloat16, True, False),
                                                 (64, 4096, torch.float32, True, True),
                                                 (64, 4096, torch.bfloat16, False, False),
                                                 (3, 1537, torch.float32, True, True),
                                                 (1, 1536, torch.float32, False, False),
                                                 (128, 1536, torch.float32, True, False)]:  # MAX_GROUP
        builds += reward_builds(64, G, H, dtype, supervised, per_rollout)
    results = compile_for_sm90(builds)
    assert_no_spills(results)
    for r in results:
        if r["kernel"] == "_reward_tile_kernel":
            assert "mma.sync" in r["ptx"] or "wgmma" in r["ptx"], r["label"]
    # the GRACE shape (fp32, 3xTF32): the redesign's figures, within a margin (see the module's _reward_blocks)
    grace = next(r for r in results if r["kernel"] == "_reward_tile_kernel" and r["label"] == "P=64 G=8 H=1536 fp32")
    assert grace["regs"] <= 168 and grace["shared_bytes"] <= 16384, grace
    assert 0 < k_step_instructions(grace["ptx"]) <= 300


def k_step_instructions(ptx):
    """PTX instructions of the longest loop body (the K loop): from a label to the branch back to it."""
    lines = [line.strip() for line in ptx.splitlines()]
    labels, longest = {}, 0
    for i, line in enumerate(lines):
        label = re.match(r"(\$\w+):", line)
        if label:
            labels[label.group(1)] = i
        branch = re.search(r"bra(?:\.uni)?\s+(\$\w+);", line)
        if branch and branch.group(1) in labels:
            body = lines[labels[branch.group(1)] + 1:i + 1]
            longest = max(longest, sum(1 for x in body if x and not x.startswith(("$", "//", ".", "{", "}"))))
    return longest
