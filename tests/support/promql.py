"""Find the metric names a PromQL expression reads (for the dashboard / alert rules checks).

A small lexer, not a parser: the real Prometheus parses the same expressions in the
integration tests, so syntax errors are caught there; this only has to tell metric names from
functions, keywords, label names and durations.
"""

from __future__ import annotations

import re

# Functions and aggregations are recognised by the "(" that follows them; these keywords are not.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
KEYWORDS |= {"and", "or", "unless", "atan2", "inf", "nan"}
# Aggregations may put their `by (...)` before the "(": `sum by (phase) (x)`.
KEYWORDS |= {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values"}
KEYWORDS |= {"bottomk", "topk", "quantile", "limitk", "limit_ratio"}
LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}

_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_NUMBER = re.compile(r"[0-9.][0-9A-Za-z.]*")
_GRAFANA_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*$")


def _skip_string(expr: str, i: int) -> int:
    quote = expr[i]
    i += 1
    while i < len(expr) and expr[i] != quote:
        i += 2 if expr[i] == "\\" else 1
    return i + 1


def _skip_group(expr: str, i: int, close: str) -> int:
    """From an opening bracket at i, return the index after its closing bracket."""
    i += 1
    while i < len(expr) and expr[i] != close:
        i = _skip_string(expr, i) if expr[i] in "\"'`" else i + 1
    if i >= len(expr):
        raise ValueError(f"unbalanced {close!r} in {expr!r}")
    return i + 1


def metric_names(expr: str) -> set[str]:
    """Metric names in `expr` (a Grafana `label_values(metric, label)` query is understood too)."""
    grafana = _GRAFANA_LABEL_VALUES.match(expr)
    if grafana:
        expr = grafana.group(1)
    names: set[str] = set()
    i = 0
    while i < len(expr):
        char = expr[i]
        if char in "\"'`":
            i = _skip_string(expr, i)
        elif char == "{":
            i = _skip_group(expr, i, "}")  # label matchers
        elif char == "[":
            i = _skip_group(expr, i, "]")  # range or subquery durations
        elif char == "$":  # a Grafana variable outside brackets
            variable = _IDENT.match(expr, i + 1)
            i = variable.end() if variable else i + 1
        elif number := _NUMBER.match(expr, i):  # identifiers never start with a digit
            i = number.end()
        elif ident := _IDENT.match(expr, i):
            word = ident[0]
            j = ident.end()
            while j < len(expr) and expr[j] == " ":
                j += 1
            followed_by_paren = j < len(expr) and expr[j] == "("
            if word in LIST_KEYWORDS and followed_by_paren:
                i = _skip_group(expr, j, ")")  # by (label, ...): label names, not metrics
                continue
            if not followed_by_paren and word.lower() not in KEYWORDS:
                names.add(word)
            i = ident.end()
        else:
            i += 1
    return names
