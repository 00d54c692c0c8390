"""Meaning for the OData trees of :mod:`analytics.api.sta.odata`: a ``$filter`` as a
predicate over an entity, ``$orderby`` as a sort key, and the time bounds of a filter
that the Observations reads push down to the store.

Values follow OData's rules closely enough for what SensorThings clients send: a
comparison with ``null`` on either side is false (``eq null`` excepted), ISO 8601 text
compares as a time against a time literal, and ``geo.*`` functions read GeoJSON.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

from analytics.api.sta.odata import (
    BinOp,
    Call,
    Geometry,
    Literal,
    Neg,
    Node,
    Not,
    Path,
    QueryError,
    parse_time,
)

Resolve = Callable[[tuple[str, ...]], Any]  # a path of the entity -> its value

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MIN_TIME = datetime(1, 1, 1, tzinfo=UTC)
MAX_TIME = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)


def evaluate(node: Node, resolve: Resolve) -> Any:
    if isinstance(node, Literal):
        return node.value
    if isinstance(node, Path):
        return resolve(node.parts)
    if isinstance(node, Not):
        value = evaluate(node.operand, resolve)
        return None if value is None else not truthy(value)
    if isinstance(node, Neg):
        value = evaluate(node.operand, resolve)
        return None if value is None else -_number(value, "-")
    if isinstance(node, Call):
        return call(node.name, [evaluate(a, resolve) for a in node.args])
    if node.op == "and":
        return truthy(evaluate(node.left, resolve)) and truthy(evaluate(node.right, resolve))
    if node.op == "or":
        return truthy(evaluate(node.left, resolve)) or truthy(evaluate(node.right, resolve))
    return binary(node.op, evaluate(node.left, resolve), evaluate(node.right, resolve))


def truthy(value: Any) -> bool:
    return value is True


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise QueryError(f"{where} needs a number, not {value!r}")
    return value


def _times(left: Any, right: Any) -> tuple[Any, Any]:
    """Text that reads as an ISO 8601 time (or the start of an interval) compares as a
    time against a time."""
    if isinstance(left, datetime) and isinstance(right, str):
        return left, _as_time(right)
    if isinstance(right, datetime) and isinstance(left, str):
        return _as_time(left), right
    return left, right


def _as_time(text: str) -> datetime | None:
    try:
        return parse_time(text.split("/", maxsplit=1)[0])
    except QueryError:
        return None


COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "eq": lambda a, b: bool(a == b),
    "ne": lambda a, b: bool(a != b),
    "gt": lambda a, b: bool(a > b),
    "ge": lambda a, b: bool(a >= b),
    "lt": lambda a, b: bool(a < b),
    "le": lambda a, b: bool(a <= b),
}


def binary(op: str, left: Any, right: Any) -> Any:
    if op in COMPARE:
        if left is None or right is None:
            if op == "eq":
                return left is None and right is None
            return op == "ne" and (left is None) != (right is None)
        left, right = _times(left, right)
        if left is None or right is None:
            return False
        try:
            return COMPARE[op](left, right)
        except TypeError:
            raise QueryError(
                f"Cannot compare {type(left).__name__} with {type(right).__name__} ({op})"
            ) from None
    if left is None or right is None:
        return None
    a, b = _number(left, op), _number(right, op)
    if op == "add":
        return a + b
    if op == "sub":
        return a - b
    if op == "mul":
        return a * b
    if b == 0:
        return None  # division by zero matches nothing
    return a / b if op == "div" else math.fmod(a, b)


def call(name: str, args: list[Any]) -> Any:
    if name in ("now", "mindatetime", "maxdatetime"):
        return {"now": datetime.now(UTC), "mindatetime": MIN_TIME, "maxdatetime": MAX_TIME}[name]
    if any(a is None for a in args):
        return None
    if name in STRING_FUNCTIONS:
        return STRING_FUNCTIONS[name](*[_text(a, name) if i < 2 else a for i, a in enumerate(args)])
    if name in TIME_PARTS:
        moment = args[0] if isinstance(args[0], datetime) else _as_time(str(args[0]))
        if moment is None:
            raise QueryError(f"{name}() needs a time, not {args[0]!r}")
        return TIME_PARTS[name](moment)
    if name in ("round", "floor", "ceiling"):
        x = _number(args[0], name)
        rounding: dict[str, Callable[[float], int]] = {
            "round": round,
            "floor": math.floor,
            "ceiling": math.ceil,
        }
        return rounding[name](x)
    return spatial(name, [geometry(a, name) for a in args])


def _text(value: Any, name: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise QueryError(f"{name}() needs text, not {value!r}")


STRING_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "substringof": lambda needle, hay: needle in hay,
    "contains": lambda hay, needle: needle in hay,
    "startswith": lambda hay, prefix: hay.startswith(prefix),
    "endswith": lambda hay, suffix: hay.endswith(suffix),
    "length": len,
    "indexof": lambda hay, needle: hay.find(needle),
    "substring": lambda s, start, n=None: (
        s[int(start) :] if n is None else s[int(start) :][: int(n)]
    ),
    "tolower": str.lower,
    "toupper": str.upper,
    "trim": str.strip,
    "concat": lambda a, b: a + b,
}

TIME_PARTS: dict[str, Callable[[datetime], Any]] = {
    "year": lambda t: t.year,
    "month": lambda t: t.month,
    "day": lambda t: t.day,
    "hour": lambda t: t.hour,
    "minute": lambda t: t.minute,
    "second": lambda t: t.second,
    "fractionalseconds": lambda t: t.microsecond / 1e6,
    "date": lambda t: t.date().isoformat(),
    "time": lambda t: t.time().isoformat(),
    "totaloffsetminutes": lambda t: int((t.utcoffset() or timedelta(0)).total_seconds() // 60),
}


# -- geometry (planar, in degrees, as FROST-Server computes it on geometry columns) ------


def geometry(value: Any, name: str) -> Geometry:
    if isinstance(value, Geometry):
        return value
    if isinstance(value, dict) and value.get("type") == "Point":
        lon, lat = value["coordinates"][:2]
        return Geometry("point", (((float(lon), float(lat)),),))
    if isinstance(value, dict) and value.get("type") == "Polygon":
        rings = tuple(tuple((float(x), float(y)) for x, y, *_ in r) for r in value["coordinates"])
        return Geometry("polygon", rings)
    raise QueryError(f"{name}() needs a geometry (a location or geography'...'), not {value!r}")


def _in_ring(point: tuple[float, float], ring: tuple[tuple[float, float], ...]) -> bool:
    """Inside or on the boundary (ray casting, plus an on-segment check)."""
    x, y = point
    inside = False
    for (x1, y1), (x2, y2) in pairwise(ring):
        if _segment_distance(point, (x1, y1), (x2, y2)) < 1e-12:
            return True
        if (y1 > y) != (y2 > y) and x < (x2 - x1) * (y - y1) / (y2 - y1) + x1:
            inside = not inside
    return inside


def _in_polygon(point: tuple[float, float], polygon: Geometry) -> bool:
    outer, *holes = polygon.rings
    return _in_ring(point, outer) and not any(
        _in_ring(point, h) and _segment_free(point, h) for h in holes
    )


def _segment_free(point: tuple[float, float], ring: tuple[tuple[float, float], ...]) -> bool:
    """The point is not on the hole's boundary (a boundary point still intersects)."""
    return all(_segment_distance(point, p, q) >= 1e-12 for p, q in pairwise(ring))


