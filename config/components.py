"""Settings that belong to components (detectors, codecs, sinks), checked against the component.

The schema in ``schema.py`` keeps a component's table raw (``[detectors.<name>]``): the component
declares its own settings struct next to its code and registers it by name, and its stage
converts the table through ``component_settings`` when it builds the component, at start-up.
Errors name the key and, for a misspelt name or key, suggest the nearest one.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import msgspec

from citytel.config.schema import ConfigError, Strict

__all__ = ["component_settings", "suggest", "unknown_component"]

_S = TypeVar("_S", bound=Strict)


def suggest(word: str, choices: Iterable[str]) -> str:
    """' (did you mean "x"?)' for the nearest choice, or nothing when none is near."""
    near = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f' (did you mean "{near[0]}"?)' if near else ""


def unknown_component(place: str, family: str, name: str, known: Iterable[str]) -> ConfigError:
    """``family``: what was looked for ("detector", "codec", "sink")."""
    known = sorted(known)
    return ConfigError(f"{place}: no {family} named {name!r}{suggest(name, known)}; known: {', '.join(known)}")


def component_settings(settings_type: type[_S], raw: Mapping[str, Any], place: str) -> _S:
    """Convert a component's raw table to its own settings struct, or say exactly what is wrong."""
    fields = settings_type.__struct_fields__
    for key in raw:
        if key not in fields:
            raise ConfigError(
                f"{place}: unknown key {key!r}{suggest(key, fields)}; keys it takes: {', '.join(fields) or 'none'}"
            )
    try:
        return msgspec.convert(dict(raw), type=settings_type, strict=True)
    except msgspec.ValidationError as error:
        message = str(error).replace("$.", "")
        field = message.rsplit("at `", 1)[-1].rstrip("`") if "at `" in message else ""
        hint = get_type_hints(settings_type).get(field)
        if get_origin(hint) is Literal:
            message += f"; accepted: {', '.join(map(str, get_args(hint)))}"
        raise ConfigError(f"{place}: {message}") from None
