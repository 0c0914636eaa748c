"""The papers' evaluation protocols (conf/protocol/) against direct implementations of their
metrics on fixed scores, through the composed protocol config."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from scipy import stats

from fairclip.eval.run import evaluate_config as run_eval
from fairclip.eval.spec import spec_from_cfg
from fairclip.metrics import SkewMetrics
from fairclip.metrics.folds import FoldedRetrieval, FoldedZeroShot, FoldSpec, half_splits
from fairclip.report.protocol import protocol_markdown, protocol_methods_markdown, protocol_rows
from tests.conftest import compose_entry, compose_eval


def _berg_direct(
    scores: list[float], groups: list[int], k: int, target: str
) -> tuple[float, float]:
    """MaxSkew@k and NDKL@k of one query, written from Berg et al. 2022 (Geyik et al. 2019):
    rank by score (ties by index), shares of the top k, an absent group counts as 1/k for
    Skew; NDKL = (1/Z) sum_i KL(D_i || p*) / log2(i + 1), natural log, 0 log 0 = 0."""
    n = len(scores)
    order = sorted(range(n), key=lambda i: (-scores[i], i))
    present = sorted(set(groups))
    p_star = {a: (1 / len(present) if target == "eq_opp" else groups.count(a) / n) for a in present}
    top = [groups[i] for i in order[:k]]
    skews = []
    for a in present:
        share = top.count(a) / k or 1 / k
        skews.append(math.log(share / p_star[a]))
    max_skew = max(0.0, *skews)
    z = sum(1 / math.log2(i + 1) for i in range(1, k + 1))
    total = 0.0
    for i in range(1, k + 1):
        prefix = top[:i]
        kl = 0.0
        for a in present:
            d = prefix.count(a) / i
            if d > 0:
                kl += d * math.log(d / p_star[a])
        total += kl / math.log2(i + 1)
    return max_skew, total / z


def test_berg2022_equals_a_direct_implementation_at_k_1000(tmp_path: Path) -> None:
    cfg = compose_entry("eval", ["model.name=fairclip-tiny", "protocol=berg2022"], tmp_path)
    spec = spec_from_cfg(cfg)
    assert spec.skew_ks == (1000,) and set(spec.targets) == {"eq_opp", "dem_par"}
    g = torch.Generator().manual_seed(0)
    n, q = 1400, 3
    attributes = {"gender": ["female", "male"], "race": ["a", "b", "c", "d"]}
    gender = (torch.rand(n, generator=g) < 0.4).long()
    race = torch.multinomial(torch.tensor([0.6, 0.3, 0.09, 0.01]), n, True, generator=g)
    # scores that prefer one gender and one race, plus a group-free query
    scores = torch.randn(n, q, generator=g)
    scores[:, 0] += 0.8 * gender
    scores[:, 1] += 0.8 * (race == 1)
    metric = SkewMetrics(attributes, ks=spec.skew_ks, targets=spec.targets)
    metric.update(scores, torch.stack([gender, race], 1))
    got = {k: float(v) for k, v in metric.compute().items()}
    for attr, col in (("gender", gender), ("race", race)):
        for target in spec.targets:
            direct = [
                _berg_direct(scores[:, j].tolist(), col.tolist(), 1000, target) for j in range(q)
            ]
            want_max = sum(d[0] for d in direct) / q
            want_ndkl = sum(d[1] for d in direct) / q
            assert got[f"maxskew@1000/{attr}/{target}"] == pytest.approx(want_max, abs=1e-5)
            assert got[f"ndkl@1000/{attr}/{target}"] == pytest.approx(want_ndkl, abs=1e-5)

    # the paper's layout: one row per query set and attribute, the four columns
    protocol = OmegaConf.to_container(cfg.protocol)
    report = {"metrics": {"skew": {"concepts": got}}, "settings": {"attributes": attributes}}
    rows = protocol_rows(report["metrics"], protocol["tables"]["retrieval"], list(attributes))
    assert [(r["query_set"], r["attribute"]) for r in rows] == [
        ("concepts", "gender"),
        ("concepts", "race"),
    ]
    assert rows[1]["NDKL@1000 (prior)"] == (got["ndkl@1000/race/dem_par"], None)
    md = protocol_markdown(report, protocol)
    assert "## Protocol berg2022" in md and "| MaxSkew@1000 (uniform) |" in md


def test_berg2022_whole_ranking_equals_the_direct_ndkl_over_every_image(tmp_path: Path) -> None:
    cfg = compose_entry("eval", ["model.name=fairclip-tiny", "protocol=berg2022"], tmp_path)
    spec = spec_from_cfg(cfg)
    assert spec.whole_ranking
    g = torch.Generator().manual_seed(1)
    n = 300
    groups = torch.multinomial(torch.tensor([0.5, 0.3, 0.2]), n, True, generator=g)
    scores = torch.randn(n, 2, generator=g) + 0.7 * (groups == 2)[:, None]
    metric = SkewMetrics({"race": ["a", "b", "c"]}, ks=[50], targets=spec.targets,
                         whole_ranking=True)  # fmt: skip
    metric.update(scores, groups[:, None])
    got = metric.compute()
    for target in spec.targets:
        direct = [_berg_direct(scores[:, j].tolist(), groups.tolist(), n, target) for j in (0, 1)]
        want = sum(d[1] for d in direct) / 2
        assert float(got[f"ndkl@all/race/{target}"]) == pytest.approx(want, abs=1e-5)
    # the whole set has the dataset's own shares: no skew against its prior
    assert float(got["maxskew@all/race/dem_par"]) == pytest.approx(0.0, abs=1e-6)


# -- sem2026: the split-half protocol of SEM's main_eval.py -------------------------------------
def _kl_direct(top: list[int], prior: dict[int, float]) -> tuple[float, float]:
    """KL and MaxSkew of one retrieved list, written from the paper's definitions: shares of
    the retrieved groups, log(max(p/p*, 1e-10)), absent groups add 0 to KL."""
    kl, max_skew = 0.0, 0.0
    for a, p_star in prior.items():
        p = top.count(a) / len(top)
        log_ratio = math.log(max(p / p_star, 1e-10))
        if p > 0:
            kl += p * log_ratio
        max_skew = max(max_skew, log_ratio)
    return kl, max_skew


def _t_half_width(values: list[float]) -> float:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return sd / math.sqrt(n) * float(stats.t.ppf(0.975, n - 1))


def test_sem2026_retrieval_equals_a_direct_implementation(tmp_path: Path) -> None:
    cfg = compose_entry("eval", ["model.name=fairclip-tiny", "protocol=sem2026"], tmp_path)
    spec = spec_from_cfg(cfg)
    assert spec.folds == FoldSpec(n_folds=10, seed=42, k=500, confidence=0.95)
    g = torch.Generator().manual_seed(0)
    n, q = 1300, 4
    attributes = {"race": ["a", "b", "c", "d"], "hair": ["blond", "dark"]}
    race = torch.multinomial(torch.tensor([0.55, 0.3, 0.14, 0.01]), n, True, generator=g)
    race[:7] = -1  # unknown labels are left out of the ranking
    hair = (torch.rand(n, generator=g) < 0.3).long()
    scores = torch.randn(n, q, generator=g)
    scores[:, 0] += 1.0 * (race == 1)
    scores[:, 1] += 1.5 * (hair == 0)
    metric = FoldedRetrieval(attributes, spec.folds, ["race"], ("hair", ["dark"] * q))
    metric.update(scores, torch.stack([race, hair], 1))
    got = metric.compute()

    masks = half_splits(n, 10, 42)
    assert masks.sum(1).tolist() == [n - n // 2] * 10
    records: dict[str, list[float]] = {"kl": [], "max": [], "prec": []}
    for mask in masks:
        idx = [i for i in range(n) if mask[i]]
        labelled = [i for i in idx if race[i] >= 0]
        prior_counts = [int((race[labelled] == a).sum()) for a in range(4)]
        prior = {a: c / len(labelled) for a, c in enumerate(prior_counts) if c > 0}
        for j in range(q):
            ranked = sorted(labelled, key=lambda i: (-float(scores[i, j]), i))[:500]
            kl, mx = _kl_direct([int(race[i]) for i in ranked], prior)
            records["kl"].append(kl)
            records["max"].append(mx)
            ranked_all = sorted(idx, key=lambda i: (-float(scores[i, j]), i))[:500]
            records["prec"].append(sum(int(hair[i]) == 1 for i in ranked_all) / 500)
    for key, name in (
        ("kl", "kl@500/race"),
        ("max", "maxskew@500/race"),
        ("prec", "precision@500"),
    ):
        values = records[key]
        assert got[name] == pytest.approx(sum(values) / len(values), abs=1e-9)
        assert got[f"{name}/ci"] == pytest.approx(_t_half_width(values), rel=1e-6)
    skewed, plain = records["max"][0::q], records["max"][2::q]  # query 0 prefers race b
    assert sum(skewed) > 2 * sum(plain)


def test_sem2026_zero_shot_and_worst_group_equal_a_direct_implementation() -> None:
    g = torch.Generator().manual_seed(3)
    n = 400
    target = (torch.rand(n, generator=g) < 0.4).long()
    gender = (torch.rand(n, generator=g) < 0.5).long()
    # blond men are misclassified most: the worst (class, group) cell
    wrong = torch.rand(n, generator=g) < torch.where((target == 1) & (gender == 1), 0.6, 0.1)
    preds = torch.where(wrong, 1 - target, target)
    folds = FoldSpec(n_folds=5, seed=7, k=500)
    metric = FoldedZeroShot({"gender": ["female", "male"]}, 2, folds)
    metric.update(preds[:150], target[:150], gender[:150, None])  # two batches
    metric.update(preds[150:], target[150:], gender[150:, None])
    got = metric.compute()
    correct, cells = [], {}
    for mask in half_splits(n, 5, 7):
        for i in range(n):
            if mask[i]:
                c = float(preds[i] == target[i])
                correct.append(c)
                cells.setdefault((int(target[i]), int(gender[i])), []).append(c)
    assert got["acc"] == pytest.approx(sum(correct) / len(correct), abs=1e-12)
    assert got["acc/ci"] == pytest.approx(_t_half_width(correct), rel=1e-6)
    worst = min(cells, key=lambda c: sum(cells[c]) / len(cells[c]))
    assert worst == (1, 1)
    assert got["wg_acc/gender"] == pytest.approx(sum(cells[worst]) / len(cells[worst]), abs=1e-12)
    assert got["wg_acc/gender/ci"] == pytest.approx(_t_half_width(cells[worst]), rel=1e-6)


def test_half_splits_are_seeded_halves() -> None:
    a, b = half_splits(11, 4, 42), half_splits(11, 4, 42)
    assert torch.equal(a, b) and a.shape == (4, 11) and a.sum(1).tolist() == [6] * 4
    assert not torch.equal(a, half_splits(11, 4, 43))
    assert len({tuple(m.tolist()) for m in a}) == 4  # the folds differ
    with pytest.raises(ValueError, match="folds.k=0: expected a positive integer"):
        FoldSpec(k=0)


def test_sem2026_table_layout_prints_mean_and_half_width(tmp_path: Path) -> None:
    cfg = compose_entry("eval", ["model.name=fairclip-tiny", "protocol=sem2026"], tmp_path)
    protocol = OmegaConf.to_container(cfg.protocol, resolve=True)
    assert protocol["setting"].startswith("K = 500; 10 seeded 50/50 splits (seed 42)")
    metrics = {
        "folds": {
            "retrieval": {"stereotypes_sem": {"kl@500/gender": 0.1234, "kl@500/gender/ci": 0.01,
                                              "maxskew@500/gender": 0.3,
                                              "maxskew@500/gender/ci": 0.02}},
            "zeroshot": {"acc": 0.9, "acc/ci": 0.005, "wg_acc/gender": 0.7,
                         "wg_acc/gender/ci": 0.03},
        }
    }  # fmt: skip
    report = {"metrics": metrics, "settings": {"attributes": {"gender": ["female", "male"]}}}
    md = protocol_markdown(report, protocol)
    assert "| stereotypes_sem | gender | 0.1234 ± 0.0100 | 0.3000 ± 0.0200 | n/a |" in md
    assert "| gender | 0.9000 ± 0.0050 | 0.7000 ± 0.0300 |" in md
    by_method = protocol_methods_markdown([{"clip": metrics, "sem_b": metrics}], protocol, "gender")
    assert "| sem_b | stereotypes_sem | 0.1234 ± 0.0100 |" in by_method
    assert "| clip | 0.9000 ± 0.0050 | 0.7000 ± 0.0300 |" in by_method


def test_fairclip_eval_protocol_sem2026_reports_folds_beside_the_whole_split(
    trained_run: Path, synthetic_dir: Path, tmp_path: Path
) -> None:
    """`fairclip-eval protocol=sem2026` on the demo model: the split-half values sit beside the
    whole-split ones (folds of the same images: the accuracies agree closely) and protocol.md
    holds the paper's two tables."""
    overrides = [
        f"model.name={trained_run}", f"data.val_shards={synthetic_dir}/eval", "progress=false",
        "num_workers=0", "wandb.enabled=false", "plots=false", "protocol=sem2026", "folds.k=50",
    ]  # fmt: skip
    report = run_eval(compose_eval(overrides, tmp_path))
    folds = report["metrics"]["folds"]
    assert report["settings"]["folds"] == {"n_folds": 10, "seed": 42, "k": 50, "confidence": 0.95}
    zs = folds["zeroshot"]
    assert zs["acc"] == pytest.approx(report["metrics"]["zeroshot"]["acc"], abs=0.03)
    assert 0 < zs["acc/ci"] < 0.05 and zs["wg_acc/gender"] <= zs["acc"]
    concepts = folds["retrieval"]["concepts"]
    assert concepts["maxskew@50/gender"] >= 0 and concepts["kl@50/gender"] >= 0
    md = (tmp_path / "protocol.md").read_text()
    assert md.startswith("## Protocol sem2026 (Guimard et al. 2026)\n\nK = 50; 10 seeded")
    row = (
        f"| concepts | gender | {concepts['kl@50/gender']:.4f} ± {concepts['kl@50/gender/ci']:.4f}"
    )
    assert row in md and "### zero_shot" in md


def test_labelled_query_sets_check_their_relevance_labels(tmp_path: Path) -> None:
    """prompts=celeba_hair: one hair colour per query, each a value of data.attributes."""
    overrides = ["model.name=fairclip-tiny", "data=celeba_hair", "prompts=celeba_hair"]
    cfg = compose_entry("eval", [*overrides, "protocol=sem2026"], tmp_path)
    (hair,) = [q for q in spec_from_cfg(cfg).query_sets if q.name == "hair_colour"]
    assert hair.relevant == ("hair_colour", ("blond", "black", "brown", "gray"))
    bad = compose_entry(
        "eval", [*overrides, "prompts.query_sets.hair_colour.relevant.values=[blond,red]"], tmp_path
    )
    with pytest.raises(ValueError, match=r"relevant.values: expected one value per prompt \(4\)"):
        spec_from_cfg(bad)
