"""The papers' evaluation protocols (conf/protocol/) against direct implementations of their
metrics on fixed scores, through the composed protocol config."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fairclip.eval.spec import spec_from_cfg
from fairclip.metrics import SkewMetrics
from fairclip.report.protocol import protocol_markdown, protocol_rows
from tests.conftest import compose_entry


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
    protocol = dict(cfg.protocol)
    report = {"metrics": {"skew": {"concepts": got}}, "settings": {"attributes": attributes}}
    rows = protocol_rows(report, protocol)
    assert [(r["query_set"], r["attribute"]) for r in rows] == [
        ("concepts", "gender"),
        ("concepts", "race"),
    ]
    assert rows[1]["NDKL@1000 (prior)"] == got["ndkl@1000/race/dem_par"]
    md = protocol_markdown(report, protocol)
    assert "## Protocol berg2022" in md and "| MaxSkew@1000 (uniform) |" in md
