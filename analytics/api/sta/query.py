"""Applying query options to a collection: filter, order, count, skip/top and the
``@iot.nextLink``; Observations are read from the store lazily, a day per query, with
the filter's phenomenonTime/resultTime bounds pushed down (``Store.readings``)."""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from analytics.api.sta.evaluate import evaluate, time_bounds, truthy
from analytics.api.sta.model import NAVIGATION, Entity, Graph
from analytics.api.sta.odata import Node, Options, Order, Path, QueryError
from analytics.store.base import Resolution, Store
from civicmesh.protocol import Reading

DEFAULT_TOP = 100
MAX_TOP = 10_000
SLICE_MS = 86_400_000  # one store query reads at most a day of one datastream
FALLBACK_SPAN_MS = 31 * SLICE_MS
# Store queries one request may make (a query reads a day of one datastream): a filter
# that matches nothing, $count or an $orderby other than time over the whole city's
# history would otherwise read all of it.
MAX_READS = 10_000  # history assumed when the daily rollup has none yet
TIME_ORDER = frozenset({"phenomenonTime", "resultTime"})

# an observation before it is built: (time, datastream id, datastream, reading)
Row = tuple[int, int, Entity, Reading]


def lookup(entity: Entity, parts: tuple[str, ...]) -> Any:
    """The value of a property path (``location/type``, ``Datastream/Thing/name``)."""
    head, rest = parts[0], parts[1:]
    if head in ("id", "@iot.id"):
        return None if rest else entity.id
    if head in entity.props:
        value = entity.props[head]
        for part in rest:
            value = value.get(part) if isinstance(value, dict) else None
        return value
    nav = NAVIGATION[entity.set].get(head)
    if nav is not None:
        if not nav[1]:
            raise QueryError(
                f"{entity.set}/{head} is a collection: $filter follows single-valued "
                "navigation only (any() and all() are not supported)"
            )
        related = entity.links.get(head) or []
        return lookup(related[0], rest) if related and rest else None
    known = ", ".join(["id", *entity.props, *NAVIGATION[entity.set]])
    raise QueryError(f"{entity.set} have no property {head!r}; known: {known}")


def matches(entity: Entity, options: Options) -> bool:
    if options.filter is None:
        return True
    return truthy(evaluate(options.filter, lambda parts: lookup(entity, parts)))


def _key(value: Any) -> tuple[int, Any]:
    if value is None:
        return (1, 0)
    if isinstance(value, dict | list):
        return (0, str(value))
    return (0, value)


def sort(entities: list[Entity], orders: list[Order]) -> list[Entity]:
    result = sorted(entities, key=lambda e: _key(e.id))
    for order in reversed(orders):

        def key(entity: Entity, expr: Node = order.expr) -> tuple[int, Any]:
            return _key(evaluate(expr, lambda parts: lookup(entity, parts)))

        try:
            result.sort(key=key, reverse=order.descending)
        except TypeError:
            raise QueryError("$orderby compares values of different types") from None
    return result


@dataclass
class Page:
    items: list[Entity]
    count: int | None  # when $count=true
    more: bool  # rows follow this page


def check(options: Options) -> int:
    top = DEFAULT_TOP if options.top is None else options.top
    if top > MAX_TOP:
        raise QueryError(f"$top is at most {MAX_TOP}, not {top}")
    return top


def page_of(entities: list[Entity], options: Options) -> Page:
    top = check(options)
    found = sort([e for e in entities if matches(e, options)], options.orderby)
    end = options.skip + top
    return Page(found[options.skip : end], len(found) if options.count else None, len(found) > end)


