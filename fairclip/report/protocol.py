"""A paper's table layout of a bias report (``protocol=<name>``, conf/protocol/): the columns
the paper reports, one row per query set and attribute, so numbers can be set beside it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fairclip.report.markdown import _table, fmt


def protocol_rows(report: Mapping[str, Any], protocol: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``[{query_set, attribute, <column>: value}]`` from the report's skew metrics."""
    columns: Mapping[str, str] = protocol["columns"]
    skew = report.get("metrics", {}).get("skew", {})
    attributes = report.get("settings", {}).get("attributes", {})
    rows = []
    for query_set, values in skew.items():
        for attribute in attributes:
            keys = {name: key.format(attribute=attribute) for name, key in columns.items()}
            if not any(k in values for k in keys.values()):
                continue  # a query set measured on another attribute
            row: dict[str, Any] = {"query_set": query_set, "attribute": attribute}
            row.update({name: values.get(key) for name, key in keys.items()})
            rows.append(row)
    return rows


def protocol_markdown(report: Mapping[str, Any], protocol: Mapping[str, Any]) -> str:
    """The rows of :func:`protocol_rows` as a markdown table under the paper's name."""
    columns = list(protocol["columns"])
    rows = protocol_rows(report, protocol)
    body = [[r["query_set"], r["attribute"], *(fmt(r[c], 4) for c in columns)] for r in rows]
    title = f"## Protocol {protocol['name']} ({protocol.get('paper', '')})"
    return "\n".join([title, "", *_table(["query set", "attribute", *columns], body)])
