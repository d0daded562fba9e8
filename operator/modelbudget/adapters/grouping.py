"""One PromQL query for many ModelBudgets: how a rendered query is split into what a group shares
and what one member asks for, and how the group's answer is fanned back out.

Many ModelBudgets render the same template with different label values, e.g.
``sum(rate(vllm:request_success_total{namespace="a",model_name="m1"}[2m]))``. Their group asks
once, ``sum by (namespace, model_name) (rate(vllm:request_success_total{namespace=~"a|b",
model_name=~"m1|m2"}[2m]))``, and each member keeps the series whose labels are its own values.
Only shapes whose grouped answer is provably the same as the member's own query are grouped: one
series selector, optionally under ``rate``/``irate``/``increase``, under nothing, ``sum``,
``sum by (le)`` or ``histogram_quantile(q, sum by (le) (...))``, with each label matched for
equality at most once and values of plain characters. Anything else is asked per member.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Values that need no escaping in a PromQL string and only '.' escaped in its regex: names,
# namespaces, model names. Anything else (quotes, backslashes, regex syntax) is asked per member.
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9_:./-]+")
_ESCAPED_DOT = "\\\\."
_MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!=|!~|=)\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')
_SELECTOR = re.compile(r"(?P<metric>[A-Za-z_:][A-Za-z0-9_:]*)\s*\{(?P<matchers>[^{}]*)\}")
_INNER = r"(?:SEL|(?:rate|irate|increase)\(\s*SEL\s*\[\s*[0-9]+[smhdwy]\s*\]\s*\))"
_BY_LE = r"sum\s+by\s*\(\s*le\s*\)\s*\(\s*(?P<inner>" + _INNER + r")\s*\)"
# (form, pattern over the query with its selector replaced by SEL)
_FORMS = (
    ("bare", re.compile(r"(?P<inner>" + _INNER + r")")),
    ("sum", re.compile(r"sum\s*\(\s*(?P<inner>" + _INNER + r")\s*\)")),
    ("sum_by_le", re.compile(_BY_LE)),
    ("quantile", re.compile(r"histogram_quantile\(\s*(?P<q>[0-9.]+)\s*,\s*" + _BY_LE + r"\s*\)")),
)


@dataclass(frozen=True)
class GroupShape:
    """What the members of one group share: the query with each equality-matched value open."""

    form: str
    inner: str  # the (rate of the) selector, with "\0" where the matchers go
    quantile: str | None
    fixed_matchers: tuple[str, ...]  # matchers other than equality, the same for every member
    labels: tuple[str, ...]  # the equality-matched labels: the group's "by"

    def query(self, members: Sequence[tuple[str, ...]]) -> str:
        """The one query answering every member (each a tuple of values, one per label)."""
        matchers = list(self.fixed_matchers)
        for i, label in enumerate(self.labels):
            values = sorted({m[i] for m in members})
            if len(values) == 1:
                matchers.append(f'{label}="{values[0]}"')
            else:
                # Prometheus anchors regex matchers; '.' is the only special character a plain
                # value can hold, escaped once for the regex and once for the PromQL string.
                alternatives = "|".join(v.replace(".", _ESCAPED_DOT) for v in values)
                matchers.append(f'{label}=~"{alternatives}"')
        inner = self.inner.replace("\0", ",".join(matchers))
        by = ", ".join(self.labels)
        if self.form == "bare":
            return inner
        if self.form == "sum":
            return f"sum by ({by}) ({inner})"
        grouped = f"sum by (le, {by}) ({inner})"
        return grouped if self.form == "sum_by_le" else f"histogram_quantile({self.quantile}, {grouped})"

    def select(self, result: Any, member: tuple[str, ...]) -> Any:
        """The member's part of the group's answer. What cannot be attributed to one member (not
        a list; a series without a value or without the group's labels, which a real Prometheus
        never sends for the group query) goes to every member, as it would have answered each
        member's own query: the parser judges it, and garbage never passes for "no series"."""
        if not isinstance(result, list):
            return result
        wanted = dict(zip(self.labels, member, strict=True))
        return [item for item in result if self.unattributable(item) or _matches(_labels_of(item), wanted)]

    def own_labels(self, labels: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
        """The labels of a series of the group's answer that the member's own query would carry:
        all of them for a bare selector; without the group's labels under an aggregation (its
        ``sum`` and ``sum by (le)`` carry none of them)."""
        if self.form == "bare":
            return tuple(labels.items())
        return tuple((k, v) for k, v in labels.items() if k not in self.labels)

    def own(self, item: Any) -> Any:
        """A series of the group's answer as the member's own query would have answered it; what
        cannot be attributed is left as it is, for the parser to judge."""
        if self.unattributable(item):
            return item
        labels = _labels_of(item)
        assert labels is not None  # attributable
        return {**item, "metric": dict(self.own_labels(labels))}

    def unattributable(self, item: Any) -> bool:
        labels = _labels_of(item)
        return labels is None or "value" not in item or any(label not in labels for label in self.labels)


class GroupAnswer:
    """A group query's answer, split by member once when it lands, each member's series kept as
    its own query would have answered them.

    Split once: each of a thousand members then finds its part in a dict instead of scanning every
    series (a scan per member per query was O(members^2) per tick: about 2 ms per query at 1,000
    members, 20 ms per reconcile). Kept compact: the decoded answer is not held; each series is
    kept as the labels the member's own query would carry (``le`` for a histogram, none for a sum)
    and its value, and the series' dicts are made again when a member reads its part. A histogram
    group answer at 1,000 members (15,000 series) held 10 MiB as decoded and about a third of it
    so, and the operator holds two of each (the answer in use and its refresh).

    An answer holding anything ``select`` cannot attribute (garbage) is kept whole and judged
    member by member, as ``select`` does."""

    def __init__(self, shape: GroupShape, result: Any) -> None:
        self.shape = shape
        self._whole: Any = result
        self._parts: dict[tuple[str, ...], list[tuple[tuple[tuple[str, Any], ...], Any]]] | None = None
        if not isinstance(result, list):
            return
        parts: dict[tuple[str, ...], list[tuple[tuple[tuple[str, Any], ...], Any]]] = {}
        shared: dict[tuple[tuple[str, Any], ...], tuple[tuple[str, Any], ...]] = {}  # one copy of each bucket's labels
        for item in result:
            labels = _labels_of(item)
            if labels is None or shape.unattributable(item):
                return
            key = tuple(labels[label] for label in shape.labels)
            if not all(isinstance(value, str) for value in key):
                return
            own = shape.own_labels(labels)
            parts.setdefault(key, []).append((shared.setdefault(own, own), item["value"]))
        self._parts = parts
        self._whole = None

    def part(self, member: tuple[str, ...]) -> Any:
        """What ``shape.select(result, member)`` gives, each series as ``shape.own`` has it."""
        if self._parts is None:
            return (
                [self.shape.own(item) for item in self.shape.select(self._whole, member)]
                if isinstance(self._whole, list)
                else self._whole
            )
        return [{"metric": dict(labels), "value": value} for labels, value in self._parts.get(member, ())]


def _labels_of(item: Any) -> Mapping[str, Any] | None:
    labels = item.get("metric") if isinstance(item, Mapping) else None
    return labels if isinstance(labels, Mapping) else None


def _matches(labels: Mapping[str, Any] | None, wanted: Mapping[str, str]) -> bool:
    return labels is not None and all(labels.get(k) == v for k, v in wanted.items())


def split(query: str) -> tuple[GroupShape, tuple[str, ...]] | None:
    """``(shape, member values)`` of a rendered query, or None when it must be asked on its own."""
    selectors = list(_SELECTOR.finditer(query))
    if len(selectors) != 1:
        return None
    sel = selectors[0]
    text = (query[: sel.start()] + "SEL" + query[sel.end() :]).strip()
    found = next(((form, m) for form, pattern in _FORMS if (m := pattern.fullmatch(text)) is not None), None)
    if found is None:
        return None
    form, shape = found
    fixed: list[str] = []
    grouped: dict[str, str] = {}
    body, pos = sel["matchers"], 0
    while pos < len(body.rstrip()):
        m = _MATCHER.match(body, pos)
        if m is None:
            return None
        label, op, value = m.groups()
        if op == "=" and label != "__name__":
            if label in grouped or label == "le" or not _PLAIN_VALUE.fullmatch(value):
                return None
            grouped[label] = value
        else:
            fixed.append(f'{label}{op}"{value}"')
        pos = m.end()
    if not grouped:
        return None
    inner = shape["inner"].replace("SEL", f"{sel['metric']}{{\0}}")
    labels = tuple(grouped)
    quantile = shape.groupdict().get("q")
    return GroupShape(form, inner, quantile, tuple(fixed), labels), tuple(grouped[k] for k in labels)