class Observations:
    """The observations of some datastreams, read from the store on demand."""

    def __init__(
        self, store: Store, graph: Graph, datastreams: list[Entity], max_reads: int = MAX_READS
    ) -> None:
        self.store = store
        self.graph = graph
        self.datastreams = datastreams
        self.max_reads = max_reads
        self.reads = 0

    def page(self, options: Options) -> Page:
        top = check(options)
        bounds = time_bounds(options.filter)
        orders = options.orderby
        lazy = not orders or (
            len(orders) == 1
            and isinstance(orders[0].expr, Path)
            and orders[0].expr.parts[0] in TIME_ORDER
            and len(orders[0].expr.parts) == 1
        )
        descending = bool(orders) and orders[0].descending
        rest = Options(filter=bounds.residual)
        rows = self._merged(bounds.start, bounds.end, descending)
        if not lazy:
            found = [e for e in (self._entity(row) for row in rows) if matches(e, rest)]
            found = sort(found, orders)
            stop = options.skip + top
            chosen = found[options.skip : stop]
            return Page(chosen, len(found) if options.count else None, len(found) > stop)
        items: list[Entity] = []
        seen = 0
        more = False
        for row in rows:
            # Rows the range alone selects are counted and skipped without being built.
            entity = None if rest.filter is None else self._entity(row)
            if entity is not None and not matches(entity, rest):
                continue
            if options.skip <= seen < options.skip + top:
                items.append(entity or self._entity(row))
            seen += 1
            if seen > options.skip + top:
                more = True
                if not options.count:
                    break
        return Page(items, seen if options.count else None, more)

    def _entity(self, row: Row) -> Entity:
        return self.graph.observation(row[2], row[3])

    def _merged(self, start: int | None, end: int | None, descending: bool) -> Iterator[Row]:
        streams = [self._stream(d, start, end, descending) for d in self.datastreams]
        if len(streams) == 1:
            return streams[0]
        return heapq.merge(*streams, key=lambda row: (row[0], row[1]), reverse=descending)

    def _stream(
        self, datastream: Entity, start: int | None, end: int | None, descending: bool
    ) -> Iterator[Row]:
        device, metric = datastream.device, datastream.metric
        assert device is not None and metric is not None
        newest = (device.last_seen_ms or 0) + 1
        hi = newest if end is None else min(end, newest)
        first = self._first(datastream, hi)
        if start is None:
            lo = hi - FALLBACK_SPAN_MS if first is None else first
        else:  # a bound long before the history would read empty days
            lo = start if first is None else max(start, first)
        key = int(datastream.id)
        for lo_, hi_ in _slices(lo, hi, descending):
            self.reads += 1
            if self.reads > self.max_reads:
                raise QueryError(
                    f"This query reads more than {self.max_reads} datastream-days of "
                    "observations; narrow it with a phenomenonTime range (phenomenonTime ge "
                    "... and phenomenonTime lt ...), read one Datastream's Observations, or "
                    "order by phenomenonTime without $count"
                )
            readings = self.store.readings(device.device_id, lo_, hi_, metric.name)
            for reading in reversed(readings) if descending else readings:
                yield (reading.ts_ms, key, datastream, reading)

    def _first(self, datastream: Entity, hi: int) -> int | None:
        """The start of the datastream's history: its first day in the daily rollup (one
        query); None before the rollup has any (then a month before the newest reading
        is read when no bound is given)."""
        device, metric = datastream.device, datastream.metric
        assert device is not None and metric is not None
        days = self.store.rollup_series(
            metric.name, 0, hi, Resolution.DAY, device_id=device.device_id
        )
        return days[0].bucket_ms if days else None

    def get(self, datastream: Entity, ts_ms: int) -> Entity | None:
        device, metric = datastream.device, datastream.metric
        assert device is not None and metric is not None
        for reading in self.store.readings(device.device_id, ts_ms, ts_ms + 1, metric.name):
            if reading.ts_ms == ts_ms:
                return self.graph.observation(datastream, reading)
        return None


def _slices(lo: int, hi: int, descending: bool) -> Iterable[tuple[int, int]]:
    if lo >= hi:
        return []
    edges = list(range(lo, hi, SLICE_MS))
    spans = [(a, min(hi, a + SLICE_MS)) for a in edges]
    return reversed(spans) if descending else spans
