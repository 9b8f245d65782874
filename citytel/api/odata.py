"""The SensorThings request grammar: resource paths, query options and ``$filter``.

SensorThings v1.1 borrows OData's URL conventions. This module turns a request's path and query
string into plain values (a ``Resource``, ``Options`` and a ``$filter`` syntax tree) and knows
nothing of SQL or of the database: ``citytel.api.entities`` gives the tree its meaning. Every
input is bounded (length, nesting, counts) and every refusal is a ``RequestError`` whose message
says what is wrong, for a 400 answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeAlias

__all__ = [
    "Call",
    "Compare",
    "Expand",
    "Expr",
    "Literal",
    "Logical",
    "Not",
    "Options",
    "OrderBy",
    "Path",
    "RequestError",
    "Resource",
    "Segment",
    "parse_filter",
    "parse_options",
    "parse_path",
]

MAX_FILTER_CHARS = 4000
MAX_DEPTH = 24
MAX_EXPAND_DEPTH = 3


class RequestError(ValueError):
    """The request cannot be read; the message is the client's 400 answer."""


# --- resource paths ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """One step of a resource path: an entity set or navigation property, maybe with an id."""

    name: str
    id: str | int | None = None


@dataclass(frozen=True)
class Resource:
    """``/Things('a')/Datastreams``: the steps, and a trailing property name (``/name``) if any."""

    segments: tuple[Segment, ...]
    property: str | None = None


_SEGMENT = re.compile(r"([A-Za-z]+)(?:\((.*)\))?")


def _key(text: str) -> str | int:
    """An entity key as written in a path: ``'text'`` (with '' for a quote) or an integer."""
    if len(text) >= 2 and text[0] == "'" and text[-1] == "'":
        inner = text[1:-1]
        if "'" in inner.replace("''", ""):
            raise RequestError(f"bad key {text}: a quote inside a key is written ''")
        return inner.replace("''", "'")
    if re.fullmatch(r"-?\d{1,18}", text):
        return int(text)
    raise RequestError(f"bad key ({text}): write a string key in single quotes, e.g. ('air-0001:pm2_5')")


def parse_path(path: str) -> Resource:
    """The part of a URL path after ``/v1.1``: ``/Datastreams('x')/Observations``."""
    parts = [part for part in path.split("/") if part]
    if len(parts) > 6:
        raise RequestError("resource path too deep")
    segments: list[Segment] = []
    trailing: str | None = None
    for position, part in enumerate(parts):
        match = _SEGMENT.fullmatch(part)
        if match is None:
            raise RequestError(f"cannot read path segment {part!r}")
        name, key = match.group(1), match.group(2)
        if key is None and name[0].islower() and segments and position == len(parts) - 1:
            # /Things('a')/name: a property (lowerCamelCase in SensorThings; entity sets and
            # navigation properties are UpperCamelCase).
            trailing = name
            break
        segments.append(Segment(name, _key(key) if key is not None else None))
    if not segments:
        raise RequestError("no entity set in the path")
    return Resource(tuple(segments), trailing)


# --- $filter -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Literal:
    value: object
    kind: str  # number, string, bool, null, datetime, geography


@dataclass(frozen=True)
class Path:
    """A property path such as ``result``, ``properties/kind`` or ``Thing/@iot.id``."""

    text: str


@dataclass(frozen=True)
class Compare:
    op: str  # eq ne gt ge lt le
    left: Expr
    right: Expr


@dataclass(frozen=True)
class Logical:
    op: str  # and, or
    left: Expr
    right: Expr


@dataclass(frozen=True)
class Not:
    operand: Expr


@dataclass(frozen=True)
class Call:
    name: str
    args: tuple[Expr, ...]


