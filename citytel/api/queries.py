"""A SensorThings request as one SQL statement over an entity set's relation.

``$filter`` becomes a WHERE clause (values are bound parameters, never pasted), ``$orderby``
an ORDER BY over indexed columns, ``$top``/``$skip`` LIMIT/OFFSET (one row more than asked, to
know whether to give a nextLink), and a client's usage scope further WHERE terms. Nothing is
filtered or sorted in Python.

Every value is a parameter, so the text of a statement depends only on the request's shape: the
server prepares each shape once per connection and PostgreSQL plans it once (planning a query
over the Observations view, four hypertables behind a UNION ALL, costs more than running it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import tuple_row
from psycopg.types.numeric import Int8BinaryLoader

from citytel.api.entities import EntitySet, Field
from citytel.api.odata import Call, Compare, Expr, Literal, Logical, Not, Options, Path, RequestError
from citytel.core.sensorthings import Scope

__all__ = [
    "Bound",
    "Scope",
    "Statement",
    "compile_filter",
    "count_statement",
    "ident",
    "page_cursor",
    "select_statement",
]

_OPERATORS = {"eq": "=", "ne": "<>", "gt": ">", "ge": ">=", "lt": "<", "le": "<="}
_LITERAL_TYPES = {"number": "number", "string": "text", "datetime": "time", "bool": "bool", "null": "null"}


class Bound:
    """The parameters of one statement, in the order their placeholders appear."""

    def __init__(self) -> None:
        self.values: list[Any] = []

    def __call__(self, value: Any) -> str:
        self.values.append(value)
        return "%s"


def ident(name: str) -> str:
    """A column or relation name of citytel's own (never a client's) as SQL: double-quoted."""
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class Statement:
    # Plain text, not psycopg.sql objects: composing and encoding those per request was a
    # tenth of the API's CPU, and every name here is citytel's own (values are all bound).
    text: str
    params: list[Any]


def _field(entity: EntitySet, path: str) -> Field:
    normal = path.replace("@iot.id", "id")
    found = entity.fields.get(normal)
    if found is None:
        known = ", ".join(sorted(name for name in entity.fields if name != "id"))
        raise RequestError(f"{entity.name} have no property {path!r} to filter or order by; they have @iot.id, {known}")
    return found


def _wkt_numbers(text: str) -> list[tuple[float, float]]:
    pairs = []
    for pair in text.split(","):
        numbers = pair.split()
        if len(numbers) != 2:
            raise RequestError(f"geography: {pair.strip()!r} is not 'longitude latitude'")
        try:
            pairs.append((float(numbers[0]), float(numbers[1])))
        except ValueError:
            raise RequestError(f"geography: {pair.strip()!r} is not two numbers") from None
    return pairs


def _geography(literal: Expr, wanted: str) -> list[tuple[float, float]]:
    """``geography'POINT(113.6 34.7)'`` or ``geography'POLYGON((x y, ...))'`` → coordinates."""
    if not isinstance(literal, Literal) or literal.kind != "geography":
        raise RequestError(f"expected a geography'{wanted}(...)' literal")
    text = re.sub(r"^SRID=\d+;", "", str(literal.value).strip(), flags=re.IGNORECASE)
    pattern = r"POINT\s*\(([^()]*)\)" if wanted == "POINT" else r"POLYGON\s*\(\(([^()]*)\)\)"
    match = re.fullmatch(pattern, text, re.IGNORECASE)
    if match is None:
        raise RequestError(f"geography literal {text!r}: expected {wanted}(...) in WKT")
    coordinates = _wkt_numbers(match.group(1))
    if wanted == "POINT" and len(coordinates) != 1:
        raise RequestError("a POINT has one coordinate pair")
    if wanted == "POLYGON" and len(coordinates) < 3:
        raise RequestError("a POLYGON needs at least three corners")
    return coordinates


def _operand(expression: Expr, entity: EntitySet, bind: Bound) -> tuple[str, str]:
    """SQL for a value in a comparison, and its type."""
    if isinstance(expression, Path):
        found = _field(entity, expression.text)
        return found.sql, found.type
    if isinstance(expression, Literal):
        if expression.kind == "geography":
            raise RequestError("a geography literal goes inside geo.distance or st_within")
        return bind(expression.value), _LITERAL_TYPES[expression.kind]
    if isinstance(expression, Call) and expression.name == "geo.distance":
        if len(expression.args) != 2:
            raise RequestError("geo.distance takes a location and a geography'POINT(x y)'")
        location, kind = _operand(expression.args[0], entity, bind)
        if kind != "point":
            raise RequestError("geo.distance's first argument must be a location")
        [(x, y)] = _geography(expression.args[1], "POINT")
        return f"({location} <-> point({bind(x)}::float8, {bind(y)}::float8))", "number"
    return _predicate(expression, entity, bind), "bool"


def _retype(literal: Expr, wanted: str) -> Literal | None:
    """A quoted time ('2026-12-01T00:00:00Z') compared with a time property is a time."""
    if wanted == "time" and isinstance(literal, Literal) and literal.kind == "string":
        try:
            return Literal(datetime.fromisoformat(str(literal.value)), "datetime")
        except ValueError:
            raise RequestError(f"{literal.value!r} is not a time (ISO 8601, e.g. 2026-12-01T00:00:00Z)") from None
    return None


def _type(expression: Expr, entity: EntitySet) -> str | None:
    """The type of a property path, without binding anything."""
    return _field(entity, expression.text).type if isinstance(expression, Path) else None


def _is_null(expression: Expr) -> bool:
    return isinstance(expression, Literal) and expression.kind == "null"


def _comparison(expression: Compare, entity: EntitySet, bind: Bound) -> str:
    if _is_null(expression.left) or _is_null(expression.right):
        if expression.op not in ("eq", "ne"):
            raise RequestError("null can only be compared with eq or ne")
        other, _kind = _operand(expression.right if _is_null(expression.left) else expression.left, entity, bind)
        return f"({other} IS {'' if expression.op == 'eq' else 'NOT '}NULL)"
    near = _within_distance(expression, entity, bind)
    if near is not None:
        return near
    left_expression = _retype(expression.left, _type(expression.right, entity) or "") or expression.left
    right_expression = _retype(expression.right, _type(expression.left, entity) or "") or expression.right
    left, left_type = _operand(left_expression, entity, bind)
    right, right_type = _operand(right_expression, entity, bind)
    if left_type != right_type or left_type in ("point", "bool"):
        raise RequestError(f"cannot compare a {left_type} with a {right_type} ({expression.op})")
    return f"({left} {_OPERATORS[expression.op]} {right})"


def _within_distance(expression: Compare, entity: EntitySet, bind: Bound) -> str | None:
    """``geo.distance(location, P) lt d``: the points in the circle of radius d around P (which
    the location index finds), then the exact comparison."""
    call, limit = expression.left, expression.right
    if not (
        expression.op in ("lt", "le")
        and isinstance(call, Call)
        and call.name == "geo.distance"
        and isinstance(limit, Literal)
        and limit.kind == "number"
    ):
        return None
    # Values are bound in the order their placeholders appear in the text.
    location, _kind = _operand(call.args[0], entity, bind)
    [(x, y)] = _geography(call.args[1], "POINT")
    circle = f"{location} <@ circle(point({bind(x)}::float8, {bind(y)}::float8), {bind(limit.value)}::float8)"
    distance, _kind = _operand(call, entity, bind)
    return f"({circle} AND {distance} {_OPERATORS[expression.op]} {bind(limit.value)})"


def _like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _text_arguments(call: Call, entity: EntitySet, bind: Bound, swapped: bool = False) -> tuple[str, str]:
    if len(call.args) != 2:
        raise RequestError(f"{call.name} takes two arguments")
    column_arg, text_arg = (call.args[1], call.args[0]) if swapped else call.args
    column, kind = _operand(column_arg, entity, bind)
    if kind != "text" or not isinstance(text_arg, Literal) or text_arg.kind != "string":
        raise RequestError(f"{call.name} compares a text property with a 'quoted string'")
    return column, _like(str(text_arg.value))


def _predicate(expression: Expr, entity: EntitySet, bind: Bound) -> str:
    """SQL for a condition."""
    if isinstance(expression, Logical):
        left = _predicate(expression.left, entity, bind)
        return f"({left} {expression.op.upper()} {_predicate(expression.right, entity, bind)})"
    if isinstance(expression, Not):
        return f"(NOT {_predicate(expression.operand, entity, bind)})"
    if isinstance(expression, Compare):
        return _comparison(expression, entity, bind)
    if isinstance(expression, Call):
        name = expression.name
        if name in ("startswith", "endswith", "contains", "substringof"):
            column, text = _text_arguments(expression, entity, bind, swapped=name == "substringof")
            pattern = {"startswith": f"{text}%", "endswith": f"%{text}"}.get(name, f"%{text}%")
            return f"({column} LIKE {bind(pattern)})"
        if name in ("st_within", "geo.intersects", "st_intersects"):
            if len(expression.args) != 2:
                raise RequestError(f"{name} takes a location and a geography'POLYGON((...))'")
            location, kind = _operand(expression.args[0], entity, bind)
            if kind != "point":
                raise RequestError(f"{name}'s first argument must be a location")
            corners = _geography(expression.args[1], "POLYGON")
            polygon = "(" + ",".join(f"({x!r},{y!r})" for x, y in corners) + ")"
            return f"({location} <@ {bind(polygon)}::polygon)"
        raise RequestError(
            f"unsupported function {name}; supported: startswith, endswith, contains, substringof,"
            " geo.distance, st_within, geo.intersects"
        )
    raise RequestError("$filter must be a condition (a comparison, a function, and/or/not)")


def compile_filter(expression: Expr, entity: EntitySet, bind: Bound) -> str:
    return _predicate(expression, entity, bind)


def _conditions(
    entity: EntitySet, options: Options | None, scope: Scope | None, equal: Mapping[str, Any], bind: Bound
) -> str:
    terms = [f"{ident(column)} = {bind(value)}" for column, value in equal.items()]
    if scope is not None:
        for dimension, column in entity.scoped.items():
            allowed = scope.allowed(dimension)
            if allowed is not None:
                terms.append(f"{ident(column)} = ANY({bind(sorted(allowed))})")
    if options is not None and options.filter is not None:
        terms.append(compile_filter(options.filter, entity, bind))
    if not terms:
        return ""
    return " WHERE " + " AND ".join(terms)


def select_statement(
    entity: EntitySet,
    options: Options,
    scope: Scope | None,
    equal: Mapping[str, Any],
    top: int,
    columns: tuple[str, ...] | None = None,
) -> Statement:
    """One page of ``entity``: ``top + 1`` rows from ``$skip`` on, so a next page shows; all its
    columns, or only ``columns``."""
    bind = Bound()
    where = _conditions(entity, options, scope, equal, bind)
    order: list[str] = []
    for item in options.orderby:
        found = _field(entity, item.path)
        if found.type == "point":
            raise RequestError(f"cannot order by {item.path}")
        order.append(f"{found.sql} {'DESC' if item.descending else 'ASC'}")
    # Then the entity's own order, so pages never overlap or skip a row; in the direction of the
    # first, so one index serves both (time descending: the newest first, read backwards).
    descending = options.orderby[0].descending if options.orderby else False
    order += [f"{ident(column)} {'DESC' if descending else 'ASC'}" for column in entity.order_for(equal)]
    selected = ", ".join(ident(column) for column in columns or entity.columns)
    text = (
        f"SELECT {selected} FROM {entity.relation}{where} ORDER BY {', '.join(order)}"
        f" LIMIT {bind(top + 1)} OFFSET {bind(options.skip)}"
    )
    return Statement(text, bind.values)


def count_statement(entity: EntitySet, options: Options, scope: Scope | None, equal: Mapping[str, Any]) -> Statement:
    bind = Bound()
    text = f"SELECT count(*) FROM {entity.relation}{_conditions(entity, options, scope, equal, bind)}"
    return Statement(text, bind.values)


def page_cursor(connection: psycopg.AsyncConnection[Any]) -> psycopg.AsyncCursor[tuple[Any, ...]]:
    """A cursor for a ``PageRenderer``: rows as tuples in binary (no dict, no text to
    parse), times as PostgreSQL sends them, microseconds since 2000 (a binary timestamp is an
    int8: read by the same compiled loader, where a datetime each would cost a Python object
    more, then an int for its id)."""
    cursor = connection.cursor(row_factory=tuple_row, binary=True)
    cursor.adapters.register_loader("timestamptz", Int8BinaryLoader)
    return cursor
