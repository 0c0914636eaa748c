"""A paper's table layout of a bias report (``protocol=<name>``, conf/protocol/): the columns
the paper reports, so numbers can be set beside its tables.

A protocol has ``tables``, each with ``source`` (a dotted path under the report's
``metrics``, e.g. ``skew`` or ``folds.retrieval``), ``rows`` (``query_attribute``: the source
maps query sets to values, one row per query set and attribute; ``attribute``: the source
holds the values, one row per attribute) and ``columns`` (title -> metric key, with
``{attribute}`` filled in). A key whose ``<key>/ci`` is also reported prints as
``mean ± half-width``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from fairclip.report.markdown import _table, fmt

ROW_KINDS = ("query_attribute", "attribute")


def _source(metrics: Mapping[str, Any], path: str) -> Mapping[str, Any]:
    node: Any = metrics
    for part in path.split("."):
        node = node.get(part, {}) if isinstance(node, Mapping) else {}
    return node if isinstance(node, Mapping) else {}


def _cells(values: Mapping[str, Any], columns: Mapping[str, str], attribute: str) -> dict | None:
    keys = {title: key.format(attribute=attribute) for title, key in columns.items()}
    if not any(k in values for k in keys.values()):
        return None  # measured on another attribute (or not at all)
    return {title: (values.get(k), values.get(f"{k}/ci")) for title, k in keys.items()}


def protocol_rows(
    metrics: Mapping[str, Any], table: Mapping[str, Any], attributes: Sequence[str]
) -> list[dict[str, Any]]:
    """``[{query_set?, attribute, <column>: (value, ci or None)}]`` of one protocol table."""
    kind = table.get("rows", "query_attribute")
    if kind not in ROW_KINDS:
        raise ValueError(f"protocol table rows={kind!r}: expected one of {list(ROW_KINDS)}")
    source = _source(metrics, str(table["source"]))
    groups = source.items() if kind == "query_attribute" else [(None, source)]
    rows = []
    for query_set, values in groups:
        for attribute in attributes:
            cells = _cells(values, table["columns"], attribute)
            if cells is None:
                continue
            row: dict[str, Any] = {"attribute": attribute, **cells}
            if query_set is not None:
                row = {"query_set": query_set, **row}
            rows.append(row)
    return rows


def _value(cell: tuple[Any, Any]) -> str:
    value, ci = cell
    if ci is None or (isinstance(ci, float) and math.isnan(ci)):
        return fmt(value, 4)
    return f"{fmt(value, 4)} ± {fmt(ci, 4)}"


def _title(protocol: Mapping[str, Any]) -> str:
    title = f"## Protocol {protocol['name']} ({protocol.get('paper', '')})"
    return f"{title}\n\n{protocol['setting']}" if protocol.get("setting") else title


def protocol_markdown(report: Mapping[str, Any], protocol: Mapping[str, Any]) -> str:
    """Every table of ``protocol`` from one report, under the paper's name."""
    attributes = list(report.get("settings", {}).get("attributes", {}))
    lines = [_title(protocol)]
    for name, table in protocol["tables"].items():
        rows = protocol_rows(report.get("metrics", {}), table, attributes)
        columns = list(table["columns"])
        by_query = table.get("rows") != "attribute"
        lead = ["query_set", "attribute"] if by_query else ["attribute"]
        body = [[*(str(r[c]) for c in lead), *(_value(r[c]) for c in columns)] for r in rows]
        titles = [c.replace("_", " ") for c in lead]
        lines += ["", f"### {name}", "", *_table([*titles, *columns], body)]
    return "\n".join(lines)


def protocol_methods_markdown(
    per_seed: Sequence[Mapping[str, Mapping[str, Any]]],
    protocol: Mapping[str, Any],
    attribute: str,
) -> str:
    """The protocol's tables with one row per method (and query set) for ``attribute``.

    ``per_seed``: per seed, method -> its report's ``metrics``. With several seeds each cell is
    the mean over seeds of the value and of its half-width.
    """
    lines = [_title(protocol), "", f"Attribute: {attribute}."]
    methods = list(per_seed[0])
    for name, table in protocol["tables"].items():
        columns = list(table["columns"])
        by_query = table.get("rows") != "attribute"
        body = []
        for method in methods:
            seeds = [protocol_rows(run[method], table, [attribute]) for run in per_seed]
            for i, row in enumerate(seeds[0]):
                cells = [_mean_cell([s[i][c] for s in seeds]) for c in columns]
                lead = [method, row["query_set"]] if by_query else [method]
                body.append([*lead, *(_value(c) for c in cells)])
        lead_titles = ["method", "query set"] if by_query else ["method"]
        lines += ["", f"### {name}", "", *_table([*lead_titles, *columns], body)]
    return "\n".join(lines)


def _mean_cell(cells: Sequence[tuple[Any, Any]]) -> tuple[Any, Any]:
    def mean(xs: Sequence[Any]) -> Any:
        if any(x is None for x in xs):
            return None
        return sum(float(x) for x in xs) / len(xs)

    return mean([c[0] for c in cells]), mean([c[1] for c in cells])
