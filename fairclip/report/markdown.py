"""Markdown renderings of a report and of a comparison (tables a human reads first)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from fairclip.report.io import flatten_metrics, headline_keys


def fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{float(value):.{digits}f}"


def fmt_delta(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:+.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def report_markdown(report: Mapping[str, Any], plots: Mapping[str, str] | None = None) -> str:
    """The report as markdown: headline, per-group accuracy, skew, model bias, ABLE, data."""
    m = report.get("metrics", {})
    settings = report.get("settings", {})
    attributes: dict[str, list[str]] = settings.get("attributes", {})
    model = report.get("model", {})
    lines = [
        f"# Bias report: {model.get('spec') or model.get('name') or 'model'}",
        "",
        f"Created {report.get('created', '?')}; model `{model.get('name', '?')}`"
        + (f", pretrained `{model['pretrained']}`" if model.get("pretrained") else "")
        + f". Skew k = {settings.get('skew_ks')}, targets p* = {settings.get('targets')} "
        "(eq_opp: uniform over groups, dem_par: the split's own group shares).",
        "",
        "## Headline",
        "",
    ]
    flat = flatten_metrics(report)
    lines += _table(["metric", "value"], [[f"`{k}`", fmt(flat[k])] for k in headline_keys(report)])

    if "zeroshot" in m:
        zs = m["zeroshot"]
        lines += ["## Zero-shot accuracy per group", ""]
        rows = []
        for attr, values in attributes.items():
            counts = report["splits"].get("eval", {}).get("group_counts", {}).get(attr, {})
            for v in values:
                rows.append([attr, v, fmt(zs.get(f"acc/{attr}={v}")), str(counts.get(v, "?"))])
            rows.append(
                [
                    attr,
                    "**worst / gap**",
                    f"{fmt(zs.get(f'worst_group_acc/{attr}'))} / {fmt(zs.get(f'group_gap/{attr}'))}",
                    "",
                ]
            )
            if f"class_group_gap/{attr}" in zs:
                rows.append(
                    [
                        attr,
                        "**worst (class, value) cell / mean in-class gap**",
                        f"{fmt(zs.get(f'worst_class_group_acc/{attr}'))} / "
                        f"{fmt(zs.get(f'class_group_gap/{attr}'))}",
                        "",
                    ]
                )
        lines += [f"Overall accuracy {fmt(zs.get('acc'))}.", ""]
        lines += _table(["attribute", "value", "accuracy", "images"], rows)
        for attr, by_concept in report.get("cells", {}).items():
            values = attributes.get(attr, [])
            lines += [f"Zero-shot accuracy per (concept, {attr}) cell:", ""]
            lines += _table(
                ["concept", *values],
                [[c, *(fmt(acc.get(v)) for v in values)] for c, acc in by_concept.items()],
            )

    if "retrieval" in m:
        lines += ["## Retrieval recall (paired captions)", ""]
        lines += _table(["metric", "value"], [[k, fmt(v)] for k, v in m["retrieval"].items()])

    for name, values in m.get("skew", {}).items():
        q = report.get("queries", {}).get(name, {})
        lines += [
            f"## Retrieval skew: `{name}` ({len(q.get('prompts', []))} queries on the "
            f"{q.get('split', '?')} split, mean over queries)",
            "",
        ]
        rows = []
        for attr in q.get("attributes", []):
            for k in settings.get("skew_ks", []):
                for t in settings.get("targets", []):
                    rows.append(
                        [
                            attr,
                            str(k),
                            t,
                            fmt(values.get(f"maxskew@{k}/{attr}/{t}")),
                            fmt(values.get(f"minskew@{k}/{attr}/{t}")),
                            fmt(values.get(f"ndkl@{k}/{attr}/{t}")),
                        ]
                    )
        lines += _table(["attribute", "k", "target", "MaxSkew", "MinSkew", "NDKL"], rows)
        k0 = settings.get("skew_ks", [None])[0]
        for attr in q.get("attributes", [])[:1]:
            per = q.get("values", {}).get(f"maxskew@{k0}/{attr}/eq_opp")
            if per:
                top = sorted(range(len(per)), key=lambda i: -(per[i] or 0.0))[:5]
                lines += [f"Most skewed queries (MaxSkew@{k0}, {attr}, eq_opp):", ""]
                lines += [f"- `{q['prompts'][i]}`: {fmt(per[i])}" for i in top] + [""]

    if "bias" in m:
        b = m["bias"]
        lines += [
            "## Model bias (zero-shot predictions on the neutral split)",
            "",
            "RB: predicted group shares vs p*; AB: true group vs predicted class "
            f"(classes: {', '.join(settings.get('association_words', [])[:12])}"
            f"{' ...' if len(settings.get('association_words', [])) > 12 else ''}); "
            "Cramér's V: group vs predicted class.",
            "",
        ]
        rows = [
            [
                attr,
                *[fmt(b.get(f"rb/{attr}/{t}")) for t in settings.get("targets", [])],
                fmt(b.get(f"ab/{attr}")),
                fmt(b.get(f"cramers_v/{attr}")),
            ]
            for attr in attributes
        ]
        header = ["attribute", *[f"RB ({t})" for t in settings.get("targets", [])], "AB", "V"]
        lines += _table(header, rows)

    if "able" in m:
        lines += [
            f"## ABLE (accuracy vs exp(-MaxSkew) of `{settings.get('able_query_set')}`)",
            "",
        ]
        lines += _table(["metric", "value"], [[k, fmt(v)] for k, v in m["able"].items()])

    lines += ["## Data", ""]
    rows = []
    for split, info in report.get("splits", {}).items():
        groups = "; ".join(
            f"{a}: " + ", ".join(f"{v}={n}" for v, n in c.items())
            for a, c in info.get("group_counts", {}).items()
        )
        rows.append(
            [
                split,
                str(info.get("images")),
                str(info.get("skipped")),
                groups,
                f"`{info.get('shards')}`",
            ]
        )
    lines += _table(["split", "images", "skipped", "group counts", "shards"], rows)
    for title, rel in (plots or {}).items():
        lines += [f"![{title}]({rel})", ""]
    return "\n".join(lines)


def comparison_markdown(
    reports: Sequence[Mapping[str, Any]],
    labels: Sequence[str],
    plot: str | None = None,
) -> str:
    """Side-by-side table of every shared metric, with the change from the first run."""
    flats = [flatten_metrics(r) for r in reports]
    headline = headline_keys(reports[0])
    shared = [k for k in flats[0] if all(k in f for f in flats[1:])]
    lines = ["# Bias report comparison", ""]
    lines += _table(
        ["run", "model", "report"],
        [
            [label, f"`{r.get('model', {}).get('spec', '?')}`", f"`{r.get('source', '?')}`"]
            for label, r in zip(labels, reports, strict=True)
        ],
    )
    delta_head = f"Δ ({labels[-1]} − {labels[0]})"

    def rows(keys: Sequence[str]) -> list[list[str]]:
        out = []
        for k in keys:
            vals = [f[k] for f in flats]
            delta = vals[-1] - vals[0]
            out.append([f"`{k}`", *[fmt(v) for v in vals], fmt_delta(delta)])
        return out

    lines += ["## Headline", ""]
    lines += _table(["metric", *labels, delta_head], rows([k for k in headline if k in shared]))
    if plot:
        lines += [f"![comparison]({plot})", ""]
    lines += ["## All shared metrics", ""]
    lines += _table(["metric", *labels, delta_head], rows(shared))
    return "\n".join(lines)
