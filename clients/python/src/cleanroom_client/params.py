"""Query parameters: Python values to the typed `ParamValue`s RunQuery takes, by the types
DescribeQuery declares."""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable, Mapping
from typing import Union

from ._generated import cleanroom_pb2 as pb2
from .errors import UsageError
from .models import QueryDescription

#: What a parameter may be given as: a date (or `YYYY-MM-DD` text) for `date`, an int (or its
#: decimal text) for `int`, text for `enum`.
ParamInput = Union[str, int, datetime.date]

_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def build_params(description: QueryDescription, params: Mapping[str, ParamInput]) -> dict[str, pb2.ParamValue]:
    """Converts `params` with the types `description` declares: date -> `date_value`
    (`YYYY-MM-DD`), int -> `int_value`, enum -> `string_value`.

    Unknown, missing and badly typed parameters raise UsageError. Bounds, granularity and allowed
    values are left to the service, the one authority on them (it answers INVALID_ARGUMENT)."""
    declared = {p.name: p for p in description.parameters}
    unknown = sorted(set(params) - set(declared))
    if unknown:
        names = ", ".join(f"{p.name} ({p.type})" for p in description.parameters) or "none"
        raise UsageError(f"{description.id}: unknown parameter(s) {', '.join(unknown)}; declared: {names}")
    missing = [p for p in description.parameters if p.name not in params]
    if missing:
        raise UsageError(
            f"{description.id}: missing parameter(s): " + "; ".join(f"{p.name} ({p.accepts()})" for p in missing)
        )
    converted = {}
    for name, value in params.items():
        kind = declared[name].type
        if kind == "date":
            converted[name] = pb2.ParamValue(date_value=_date_text(name, value))
        elif kind == "int":
            converted[name] = pb2.ParamValue(int_value=_int_value(name, value))
        elif kind == "enum":
            if not isinstance(value, str):
                raise UsageError(f"{name}: expected text (one of {', '.join(declared[name].allowed_values)}), "
                                 f"got {type(value).__name__}")
            converted[name] = pb2.ParamValue(string_value=value)
        else:
            raise UsageError(f"{description.id}: parameter {name} has a type this client does not know: {kind!r}")
    return converted


def _date_text(name: str, value: ParamInput) -> str:
    if isinstance(value, datetime.datetime):
        raise UsageError(f"{name}: expected a date, got a datetime (use .date())")
    if isinstance(value, datetime.date):
        return value.isoformat()
    if isinstance(value, str):
        try:
            if _DATE.fullmatch(value):
                datetime.date.fromisoformat(value)
                return value
        except ValueError:
            pass
        raise UsageError(f"{name}={value!r}: expected a date YYYY-MM-DD")
    raise UsageError(f"{name}: expected a date, got {type(value).__name__}")


def _int_value(name: str, value: ParamInput) -> int:
    if isinstance(value, bool):
        raise UsageError(f"{name}: expected an integer, got bool")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip(), 10)
        except ValueError:
            raise UsageError(f"{name}={value!r}: expected an integer") from None
    raise UsageError(f"{name}: expected an integer, got {type(value).__name__}")


def parse_param_args(items: Iterable[str]) -> dict[str, str]:
    """Command-line `NAME=VALUE` items as a dict: `["start=2025-11-01"]` -> `{"start": "2025-11-01"}`
    (for `Client.run(query_id, **params)`, which converts the text by the declared types)."""
    params: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise UsageError(f"{item!r}: expected NAME=VALUE")
        if name in params:
            raise UsageError(f"parameter {name} given twice")
        params[name] = value
    return params