def intersects(a: Geometry, b: Geometry) -> bool:
    if a.kind != "point" and b.kind == "point":
        a, b = b, a
    if a.kind != "point":
        raise QueryError(
            "geo.intersects is implemented between a point and a point, a line or a polygon; "
            "civicmesh locations are points"
        )
    p = a.rings[0][0]
    if b.kind == "point":
        return p == b.rings[0][0]
    if b.kind == "linestring":
        line = b.rings[0]
        return any(_segment_distance(p, u, v) < 1e-12 for u, v in pairwise(line))
    return _in_polygon(p, b)


def _segment_distance(
    p: tuple[float, float], u: tuple[float, float], v: tuple[float, float]
) -> float:
    (px, py), (ux, uy), (vx, vy) = p, u, v
    dx, dy = vx - ux, vy - uy
    length2 = dx * dx + dy * dy
    t = 0.0 if length2 == 0 else max(0.0, min(1.0, ((px - ux) * dx + (py - uy) * dy) / length2))
    return math.hypot(px - (ux + t * dx), py - (uy + t * dy))


def distance(a: Geometry, b: Geometry) -> float:
    if a.kind != "point" and b.kind == "point":
        a, b = b, a
    if a.kind != "point":
        raise QueryError(
            "geo.distance is implemented from a point (civicmesh locations are points)"
        )
    p = a.rings[0][0]
    if b.kind == "point":
        return math.dist(p, b.rings[0][0])
    if b.kind == "polygon" and _in_polygon(p, b):
        return 0.0
    return min(_segment_distance(p, u, v) for ring in b.rings for u, v in pairwise(ring))


