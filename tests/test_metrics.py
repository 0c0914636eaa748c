"""Value tests for fairclip.metrics: hand-computed cases and a literal port of the reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fairclip.metrics import (
    CramersV,
    GroupZeroShotAccuracy,
    ModelBias,
    RetrievalRecall,
    SkewMetrics,
    able,
    association_bias,
    cramers_v,
    max_skew,
    min_skew,
    ndkl,
    paired_ranks,
    representation_bias,
    skew,
    stable_topk,
)

LN = math.log


def approx(x: torch.Tensor | float, rel: float = 1e-6, abs_: float = 1e-7):
    return pytest.approx(x, rel=rel, abs=abs_)


# --------------------------------------------------------------------------------------
# Literal port of oxai/debias-vision-lang debias_clip/measuring_bias.py (loop-based,
# numpy instead of pandas). `nlargest(keep="all")` equals a stable descending sort when
# scores have no ties, which holds for the random floats used against it.
# --------------------------------------------------------------------------------------
def _ref_top(scores: np.ndarray, top_n: int) -> np.ndarray:
    return np.argsort(-scores, kind="stable")[:top_n]


def ref_ndkl(scores: np.ndarray, labels: np.ndarray, top_n: int) -> dict[str, float]:
    def kl_divergence(p, q):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.sum(np.where(p != 0, p * (np.log(p) - np.log(q)), 0))

    result = {"eq_opp": 0.0, "dem_par": 0.0}
    uniq, counts = np.unique(labels, return_counts=True)
    label_counts = list(counts)
    desired = {
        "eq_opp": np.array([1 / len(label_counts) for _ in label_counts]),
        "dem_par": np.array([max(c, 1) / len(labels) for c in label_counts]),
    }
    top_counts = np.zeros(len(label_counts))
    for index, row in enumerate(_ref_top(scores, top_n), start=1):
        top_counts[int(labels[row])] += 1
        for name, dist in desired.items():
            result[name] += kl_divergence(top_counts / index, dist) / math.log2(index + 1)
    z = sum(1 / math.log2(i + 1) for i in range(1, top_n + 1))
    return {name: v / z for name, v in result.items()}


def ref_maxskew(scores: np.ndarray, labels: np.ndarray, top_n: int) -> dict[str, float]:
    result = {"eq_opp": 0.0, "dem_par": 0.0}
    uniq, counts = np.unique(labels, return_counts=True)
    top_labels = labels[_ref_top(scores, top_n)]
    for label_class, label_count in zip(uniq, counts, strict=True):
        dists = {"eq_opp": 1 / len(uniq), "dem_par": label_count / len(labels)}
        p_positive = np.sum(top_labels == label_class) / top_n
        if p_positive == 0:
            p_positive = 1 / top_n
        for name, dist in dists.items():
            result[name] = max(result[name], math.log(p_positive) - math.log(dist))
    return result


@pytest.mark.parametrize("seed", range(6))
def test_skew_ndkl_match_reference_port(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(8, 60, (1,), generator=gen))
    m = int(torch.randint(2, 5, (1,), generator=gen))
    q = 5
    labels = torch.cat([torch.arange(m), torch.randint(0, m, (n - m,), generator=gen)])
    labels = labels[torch.randperm(n, generator=gen)]
    # skew the ranking towards group 0 so values are far from 0
    scores = torch.randn(n, q, generator=gen) + 0.7 * (labels == 0).float().unsqueeze(1)
    ks = sorted({1, 3, n // 2, n})
    metric = SkewMetrics({"g": [str(i) for i in range(m)]}, ks=ks)
    metric.update(scores[: n // 3], labels[: n // 3, None])
    metric.update(scores[n // 3 :], labels[n // 3 :, None])
    per_query = metric.compute_per_query()
    for k in ks:
        for j in range(q):
            s, lab = scores[:, j].double().numpy(), labels.numpy()
            ref_s, ref_n = ref_maxskew(s, lab, k), ref_ndkl(s, lab, k)
            for t in ("eq_opp", "dem_par"):
                assert per_query[f"maxskew@{k}/g/{t}"][j].item() == approx(ref_s[t], rel=1e-5)
                assert per_query[f"ndkl@{k}/g/{t}"][j].item() == approx(ref_n[t], rel=1e-5)
        # functional API agrees with the metric
        for t in ("eq_opp", "dem_par"):
            torch.testing.assert_close(
                max_skew(scores, labels, k, t).float(), per_query[f"maxskew@{k}/g/{t}"]
            )
            torch.testing.assert_close(
                ndkl(scores, labels, k, t).float(), per_query[f"ndkl@{k}/g/{t}"]
            )
            torch.testing.assert_close(
                min_skew(scores, labels, k, t).float(), per_query[f"minskew@{k}/g/{t}"]
            )
    means = metric.compute()
    for key, v in per_query.items():
        assert means[key].item() == approx(v.mean().item())


def test_stable_topk_ties_and_signed_zero() -> None:
    s = torch.tensor([0.5, -1.0, 0.5, -0.0, 0.0, -2.0, float("inf"), -float("inf")])
    assert stable_topk(s[:, None], 8)[0].tolist() == [6, 0, 2, 3, 4, 1, 5, 7]
    gen = torch.Generator().manual_seed(0)
    tied = torch.randint(-3, 4, (50, 7), generator=gen).float() / 2  # many ties
    expected = torch.sort(tied.T, dim=1, descending=True, stable=True).indices[:, :20]
    assert torch.equal(stable_topk(tied, 20), expected)
    mixed = torch.randn(50, 4, generator=gen)
    mixed[:, 1] = tied[:, 1]  # one query takes the exact path, the others the fast path
    expected = torch.sort(mixed.T, dim=1, descending=True, stable=True).indices[:, :10]
    assert torch.equal(stable_topk(mixed, 10), expected)
    with pytest.raises(ValueError, match="k"):
        stable_topk(tied, 51)


def test_ties_break_by_index() -> None:
    # top-2 by index is images 0 and 1 (one per group): balanced -> no skew; any other
    # tie-breaking among the three tied images could pick two of group 1 instead.
    scores = torch.tensor([[1.0], [1.0], [1.0], [0.0]])
    groups = torch.tensor([0, 1, 1, 0])
    assert max_skew(scores, groups, 2).item() == 0.0
    assert min_skew(scores, groups, 2).item() == 0.0
    # NDKL@2: top-1 = (1, 0) -> KL = ln 2, top-2 = (1/2, 1/2) -> 0
    z = 1 + 1 / math.log2(3)
    assert ndkl(scores, groups, 2).item() == approx(LN(2) / z)


def test_absent_group_counts_as_one_over_k_and_targets() -> None:
    scores = torch.arange(6, 0, -1).float()  # ranking = index order
    groups = torch.tensor([0, 0, 0, 0, 1, 2])  # prior (2/3, 1/6, 1/6)
    # top-4 is all group 0; groups 1 and 2 absent -> share 1/4
    s_eq = skew(scores, groups, 4, "eq_opp")
    s_dp = skew(scores, groups, 4, "dem_par")
    torch.testing.assert_close(s_eq, torch.tensor([LN(3), LN(0.75), LN(0.75)], dtype=torch.float64))
    torch.testing.assert_close(s_dp, torch.tensor([LN(1.5)] * 3, dtype=torch.float64))
    assert max_skew(scores, groups, 4, "eq_opp").item() == approx(LN(3))
    assert min_skew(scores, groups, 4, "eq_opp").item() == approx(LN(0.75))
    assert max_skew(scores, groups, 4, "dem_par").item() == approx(LN(1.5))
    assert min_skew(scores, groups, 4, "dem_par").item() == approx(LN(1.5))
    # NDKL: every prefix is (1, 0, 0); zero shares add nothing to KL (0 log 0 = 0)
    assert ndkl(scores, groups, 4, "eq_opp").item() == approx(LN(3))
    assert ndkl(scores, groups, 4, "dem_par").item() == approx(LN(1.5))


def test_k_larger_than_set_is_clipped() -> None:
    scores = torch.tensor([3.0, 2.0, 1.0])
    groups = torch.tensor([0, 1, 1])
    # k = 10 -> k = 3: shares (1/3, 2/3)
    assert max_skew(scores, groups, 10, "eq_opp").item() == approx(LN(4 / 3))
    assert max_skew(scores, groups, 10, "dem_par").item() == approx(0.0)
    z = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    kl2 = 0.5 * LN(0.5 / (1 / 3)) + 0.5 * LN(0.5 / (2 / 3))
    expected = (LN(3) / 1 + kl2 / math.log2(3) + 0.0) / z
    assert ndkl(scores, groups, 10, "dem_par").item() == approx(expected)
    metric = SkewMetrics({"g": ["a", "b"]}, ks=(10,))
    metric.update(scores[:, None], groups[:, None])
    out = metric.compute()
    assert out["maxskew@10/g/eq_opp"].item() == approx(LN(4 / 3))
    assert out["ndkl@10/g/dem_par"].item() == approx(expected)


def test_unknown_groups_excluded_and_absent_values_skipped() -> None:
    attrs = {"gender": ["f", "m"], "race": ["a", "b", "c"]}
    scores = torch.tensor([[9.0], [3.0], [2.0], [1.0], [0.5]])
    # image 0 has the top score but unknown gender; race value "c" never occurs
    groups = torch.tensor([[-1, 0], [0, 0], [1, 1], [0, 1], [1, 0]])
    metric = SkewMetrics(attrs, ks=(2,))
    metric.update(scores, groups)
    out = metric.compute()
    # gender ranking: images 1..4 -> top-2 groups (0, 1): balanced
    assert out["maxskew@2/gender/eq_opp"].item() == approx(0.0)
    # race ranking: images 0..4 -> top-2 groups (0, 0); eq_opp uniform over {a, b} only
    assert out["maxskew@2/race/eq_opp"].item() == approx(LN(1 / 0.5))
    assert out["minskew@2/race/eq_opp"].item() == approx(LN(0.5 / 0.5))
    assert out["maxskew@2/race/dem_par"].item() == approx(LN(1 / 0.6))


def test_skew_metrics_streaming_invariance_and_keys() -> None:
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(40, 6, generator=gen)
    groups = torch.stack(
        [torch.randint(-1, 2, (40,), generator=gen), torch.randint(0, 3, (40,), generator=gen)], 1
    )
    attrs = {"gender": ["f", "m"], "race": ["a", "b", "c"]}
    one, many = SkewMetrics(attrs, ks=(5, 20)), SkewMetrics(attrs, ks=(5, 20))
    one.update(scores, groups)
    for i in range(0, 40, 7):
        many.update(scores[i : i + 7], groups[i : i + 7])
    a, b = one.compute(), many.compute()
    assert list(a) == list(b)
    assert len(a) == 3 * 2 * 2 * 2
    for key in a:
        assert torch.equal(a[key], b[key]), key
    per_q = one.compute_per_query("race")
    assert set(per_q) == {k for k in a if "/race/" in k}
    assert all(v.shape == (6,) for v in per_q.values())


def test_skew_metrics_errors() -> None:
    attrs = {"gender": ["f", "m"]}
    with pytest.raises(ValueError, match="ks"):
        SkewMetrics(attrs, ks=(10, 0))
    with pytest.raises(ValueError, match="ks"):
        SkewMetrics(attrs, ks=())
    with pytest.raises(ValueError, match="targets"):
        SkewMetrics(attrs, targets=("eq_opp", "parity"))
    with pytest.raises(ValueError, match=r"attributes\['race'\]"):
        SkewMetrics({"gender": ["f", "m"], "race": []})
    with pytest.raises(ValueError, match="attributes"):
        SkewMetrics({})
    metric = SkewMetrics(attrs, ks=(1,))
    with pytest.raises(ValueError, match="groups"):
        metric.update(torch.randn(4, 3), torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="groups"):
        metric.update(torch.randn(4, 3), torch.zeros(5, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="groups"):
        metric.update(torch.randn(4, 3), torch.full((4, 1), 2))
    with pytest.raises(ValueError, match="scores"):
        metric.update(torch.randn(4), torch.zeros(4, 1, dtype=torch.long))
    metric.update(torch.randn(4, 3), torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="3 queries"):
        metric.update(torch.randn(4, 2), torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown attribute 'race'"):
        metric.compute_per_query("race")
    metric.reset()  # a new run may use another query set
    metric.update(torch.randn(4, 2), torch.zeros(4, 1, dtype=torch.long))
    assert metric.compute_per_query()["ndkl@1/gender/eq_opp"].shape == (2,)
    with pytest.raises(ValueError, match="k"):
        max_skew(torch.randn(4), torch.zeros(4, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="target"):
        ndkl(torch.randn(4), torch.zeros(4, dtype=torch.long), 2, "nope")
    with pytest.raises(ValueError, match="summing to 1"):
        ndkl(torch.randn(4), torch.tensor([0, 1, 0, 1]), 2, torch.tensor([0.9, 0.9]))


def test_explicit_target_tensor() -> None:
    scores = torch.arange(6, 0, -1).float()
    groups = torch.tensor([0, 0, 0, 0, 1, 2])
    uniform = torch.full((3,), 1 / 3)
    assert max_skew(scores, groups, 4, uniform).item() == approx(LN(3))
    assert ndkl(scores, groups, 4, torch.tensor([1.0, 0.0, 0.0])).item() == approx(0.0)


# --------------------------------------------------------------------------------------
# Zero-shot accuracy
# --------------------------------------------------------------------------------------
def test_group_zero_shot_accuracy() -> None:
    attrs = {"gender": ["f", "m"], "race": ["a", "b", "c"]}
    metric = GroupZeroShotAccuracy(num_classes=3, attributes=attrs)
    preds = torch.tensor([0, 1, 2, 0, 1, 1])
    target = torch.tensor([0, 1, 1, 1, 1, 0])  # hits: 1 1 0 0 1 0
    groups = torch.tensor([[0, 0], [0, 0], [1, -1], [1, 2], [-1, 2], [0, 0]])
    metric.update(preds[:3], target[:3], groups[:3])
    metric.update(preds[3:], target[3:], groups[3:])
    out = metric.compute()
    assert out["acc"].item() == approx(0.5)
    assert out["acc/gender=f"].item() == approx(2 / 3)
    assert out["acc/gender=m"].item() == approx(0.0)
    assert out["worst_group_acc/gender"].item() == approx(0.0)
    assert out["group_gap/gender"].item() == approx(2 / 3)
    assert out["acc/race=a"].item() == approx(2 / 3)
    assert math.isnan(out["acc/race=b"].item())  # no sample: NaN, excluded from worst/gap
    assert out["acc/race=c"].item() == approx(0.5)
    assert out["worst_group_acc/race"].item() == approx(0.5)
    assert out["group_gap/race"].item() == approx(2 / 3 - 0.5)


def test_group_zero_shot_accuracy_errors() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        GroupZeroShotAccuracy(0, {"g": ["a"]})
    metric = GroupZeroShotAccuracy(2, {"g": ["a", "b"]})
    with pytest.raises(ValueError, match="preds"):
        metric.update(torch.tensor([0, 2]), torch.tensor([0, 1]), torch.tensor([[0], [1]]))
    with pytest.raises(ValueError, match="target"):
        metric.update(torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([[0], [1]]))
    with pytest.raises(ValueError, match="groups"):
        metric.update(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([[0], [-2]]))


# --------------------------------------------------------------------------------------
# Retrieval
# --------------------------------------------------------------------------------------
def test_retrieval_recall_known_permutation() -> None:
    n = 5
    perm = torch.tensor([0, 2, 1, 4, 3])  # only pair 0 is a fixed point
    img = torch.eye(n) * 3.0  # scale must not matter (normalised inside)
    txt = torch.eye(n)[perm] + 0.5 * torch.eye(n)
    # caption i is closest to image perm[i], its own image is 2nd (and vice versa)
    metric = RetrievalRecall(ks=(1, 2, 10))
    metric.update(img[:2], txt[:2])
    metric.update(img[2:], txt[2:])
    out = metric.compute()
    for d in ("i2t", "t2i"):
        assert out[f"{d}_R@1"].item() == approx(1 / n)
        assert out[f"{d}_R@2"].item() == approx(1.0)
        assert out[f"{d}_R@10"].item() == approx(1.0)  # k > N


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_paired_ranks_match_brute_force_with_ties(chunk_size: int) -> None:
    gen = torch.Generator().manual_seed(chunk_size)
    for _ in range(5):
        n = int(torch.randint(1, 30, (1,), generator=gen))
        q = torch.randint(-2, 3, (n, 3), generator=gen).float()  # small ints: many exact ties
        g = torch.randint(-2, 3, (n, 3), generator=gen).float()
        sims = q @ g.T
        idx = torch.arange(n)
        expected = [
            int(((sims[i] > sims[i, i]) | ((sims[i] == sims[i, i]) & (idx < i))).sum())
            for i in range(n)
        ]
        assert paired_ranks(q, g, chunk_size).tolist() == expected


def test_retrieval_recall_ties_break_by_index() -> None:
    metric = RetrievalRecall(ks=(1, 2))
    emb = torch.ones(4, 3)
    metric.update(emb, emb)  # all similarities tie: pair i has rank i
    out = metric.compute()
    assert out["i2t_R@1"].item() == approx(0.25)
    assert out["t2i_R@2"].item() == approx(0.5)
    with pytest.raises(ValueError, match="text_emb"):
        metric.update(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="ks"):
        RetrievalRecall(ks=(0,))


# --------------------------------------------------------------------------------------
# RB / AB / ModelBias / Cramér's V / ABLE
# --------------------------------------------------------------------------------------
def test_representation_and_association_bias() -> None:
    assert representation_bias(torch.tensor([3, 1]), 4, torch.tensor([0.5, 0.5])).item() == approx(
        0.25
    )
    joint = torch.tensor([[2.0, 1.0], [0.0, 1.0]])
    ab = association_bias(joint, torch.tensor([3.0, 1.0]), torch.tensor([2.0, 2.0]), 4.0)
    assert ab.item() == approx(2 / 3)
    # an empty group column and a column covering everyone (zero denominators) contribute 0
    joint2 = torch.cat([joint, torch.zeros(1, 2), torch.tensor([[2.0, 2.0]])])
    ab2 = association_bias(joint2, torch.tensor([3.0, 1.0, 0.0, 4.0]), torch.tensor([2.0, 2.0]), 4)
    assert ab2.item() == approx(2 / 3)
    # weighted counts: halving every weight changes nothing
    assert association_bias(
        joint / 2, torch.tensor([1.5, 0.5]), torch.tensor([1.0, 1.0]), 2.0
    ).item() == approx(2 / 3)
    with pytest.raises(ValueError, match="target"):
        representation_bias(torch.tensor([3, 1]), 4, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="group_counts"):
        association_bias(joint, torch.tensor([3.0]), torch.tensor([2.0, 2.0]), 4)
    with pytest.raises(ValueError, match="label_counts"):
        association_bias(joint, torch.tensor([3.0, 1.0]), torch.tensor([2.0]), 4)


def test_model_bias() -> None:
    attrs = {"g": ["a", "b"], "h": ["x", "y", "z"]}
    pred_groups = torch.tensor([[0, 0], [0, 1], [0, -1], [1, 2], [-1, 2]])
    true_groups = torch.tensor([[0, 0], [1, 0], [1, 1], [1, -1], [-1, 2]])
    pred_classes = torch.tensor([0, 0, 1, 0, 1])
    eq, dp = ModelBias(attrs, 2, "eq_opp"), ModelBias(attrs, 2, target="dem_par")
    for metric in (eq, dp):
        metric.update(pred_groups[:2], true_groups[:2], pred_classes[:2])
        metric.update(pred_groups[2:], true_groups[2:], pred_classes[2:])
    out_eq, out_dp = eq.compute(), dp.compute()
    # g: predicted shares (3/4, 1/4); true prior (1/4, 3/4)
    assert out_eq["rb/g"].item() == approx(0.25)
    assert out_dp["rb/g"].item() == approx(0.5)
    # g: joint true x pred class = [[1, 0], [2, 1]] -> AB = 1/3
    assert out_eq["ab/g"].item() == approx(1 / 3)
    # h: predicted (1, 1, 2)/4 vs uniform -> 1/6
    assert out_eq["rb/h"].item() == approx(0.5 - 1 / 3)
    # h: joint [[2, 0], [0, 1], [0, 1]] -> AB = |1 - 0| = 1
    assert out_dp["ab/h"].item() == approx(1.0)
    with pytest.raises(ValueError, match="target"):
        ModelBias(attrs, 2, target="uniform")
    with pytest.raises(ValueError, match="true_groups"):
        eq.update(pred_groups, true_groups[:, :1], pred_classes)


def test_cramers_v() -> None:
    table = torch.tensor([[10, 20], [30, 5]])
    direct = abs(10 * 5 - 20 * 30) / math.sqrt(30 * 35 * 40 * 25)  # 2x2: |ad - bc| / sqrt(...)
    assert cramers_v(table).item() == approx(direct)
    big = torch.tensor([[12, 0, 7, 3], [0, 0, 0, 0], [4, 0, 9, 11], [6, 0, 2, 8]])
    reduced = big[[0, 2, 3]][:, [0, 2, 3]].double()
    n = reduced.sum()
    expected = reduced.sum(1, keepdim=True) * reduced.sum(0, keepdim=True) / n
    chi2 = ((reduced - expected) ** 2 / expected).sum()
    direct = math.sqrt(chi2 / (n * 2))
    assert cramers_v(big).item() == approx(direct)
    scipy_stats = pytest.importorskip("scipy.stats")
    ref = scipy_stats.contingency.association(
        reduced.long().numpy(), method="cramer", correction=False
    )
    assert cramers_v(big).item() == approx(ref)
    # the Metric builds the same table
    g, c = big.nonzero(as_tuple=True)
    reps = big[g, c]
    metric = CramersV(num_groups=4, num_classes=4)
    metric.update(g.repeat_interleave(reps), c.repeat_interleave(reps))
    metric.update(torch.tensor([-1, -1]), torch.tensor([0, 1]))  # unknown group: skipped
    assert metric.compute().item() == approx(direct, rel=1e-6)
    assert cramers_v(torch.tensor([[5, 0], [7, 0]])).item() == 0.0  # one class: no association
    with pytest.raises(ValueError, match="classes"):
        metric.update(torch.tensor([0]), torch.tensor([4]))


def test_able() -> None:
    assert able(0.8, LN(2)).item() == approx(2 / (1 / 0.8 + 1 / 0.5))
    assert able(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="accuracy"):
        able(80.0, 0.1)


def test_class_group_cells_reveal_stereotype_errors_that_cancel_per_group() -> None:
    from fairclip.metrics import GroupZeroShotAccuracy

    # doctor=0, nurse=1; gender female=0, male=1. Female doctors -> nurse, male nurses -> doctor.
    target = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    gender = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    preds = torch.tensor([1, 0, 0, 0, 1, 1, 0, 1])
    metric = GroupZeroShotAccuracy(2, {"gender": ["female", "male"]})
    metric.update(preds, target, gender.unsqueeze(1))
    out = metric.compute()
    assert out["group_gap/gender"].item() == pytest.approx(0.0)  # per gender: 3/4 vs 3/4
    assert out["worst_class_group_acc/gender"].item() == pytest.approx(0.5)
    assert out["class_group_gap/gender"].item() == pytest.approx(0.5)  # mean(|0.5-1|, |1-0.5|)
    # rows: doctor, nurse; columns: female, male
    assert metric.cell_accuracy()["gender"].tolist() == [[0.5, 1.0], [1.0, 0.5]]
