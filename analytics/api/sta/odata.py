"""The OData subset SensorThings 1.1 uses, parsed with a lark grammar (LALR) into small
expression trees: ``$filter``, ``$orderby``, ``$select``, ``$expand`` (nested options),
and the WKT inside ``geography'...'`` literals.

Nothing here reads the store: :mod:`analytics.api.sta.evaluate` gives the trees meaning.
A query that does not parse raises :class:`QueryError` with the position and what was
expected there; the routes answer it with 400.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from lark import Lark, Token, Transformer, UnexpectedInput, v_args
from lark.exceptions import VisitError

GRAMMAR = r"""
filter: expr
orderby: order ("," order)*
select: NAME ("," NAME)*
expand: expand_item ("," expand_item)*

order: expr [ASC | DESC]
expand_item: NAME ("/" NAME)* ["(" option (";" option)* ")"]
option: "$filter" "=" expr              -> opt_filter
      | "$orderby" "=" order ("," order)* -> opt_orderby
      | "$select" "=" NAME ("," NAME)*   -> opt_select
      | "$expand" "=" expand_item ("," expand_item)* -> opt_expand
      | "$top" "=" INT                   -> opt_top
      | "$skip" "=" INT                  -> opt_skip
      | "$count" "=" BOOL                -> opt_count

?expr: or_expr
?or_expr: and_expr | or_expr "or" and_expr   -> or_
?and_expr: not_expr | and_expr "and" not_expr -> and_
?not_expr: cmp_expr | "not" not_expr         -> not_
?cmp_expr: add_expr | add_expr CMP add_expr  -> compare
?add_expr: mul_expr | add_expr ADDOP mul_expr -> arith
?mul_expr: unary | mul_expr MULOP unary      -> arith
?unary: atom | "-" unary                     -> neg
?atom: literal | path | call | "(" expr ")"
call: NAME "(" [expr ("," expr)*] ")"
path: NAME ("/" NAME)*
literal: STRING   -> string
       | NUMBER   -> number
       | INT      -> number
       | DATETIME -> datetime
       | GEO      -> geo
       | "true"   -> true
       | "false"  -> false
       | "null"   -> null