SPATIAL: dict[str, Callable[[Geometry, Geometry], Any]] = {
    "geo.distance": distance,
    "geo.intersects": intersects,
    "st_intersects": intersects,
    "st_disjoint": lambda a, b: not intersects(a, b),
    "st_within": lambda a, b: a.kind == "point" and intersects(a, b),
    "st_contains": lambda a, b: b.kind == "point" and intersects(b, a),
    "st_equals": lambda a, b: a == b,
}


def spatial(name: str, geometries: list[Geometry]) -> Any:
    if name == "geo.length":
        line = geometries[0].rings[0]
        return sum(math.dist(p, q) for p, q in pairwise(line))
    return SPATIAL[name](geometries[0], geometries[1])


# -- push-down ------------------------------------------------------------------------

TIME_FIELDS = frozenset({"phenomenonTime", "resultTime"})
FLIP = {"gt": "lt", "ge": "le", "lt": "gt", "le": "ge", "eq": "eq"}


@dataclass(frozen=True, slots=True)
class TimeBounds:
    """``[start, end)`` in epoch ms that every observation matching a filter lies in, and
    what of the filter is left to apply to each row read from that range."""

    start: int | None
    end: int | None
    residual: Node | None


def time_bounds(node: Node | None) -> TimeBounds:
    """The comparisons of phenomenonTime/resultTime with time literals that the top-level
    ``and`` joins become the range (read from the store); the other terms, and any
    literal finer than a millisecond, stay in the residual filter."""
    start: int | None = None
    end: int | None = None
    rest: list[Node] = []
    for term in _conjuncts(node):
        bound = _bound(term)
        if bound is None:
            rest.append(term)
            continue
        op, ms, exact = bound
        if not exact:
            rest.append(term)  # the range below is widened to whole milliseconds
        low = {"gt": ms + 1 if exact else ms, "ge": ms, "eq": ms}.get(op)
        high = {"lt": ms + (0 if exact else 1), "le": ms + 1, "eq": ms + 1}.get(op)
        if low is not None:
            start = low if start is None else max(start, low)
        if high is not None:
            end = high if end is None else min(end, high)
    residual: Node | None = None
    for term in rest:
        residual = term if residual is None else BinOp("and", residual, term)
    return TimeBounds(start, end, residual)


def _conjuncts(node: Node | None) -> list[Node]:
    if node is None:
        return []
    if isinstance(node, BinOp) and node.op == "and":
        return _conjuncts(node.left) + _conjuncts(node.right)
    return [node]


def _bound(term: Node) -> tuple[str, int, bool] | None:
    if not isinstance(term, BinOp) or term.op not in FLIP:
        return None
    left, right, op = term.left, term.right, term.op
    if isinstance(left, Literal):
        left, right, op = right, left, FLIP[op]
    if (
        isinstance(left, Path)
        and left.parts[-1] in TIME_FIELDS
        and len(left.parts) == 1
        and isinstance(right, Literal)
        and isinstance(right.value, datetime)
    ):
        moment: datetime = right.value
        # exact integer arithmetic: timestamp() * 1000 can land a float a hair below
        ms = (moment - EPOCH) // timedelta(milliseconds=1)
        return op, ms, moment.microsecond % 1000 == 0
    return None