Expr: TypeAlias = Literal | Path | Compare | Logical | Not | Call

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<geography>geography'(?:[^']|'')*')
    | (?P<string>'(?:[^']|'')*')
    | (?P<datetime>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?(?:Z|[+-]\d{2}:\d{2}))
    | (?P<number>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
    | (?P<name>[A-Za-z_@$][A-Za-z0-9_@.$/]*)
    | (?P<punct>[(),])
    )""",
    re.VERBOSE,
)
_COMPARISONS = ("eq", "ne", "gt", "ge", "lt", "le")


@dataclass
class _Tokens:
    items: list[tuple[str, str]]
    position: int = 0

    def peek(self) -> tuple[str, str] | None:
        return self.items[self.position] if self.position < len(self.items) else None

    def take(self) -> tuple[str, str]:
        token = self.peek()
        if token is None:
            raise RequestError("$filter ends too early")
        self.position += 1
        return token

    def take_word(self, word: str) -> bool:
        token = self.peek()
        if token is not None and token[0] == "name" and token[1].lower() == word:
            self.position += 1
            return True
        return False

    def expect(self, text: str) -> None:
        _kind, value = self.take()
        if value != text:
            raise RequestError(f"$filter: expected {text!r}, found {value!r}")


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    text = text.rstrip()  # each token takes the blanks before it; none may be left at the end
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            raise RequestError(f"$filter: cannot read from {text[position : position + 20]!r}")
        kind = match.lastgroup
        assert kind is not None
        tokens.append((kind, match.group(kind)))
        position = match.end()
    return tokens


def parse_filter(text: str) -> Expr:
    """``result gt 50 and phenomenonTime ge 2026-12-01T00:00:00Z`` → a syntax tree."""
    if len(text) > MAX_FILTER_CHARS:
        raise RequestError(f"$filter longer than {MAX_FILTER_CHARS} characters")
    tokens = _Tokens(_tokenize(text))
    if tokens.peek() is None:
        raise RequestError("$filter is empty")
    expression = _or(tokens, 0)
    if tokens.peek() is not None:
        raise RequestError(f"$filter: unexpected {tokens.peek()[1]!r}")  # type: ignore[index]
    return expression


def _deeper(depth: int) -> int:
    if depth >= MAX_DEPTH:
        raise RequestError(f"$filter nested deeper than {MAX_DEPTH}")
    return depth + 1


def _or(tokens: _Tokens, depth: int) -> Expr:
    left = _and(tokens, _deeper(depth))
    while tokens.take_word("or"):
        left = Logical("or", left, _and(tokens, _deeper(depth)))
    return left


def _and(tokens: _Tokens, depth: int) -> Expr:
    left = _not(tokens, depth)
    while tokens.take_word("and"):
        left = Logical("and", left, _not(tokens, depth))
    return left


def _not(tokens: _Tokens, depth: int) -> Expr:
    if tokens.take_word("not"):
        return Not(_not(tokens, _deeper(depth)))
    return _comparison(tokens, depth)


def _comparison(tokens: _Tokens, depth: int) -> Expr:
    left = _primary(tokens, depth)
    token = tokens.peek()
    if token is not None and token[0] == "name" and token[1].lower() in _COMPARISONS:
        tokens.take()
        return Compare(token[1].lower(), left, _primary(tokens, depth))
    return left


def _primary(tokens: _Tokens, depth: int) -> Expr:
    kind, text = tokens.take()
    if text == "(":
        inner = _or(tokens, _deeper(depth))
        tokens.expect(")")
        return inner
    if kind == "string":
        return Literal(text[1:-1].replace("''", "'"), "string")
    if kind == "geography":
        return Literal(text[len("geography'") : -1].replace("''", "'"), "geography")
    if kind == "number":
        return Literal(float(text) if any(c in text for c in ".eE") else int(text), "number")
    if kind == "datetime":
        try:
            return Literal(datetime.fromisoformat(text), "datetime")
        except ValueError:
            raise RequestError(f"$filter: {text} is not a valid time") from None
    if kind == "name":
        lowered = text.lower()
        if lowered in ("true", "false"):
            return Literal(lowered == "true", "bool")
        if lowered == "null":
            return Literal(None, "null")
        following = tokens.peek()
        if following is not None and following[1] == "(":
            tokens.take()
            args: list[Expr] = []
            if tokens.peek() is not None and tokens.peek()[1] == ")":  # type: ignore[index]
                tokens.take()
            else:
                while True:
                    args.append(_or(tokens, _deeper(depth)))
                    if tokens.take()[1] == ")":
                        break
            return Call(lowered, tuple(args))
        return Path(text)
    raise RequestError(f"$filter: unexpected {text!r}")


# --- query options -------------------------------------------------------------------------------


@dataclass(frozen=True)
class OrderBy:
    path: str
    descending: bool = False


@dataclass(frozen=True)
class Expand:
    name: str
    options: Options


@dataclass(frozen=True)
class Options:
    top: int | None = None
    skip: int = 0
    count: bool = False
    filter: Expr | None = None
    orderby: tuple[OrderBy, ...] = ()
    select: tuple[str, ...] = ()
    expand: tuple[Expand, ...] = field(default=())


_OPTIONS = ("$top", "$skip", "$count", "$filter", "$orderby", "$select", "$expand")


def split_top_level(text: str, separator: str) -> list[str]:
    """``a($x=1,2),b`` split on ``,`` outside parentheses and quotes."""
    parts: list[str] = []
    depth = 0
    quoted = False
    start = 0
    for position, character in enumerate(text):
        if character == "'":
            quoted = not quoted
        elif quoted:
            continue
        elif character == "(":
            depth += 1
        elif character == ")":
            depth -= 1
            if depth < 0:
                raise RequestError(f"unbalanced parentheses in {text!r}")
        elif character == separator and depth == 0:
            parts.append(text[start:position])
            start = position + 1
    if depth != 0 or quoted:
        raise RequestError(f"unbalanced parentheses or quotes in {text!r}")
    parts.append(text[start:])
    return [part.strip() for part in parts if part.strip()]


def _integer(name: str, text: str, limit: int) -> int:
    if not re.fullmatch(r"\d{1,12}", text.strip()):
        raise RequestError(f"{name} must be a whole number, not {text!r}")
    value = int(text)
    if value > limit:
        raise RequestError(f"{name}={value} is over the limit of {limit}")
    return value


def parse_options(pairs: list[tuple[str, str]], max_top: int, depth: int = 0) -> Options:
    """The ``$``-options of a query string (or of one ``$expand`` item), checked."""
    seen: dict[str, str] = {}
    for name, value in pairs:
        if not name.startswith("$"):
            continue  # other parameters are the client's own business
        if name not in _OPTIONS:
            raise RequestError(f"unsupported query option {name}; supported: {', '.join(_OPTIONS)}")
        if name in seen:
            raise RequestError(f"query option {name} given twice")
        seen[name] = value
    top = _integer("$top", seen["$top"], max_top) if "$top" in seen else None
    skip = _integer("$skip", seen["$skip"], 10**9) if "$skip" in seen else 0
    count = False
    if "$count" in seen:
        if seen["$count"] not in ("true", "false"):
            raise RequestError("$count must be true or false")
        count = seen["$count"] == "true"
    orderby: list[OrderBy] = []
    for item in split_top_level(seen.get("$orderby", ""), ","):
        words = item.split()
        if len(words) > 2 or (len(words) == 2 and words[1].lower() not in ("asc", "desc")):
            raise RequestError(f"$orderby item {item!r}: a property, then asc or desc")
        orderby.append(OrderBy(words[0], len(words) == 2 and words[1].lower() == "desc"))
    select = tuple(split_top_level(seen.get("$select", ""), ","))
    expands: list[Expand] = []
    for item in split_top_level(seen.get("$expand", ""), ","):
        if depth >= MAX_EXPAND_DEPTH:
            raise RequestError(f"$expand nested deeper than {MAX_EXPAND_DEPTH}")
        match = re.fullmatch(r"([A-Za-z]+(?:/[A-Za-z]+)*)(?:\((.*)\))?", item, re.DOTALL)
        if match is None:
            raise RequestError(f"cannot read $expand item {item!r}")
        name, inner = match.group(1), match.group(2) or ""
        inner_pairs: list[tuple[str, str]] = []
        for option in split_top_level(inner, ";"):
            key, equals, value = option.partition("=")
            if not equals:
                raise RequestError(f"$expand option {option!r}: write $name=value")
            inner_pairs.append((key.strip(), value.strip()))
        # Datastreams/Observations: expand Datastreams, and within each its Observations, to
        # which the options apply.
        *outer, last = name.split("/")
        if len(outer) + depth >= MAX_EXPAND_DEPTH:
            raise RequestError(f"$expand nested deeper than {MAX_EXPAND_DEPTH}")
        expand = Expand(last, parse_options(inner_pairs, max_top, depth + 1 + len(outer)))
        for step in reversed(outer):
            expand = Expand(step, Options(expand=(expand,)))
        expands.append(expand)
    return Options(
        top=top,
        skip=skip,
        count=count,
        filter=parse_filter(seen["$filter"]) if seen.get("$filter", "").strip() else None,
        orderby=tuple(orderby),
        select=select,
        expand=tuple(expands),
    )