CMP: "eq" | "ne" | "gt" | "ge" | "lt" | "le"
ADDOP: "add" | "sub"
MULOP: "mul" | "div" | "mod"
ASC: "asc"
DESC: "desc"
BOOL: "true" | "false"
NAME: /[A-Za-z_@][A-Za-z0-9_.]*/
STRING: /'(?:[^']|'')*'/
GEO.3: /geo(graphy|metry)'[^']*'/
DATETIME.2: /\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2})/
NUMBER.1: /\d+\.\d+([eE][+-]?\d+)?|\d+[eE][+-]?\d+/
INT: /\d+/
%ignore /[ \t\r\n]+/
"""

WKT_GRAMMAR = r"""
geometry: [SRID] (point | linestring | polygon)
SRID: /SRID=\d+;/i
point: "POINT"i "(" coord ")"
linestring: "LINESTRING"i "(" coord ("," coord)* ")"
polygon: "POLYGON"i "(" ring ("," ring)* ")"
ring: "(" coord ("," coord)* ")"
coord: NUM NUM
NUM: /[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?/
%ignore /[ \t\r\n]+/
"""

_PARSER = Lark(
    GRAMMAR, start=["filter", "orderby", "select", "expand"], parser="lalr", maybe_placeholders=True
)
_WKT = Lark(WKT_GRAMMAR, start="geometry", parser="lalr")


class QueryError(ValueError):
    """A query option that does not parse or cannot be applied (answered with 400)."""


# -- trees --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Literal:
    value: Any  # str, int, float, bool, None, datetime or Geometry


@dataclass(frozen=True, slots=True)
class Path:
    parts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Call:
    name: str
    args: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class BinOp:
    op: str  # eq ne gt ge lt le and or add sub mul div mod
    left: Node
    right: Node


@dataclass(frozen=True, slots=True)
class Not:
    operand: Node


@dataclass(frozen=True, slots=True)
class Neg:
    operand: Node


Node = Literal | Path | Call | BinOp | Not | Neg


@dataclass(frozen=True, slots=True)
class Geometry:
    """A WKT geometry: ``kind`` point, linestring or polygon; lon/lat pairs (WKT order)."""

    kind: str
    rings: tuple[tuple[tuple[float, float], ...], ...]  # point/linestring: one "ring"


@dataclass(frozen=True, slots=True)
class Order:
    expr: Node
    descending: bool


@dataclass
class Options:
    """The query options of one collection (the request's, or nested in ``$expand``)."""

    filter: Node | None = None
    orderby: list[Order] = field(default_factory=list)
    select: list[str] | None = None
    expand: list[Expand] = field(default_factory=list)
    top: int | None = None
    skip: int = 0
    count: bool = False


@dataclass
class Expand:
    path: tuple[str, ...]
    options: Options


# -- transformer ----------------------------------------------------------------------

FUNCTIONS = {
    # name: (min args, max args)
    "substringof": (2, 2),
    "contains": (2, 2),
    "startswith": (2, 2),
    "endswith": (2, 2),
    "length": (1, 1),
    "indexof": (2, 2),
    "substring": (2, 3),
    "tolower": (1, 1),
    "toupper": (1, 1),
    "trim": (1, 1),
    "concat": (2, 2),
    "year": (1, 1),
    "month": (1, 1),
    "day": (1, 1),
    "hour": (1, 1),
    "minute": (1, 1),
    "second": (1, 1),
    "fractionalseconds": (1, 1),
    "date": (1, 1),
    "time": (1, 1),
    "totaloffsetminutes": (1, 1),
    "now": (0, 0),
    "mindatetime": (0, 0),
    "maxdatetime": (0, 0),
    "round": (1, 1),
    "floor": (1, 1),
    "ceiling": (1, 1),
    "geo.distance": (2, 2),
    "geo.intersects": (2, 2),
    "geo.length": (1, 1),
    "st_intersects": (2, 2),
    "st_within": (2, 2),
    "st_contains": (2, 2),
    "st_disjoint": (2, 2),
    "st_equals": (2, 2),
}


def parse_wkt(text: str) -> Geometry:
    try:
        parsed = _WKT.parse(text)
    except UnexpectedInput as exc:
        raise QueryError(
            f"Cannot read the geography literal {text!r} at column {exc.column}: "
            "expected POINT(lon lat), LINESTRING(lon lat, ...) or POLYGON((lon lat, ...))"
        ) from None
    tree: Any = parsed.children[-1]  # the shape, after an optional SRID=n; (lon/lat assumed)
    rings = []
    parts: list[Any] = list(tree.children) if tree.data == "polygon" else [tree]
    for part in parts:
        coords: list[Any] = list(part.children)
        rings.append(tuple((float(c.children[0]), float(c.children[1])) for c in coords))
    geometry = Geometry(str(tree.data), tuple(rings))
    if geometry.kind == "polygon" and any(len(r) < 4 or r[0] != r[-1] for r in rings):
        raise QueryError(
            f"The polygon {text!r} is not closed: each ring needs at least 4 points and "
            "must end where it starts"
        )
    return geometry


def parse_time(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise QueryError(f"{text!r} is not a valid date and time") from None


@v_args(inline=True)
class _Build(Transformer[Token, Any]):
    def string(self, token: Token) -> Literal:
        return Literal(str(token)[1:-1].replace("''", "'"))

    def number(self, token: Token) -> Literal:
        text = str(token)
        return Literal(int(text) if text.isdigit() else float(text))

    def datetime(self, token: Token) -> Literal:
        return Literal(parse_time(str(token)))

    def geo(self, token: Token) -> Literal:
        text = str(token)
        return Literal(parse_wkt(text[text.index("'") + 1 : -1]))

    def true(self) -> Literal:
        return Literal(True)

    def false(self) -> Literal:
        return Literal(False)

    def null(self) -> Literal:
        return Literal(None)

    def path(self, *names: Token) -> Path:
        return Path(tuple(str(n) for n in names))

    def call(self, name: Token, *args: Node | None) -> Call:
        fname = str(name)
        given = tuple(a for a in args if a is not None)
        bounds = FUNCTIONS.get(fname)
        if bounds is None:
            known = ", ".join(sorted(FUNCTIONS))
            raise QueryError(f"Unknown function {fname!r}; known: {known}")
        if not bounds[0] <= len(given) <= bounds[1]:
            raise QueryError(f"{fname}() takes {bounds[0]}-{bounds[1]} arguments, not {len(given)}")
        return Call(fname, given)

    def compare(self, left: Node, op: Token, right: Node) -> BinOp:
        return BinOp(str(op), left, right)

    def arith(self, left: Node, op: Token, right: Node) -> BinOp:
        return BinOp(str(op), left, right)

    def or_(self, left: Node, right: Node) -> BinOp:
        return BinOp("or", left, right)

    def and_(self, left: Node, right: Node) -> BinOp:
        return BinOp("and", left, right)

    def not_(self, operand: Node) -> Not:
        return Not(operand)

    def neg(self, operand: Node) -> Neg:
        return Neg(operand)

    def filter(self, expr: Node) -> Node:
        return expr

    def order(self, expr: Node, direction: Token | None) -> Order:
        return Order(expr, direction is not None and str(direction) == "desc")

    def orderby(self, *orders: Order) -> list[Order]:
        return list(orders)

    def select(self, *names: Token) -> list[str]:
        return [str(n) for n in names]

    def expand(self, *items: Expand) -> list[Expand]:
        return list(items)

    def expand_item(self, *parts: Any) -> Expand:
        names = tuple(str(p) for p in parts if isinstance(p, Token))
        options = Options()
        for setter in parts:
            if callable(setter):
                setter(options)
        return Expand(names, options)

    # nested options become setters applied to the item's Options
    def opt_filter(self, expr: Node) -> Any:
        return lambda o: setattr(o, "filter", expr)

    def opt_orderby(self, *orders: Order) -> Any:
        return lambda o: setattr(o, "orderby", list(orders))

    def opt_select(self, *names: Token) -> Any:
        return lambda o: setattr(o, "select", [str(n) for n in names])

    def opt_expand(self, *items: Expand) -> Any:
        return lambda o: setattr(o, "expand", list(items))

    def opt_top(self, value: Token) -> Any:
        return lambda o: setattr(o, "top", int(value))

    def opt_skip(self, value: Token) -> Any:
        return lambda o: setattr(o, "skip", int(value))

    def opt_count(self, value: Token) -> Any:
        return lambda o: setattr(o, "count", str(value) == "true")


def parse(text: str, start: str, option: str) -> Any:
    """Parse ``text`` as the ``start`` rule; ``option`` names it in errors ($filter...)."""
    if not text.strip():
        raise QueryError(f"{option} is empty")
    try:
        return _Build().transform(_PARSER.parse(text, start=start))
    except UnexpectedInput as exc:
        names = getattr(exc, "expected", None) or getattr(exc, "allowed", None) or []
        expected = sorted({_SHOWN.get(str(n), str(n).lower()) for n in names})
        if start in ("filter", "select"):  # the rules share LALR states; not these
            expected = [e for e in expected if e not in ("asc", "desc", ";")]
        hint = f"; expected one of: {', '.join(expected[:14])}" if expected else ""
        raise QueryError(f"Cannot parse {option} {_where(text, exc)}{hint}") from None
    except VisitError as exc:
        if isinstance(exc.orig_exc, QueryError):
            raise exc.orig_exc from None
        raise


# the grammar's terminal names as a person writes them
_SHOWN = {
    "LPAR": "(",
    "RPAR": ")",
    "MINUS": "-",
    "COMMA": ",",
    "SEMICOLON": ";",
    "SLASH": "/",
    "EQUAL": "=",
    "NAME": "a property or function name",
    "STRING": "'text'",
    "NUMBER": "a number",
    "INT": "a whole number",
    "DATETIME": "a time (2026-01-05T00:00:00Z)",
    "GEO": "geography'...'",
    "CMP": "eq/ne/gt/ge/lt/le",
    "ADDOP": "add/sub",
    "MULOP": "mul/div/mod",
    "$END": "the end",
}


def _where(text: str, exc: UnexpectedInput) -> str:
    token = getattr(exc, "token", None)
    if token is not None and getattr(token, "type", "") == "$END":
        return "at its end"
    pos = getattr(exc, "pos_in_stream", None)
    if pos is None or pos >= len(text):
        return "at its end"
    return f"at column {exc.column} (near {text[pos : pos + 20]!r})"


def parse_filter(text: str) -> Node:
    node: Node = parse(text, "filter", "$filter")
    return node


def parse_orderby(text: str) -> list[Order]:
    orders: list[Order] = parse(text, "orderby", "$orderby")
    return orders


def parse_select(text: str) -> list[str]:
    names: list[str] = parse(text, "select", "$select")
    return names


def parse_expand(text: str) -> list[Expand]:
    items: list[Expand] = parse(text, "expand", "$expand")
    return items


# -- back to text (the nested @iot.nextLink of an expanded collection) -----------------


def to_text(node: Node) -> str:
    """OData text that parses back to ``node``."""
    if isinstance(node, Literal):
        return _literal_text(node.value)
    if isinstance(node, Path):
        return "/".join(node.parts)
    if isinstance(node, Call):
        return f"{node.name}({', '.join(to_text(a) for a in node.args)})"
    if isinstance(node, Not):
        return f"not ({to_text(node.operand)})"
    if isinstance(node, Neg):
        return f"-({to_text(node.operand)})"
    return f"({to_text(node.left)} {node.op} {to_text(node.right)})"


def _literal_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, Geometry):
        return f"geography'{wkt(value)}'"
    return repr(value)


def wkt(geometry: Geometry) -> str:
    def coords(ring: tuple[tuple[float, float], ...]) -> str:
        return ", ".join(f"{x!r} {y!r}" for x, y in ring)

    if geometry.kind == "polygon":
        return "POLYGON(" + ", ".join(f"({coords(r)})" for r in geometry.rings) + ")"
    return f"{geometry.kind.upper()}({coords(geometry.rings[0])})"


def options_text(options: Options, *, top: int, skip: int) -> list[tuple[str, str]]:
    """The query parameters of ``options`` with ``$top``/``$skip`` replaced."""
    params: list[tuple[str, str]] = []
    if options.filter is not None:
        params.append(("$filter", to_text(options.filter)))
    if options.orderby:
        params.append(("$orderby", _orders_text(options.orderby)))
    if options.select is not None:
        params.append(("$select", ",".join(options.select)))
    if options.expand:
        params.append(("$expand", ",".join(_expand_text(e) for e in options.expand)))
    if options.count:
        params.append(("$count", "true"))
    return [*params, ("$top", str(top)), ("$skip", str(skip))]


def _orders_text(orders: list[Order]) -> str:
    return ",".join(f"{to_text(o.expr)} {'desc' if o.descending else 'asc'}" for o in orders)


def _expand_text(item: Expand) -> str:
    inner: list[str] = []
    o = item.options
    if o.filter is not None:
        inner.append(f"$filter={to_text(o.filter)}")
    if o.orderby:
        inner.append(f"$orderby={_orders_text(o.orderby)}")
    if o.select is not None:
        inner.append("$select=" + ",".join(o.select))
    if o.expand:
        inner.append("$expand=" + ",".join(_expand_text(e) for e in o.expand))
    if o.top is not None:
        inner.append(f"$top={o.top}")
    if o.skip:
        inner.append(f"$skip={o.skip}")
    if o.count:
        inner.append("$count=true")
    path = "/".join(item.path)
    return f"{path}({';'.join(inner)})" if inner else path
