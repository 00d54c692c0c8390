"""The routes under ``/sta/v1.1``: the service root and every resource path
(``Things``, ``Things(1)``, ``Things(1)/Datastreams``, ``Datastreams(5)/Observations``,
``Things(1)/name``, ``Things(1)/name/$value``), with the query options of
:mod:`analytics.api.sta.odata`. Errors are ``{"code": 4xx, "type": "error",
"message": ...}`` as FROST-Server writes them."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from analytics.api.common import ERRORS, StoreDep
from analytics.api.openaq import Network
from analytics.api.sta.model import ENTITY_SETS, NAVIGATION, Entity, Graph
from analytics.api.sta.odata import (
    Expand,
    Options,
    QueryError,
    options_text,
    parse_expand,
    parse_filter,
    parse_orderby,
    parse_select,
)
from analytics.api.sta.query import DEFAULT_TOP, Observations, Page, page_of
from analytics.apiauth import requires
from analytics.store.base import Store

PREFIX = "/sta/v1.1"
CONFORMANCE = [
    "http://www.opengis.net/spec/iot_sensing/1.1/req/datamodel",
    "http://www.opengis.net/spec/iot_sensing/1.1/req/resource-path/resource-path-to-entities",
    "http://www.opengis.net/spec/iot_sensing/1.1/req/request-data",
]
OPTIONS = ("$filter", "$orderby", "$select", "$expand", "$top", "$skip", "$count")
GRAPH_TTL_S = 2.0

router = APIRouter(prefix=PREFIX, responses=ERRORS, dependencies=[requires("viewer")])


class StaError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error(_: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, StaError):
        status, message = exc.status, exc.message
    else:
        status, message = 400, str(exc)
    return JSONResponse({"code": status, "type": "error", "message": message}, status_code=status)


# -- options --------------------------------------------------------------------------


def _int(name: str, text: str) -> int:
    if not text.isdigit():
        raise QueryError(f"{name} must be a whole number >= 0, not {text!r}")
    return int(text)


def request_options(request: Request) -> Options:
    params = request.query_params
    for name in params:
        if name.startswith("$") and name not in OPTIONS:
            raise QueryError(f"Unsupported query option {name}; supported: {', '.join(OPTIONS)}")
    options = Options()
    if "$filter" in params:
        options.filter = parse_filter(params["$filter"])
    if "$orderby" in params:
        options.orderby = parse_orderby(params["$orderby"])
    if "$select" in params:
        options.select = parse_select(params["$select"])
    if "$expand" in params:
        options.expand = parse_expand(params["$expand"])
    if "$top" in params:
        options.top = _int("$top", params["$top"])
    if "$skip" in params:
        options.skip = _int("$skip", params["$skip"])
    if "$count" in params:
        if params["$count"] not in ("true", "false"):
            raise QueryError(f"$count must be true or false, not {params['$count']!r}")
        options.count = params["$count"] == "true"
    return options


# -- resolving a path -----------------------------------------------------------------


@dataclass
class Context:
    base: str  # http://host/sta/v1.1
    store: Store
    graph: Graph

    def link(self, entity: Entity) -> str:
        key = entity.id if isinstance(entity.id, int) else f"'{entity.id}'"
        return f"{self.base}/{entity.set}({key})"

    def collection(self, owner: Entity | None, set_name: str, nav: str) -> Any:
        """The members of ``owner``'s navigation ``nav`` (or the whole set): a list, or
        an Observations reader."""
        if set_name == "Observations":
            streams = (
                list(self.graph.sets["Datastreams"].values())
                if owner is None
                else self.graph.datastreams_of(owner)
            )
            return Observations(self.store, self.graph, streams)
        if owner is None:
            return list(self.graph.sets[set_name].values())
        return list(owner.links.get(nav, []))

    def page(self, members: Any, options: Options) -> Page:
        if isinstance(members, Observations):
            return members.page(options)
        result: Page = page_of(members, options)
        return result

    def find(self, set_name: str, key: int | str, members: Any) -> Entity | None:
        if set_name == "Observations":
            datastream = self.graph.observation_by_id(key)
            if datastream is None or not isinstance(members, Observations):
                return None
            if datastream not in members.datastreams:
                return None
            return members.get(datastream, int(str(key).partition("-")[2]))
        found = self.graph.get(set_name, key)
        return found if found is not None and found in members else None


def _segment(text: str) -> tuple[str, int | str | None]:
    name, paren, rest = text.partition("(")
    if not paren:
        return text, None
    if not rest.endswith(")"):
        raise StaError(400, f"Bad path segment {text!r}: expected Name(id)")
    key = rest[:-1]
    if key.isdigit():
        return name, int(key)
    if len(key) >= 2 and key[0] == key[-1] == "'":
        return name, key[1:-1].replace("''", "'")
    raise StaError(400, f"Bad id in {text!r}: a number, or text in single quotes")


def resolve(ctx: Context, path: str) -> tuple[str, Any]:
    """Walk ``path``: ("collection", (set, members, owner, nav)), ("entity", entity),
    ("property", (name, value)) or ("value", value)."""
    segments = [s for s in path.split("/") if s]
    name, key = _segment(segments[0])
    if name not in ENTITY_SETS:
        raise StaError(404, f"No entity set {name!r}; known: {', '.join(ENTITY_SETS)}")
    state: Any = ("collection", (name, ctx.collection(None, name, name), None, name))
    state = _keyed(ctx, state, key, segments[0])
    for text in segments[1:]:
        name, key = _segment(text)
        kind, held = state[0], state[1]
        if kind == "property" and text == "$value":
            state = ("value", held[1])
            continue
        if kind == "collection":
            raise StaError(
                400,
                f"{held[0]} is a collection: name one member, as {held[0]}(id)/{text}",
            )
        if kind != "entity":
            raise StaError(400, f"Nothing follows {text!r} in {path}")
        entity = held
        assert isinstance(entity, Entity)
        nav = NAVIGATION[entity.set].get(name)
        if nav is None:
            if key is None and name in entity.props:
                state = ("property", (name, entity.props[name]))
                continue
            if key is None and name in ("id", "@iot.id"):
                state = ("property", ("@iot.id", entity.id))
                continue
            known = ", ".join([*NAVIGATION[entity.set], *entity.props])
            raise StaError(404, f"{entity.set} have no {name!r}; known: {known}")
        target, single = nav
        if single:
            related = entity.links.get(name) or []
            if not related or key is not None:
                raise StaError(404, f"{ctx.link(entity)} has no {name}")
            state = ("entity", related[0])
            continue
        members = ctx.collection(entity, target, name)
        state = _keyed(ctx, ("collection", (target, members, entity, name)), key, text)
    return (str(state[0]), state[1])


def _keyed(ctx: Context, state: tuple[str, Any], key: int | str | None, text: str) -> Any:
    if key is None:
        return state
    set_name, members = state[1][0], state[1][1]
    entity = ctx.find(set_name, key, members)
    if entity is None:
        raise StaError(404, f"Nothing found at {text}")
    return ("entity", entity)


# -- rendering --------------------------------------------------------------------------


def render(ctx: Context, entity: Entity, options: Options) -> dict[str, Any]:
    own = ctx.link(entity)
    full: dict[str, Any] = {"@iot.id": entity.id, "@iot.selfLink": own, **entity.props}
    for nav in NAVIGATION[entity.set]:
        full[f"{nav}@iot.navigationLink"] = f"{own}/{nav}"
    out = full if options.select is None else _selected(entity, full, options.select)
    for item in _merge(options.expand):
        _expand(ctx, entity, own, item, out)
    return out


def _selected(entity: Entity, full: dict[str, Any], select: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in select:
        if name in ("id", "@iot.id"):
            out["@iot.id"] = full["@iot.id"]
        elif name in ("selfLink", "@iot.selfLink"):
            out["@iot.selfLink"] = full["@iot.selfLink"]
        elif name in entity.props:
            out[name] = full[name]
        elif name in NAVIGATION[entity.set]:
            out[f"{name}@iot.navigationLink"] = full[f"{name}@iot.navigationLink"]
        else:
            known = ", ".join(["id", "selfLink", *entity.props, *NAVIGATION[entity.set]])
            raise QueryError(f"$select: {entity.set} have no {name!r}; known: {known}")
    return out


def _merge(items: list[Expand]) -> list[Expand]:
    """``Datastreams/Observations`` becomes ``Datastreams($expand=Observations)``."""
    merged: list[Expand] = []
    for item in items:
        if len(item.path) == 1:
            merged.append(item)
        else:
            inner = Expand(item.path[1:], item.options)
            merged.append(Expand(item.path[:1], Options(expand=[inner])))
    return merged


def _expand(ctx: Context, entity: Entity, own: str, item: Expand, out: dict[str, Any]) -> None:
    name = item.path[0]
    nav = NAVIGATION[entity.set].get(name)
    if nav is None:
        known = ", ".join(NAVIGATION[entity.set])
        raise QueryError(f"$expand: {entity.set} have no {name!r}; known: {known}")
    target, single = nav
    out.pop(f"{name}@iot.navigationLink", None)
    if single:
        related = entity.links.get(name) or []
        out[name] = render(ctx, related[0], item.options) if related else None
        return
    page = ctx.page(ctx.collection(entity, target, name), item.options)
    out[name] = [render(ctx, e, item.options) for e in page.items]
    if page.count is not None:
        out[f"{name}@iot.count"] = page.count
    if page.more:
        out[f"{name}@iot.nextLink"] = f"{own}/{name}?" + _nested_query(item.options, page)


def _nested_query(options: Options, page: Page) -> str:
    """The expanded collection's own query (its filter, order, select, expand and count
    written back as text) with ``$skip`` moved on by one page."""
    top = DEFAULT_TOP if options.top is None else options.top
    params = options_text(options, top=top, skip=options.skip + top)
    return urlencode(params, quote_via=quote)


def next_link(request: Request, options: Options, page: Page) -> str:
    """The request's own URL with ``$skip`` moved on by one page (every other option
    exactly as the client sent it), so that following it verbatim gives the next page."""
    top = DEFAULT_TOP if options.top is None else options.top
    params = [(k, v) for k, v in request.query_params.multi_items() if k not in ("$skip", "$top")]
    params += [("$top", str(top)), ("$skip", str(options.skip + top))]
    return str(request.url.replace(query=urlencode(params, quote_via=quote)))


# -- routes -----------------------------------------------------------------------------


def context(request: Request, store: Store) -> Context:
    state = request.app.state
    network = Network.cached(request, store)
    held: tuple[float, Network, Graph] | None = getattr(state, "sta_graph", None)
    if held is not None and held[1] is network and time.monotonic() - held[0] < GRAPH_TTL_S:
        graph = held[2]
    else:
        graph = Graph(network)
        state.sta_graph = (time.monotonic(), network, graph)
    base = str(request.base_url).rstrip("/") + PREFIX
    return Context(base, store, graph)


@router.get("", summary="SensorThings service root")
@router.get("/", include_in_schema=False)
def service_root(request: Request) -> JSONResponse:
    base = str(request.base_url).rstrip("/") + PREFIX
    return JSONResponse(
        {
            "value": [{"name": name, "url": f"{base}/{name}"} for name in ENTITY_SETS],
            "serverSettings": {"conformance": CONFORMANCE},
        }
    )


@router.get("/{path:path}", summary="SensorThings resource paths")
def resource(request: Request, store: StoreDep, path: str) -> Response:
    """Every SensorThings 1.1 read: ``Things``, ``Things(1)``, ``Things(1)/Datastreams``,
    ``Datastreams(5)/Observations``, with ``$filter``, ``$expand``, ``$select``,
    ``$orderby``, ``$top``, ``$skip`` and ``$count`` (docs/open-data.md)."""
    options = request_options(request)
    ctx = context(request, store)
    kind, held = resolve(ctx, path)
    if kind == "value":
        return PlainTextResponse("null" if held is None else str(held))
    if kind == "property":
        return JSONResponse({held[0]: held[1]})
    if kind == "entity":
        return JSONResponse(render(ctx, held, options))
    _, members, _, _ = held
    page = ctx.page(members, options)
    body: dict[str, Any] = {}
    if page.count is not None:
        body["@iot.count"] = page.count
    if page.more and options.top != 0:  # $top=0 asks for the count alone
        body["@iot.nextLink"] = next_link(request, options, page)
    body["value"] = [render(ctx, e, options) for e in page.items]
    return JSONResponse(body)


def install(app: FastAPI) -> None:
    """Add ``/sta/v1.1`` to ``app`` (its errors as SensorThings error documents)."""
    app.include_router(router)
    app.add_exception_handler(QueryError, _error)
    app.add_exception_handler(StaError, _error)


__all__ = ["PREFIX", "HTTPException", "install"]
