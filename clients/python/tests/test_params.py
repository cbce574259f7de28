"""Query parameters: Python values to typed ParamValues by the declared types."""

from __future__ import annotations

import datetime

import pytest

from cleanroom_client import Parameter, QueryDescription, UsageError, build_params, parse_param_args


def description(*parameters: Parameter) -> QueryDescription:
    return QueryDescription(
        id="q", version=1, title="Q", description="", purposes=(), contract_clause="",
        parameters=parameters, dimensions=(), metrics=("buyers",), effective_k=10, content_sha256="",
    )


WINDOW = description(Parameter("start", "date"), Parameter("end", "date"))
MIXED = description(
    Parameter("start", "date"),
    Parameter("top", "int", min="1", max="50"),
    Parameter("category", "enum", allowed_values=("tea", "coffee")),
)


def test_dates_from_text_and_date_objects() -> None:
    params = build_params(WINDOW, {"start": "2025-11-01", "end": datetime.date(2026, 11, 1)})
    assert params["start"].WhichOneof("kind") == "date_value"
    assert params["start"].date_value == "2025-11-01"
    assert params["end"].date_value == "2026-11-01"


def test_int_and_enum() -> None:
    params = build_params(MIXED, {"start": "2025-01-01", "top": 7, "category": "tea"})
    assert params["top"].WhichOneof("kind") == "int_value" and params["top"].int_value == 7
    assert params["category"].WhichOneof("kind") == "string_value" and params["category"].string_value == "tea"
    # Text from a command line converts too.
    assert build_params(MIXED, {"start": "2025-01-01", "top": "12", "category": "tea"})["top"].int_value == 12


@pytest.mark.parametrize("value", ["2025-13-01", "2025-11-1", "20251101", "tomorrow", "2025-11-01T00:00"])
def test_bad_date_text(value: str) -> None:
    with pytest.raises(UsageError, match="expected a date YYYY-MM-DD"):
        build_params(WINDOW, {"start": value, "end": "2026-11-01"})


def test_datetime_and_numbers_are_not_dates() -> None:
    with pytest.raises(UsageError, match="datetime"):
        build_params(WINDOW, {"start": datetime.datetime(2025, 11, 1), "end": "2026-11-01"})
    with pytest.raises(UsageError, match="expected a date, got int"):
        build_params(WINDOW, {"start": 20251101, "end": "2026-11-01"})


@pytest.mark.parametrize("value", ["seven", "7.5", True])
def test_bad_int(value: object) -> None:
    with pytest.raises(UsageError, match="expected an integer"):
        build_params(MIXED, {"start": "2025-01-01", "top": value, "category": "tea"})  # type: ignore[dict-item]


def test_enum_must_be_text() -> None:
    with pytest.raises(UsageError, match="expected text"):
        build_params(MIXED, {"start": "2025-01-01", "top": 1, "category": 3})


def test_unknown_and_missing_names() -> None:
    with pytest.raises(UsageError, match=r"unknown parameter\(s\) finish; declared: start \(date\), end \(date\)"):
        build_params(WINDOW, {"start": "2025-11-01", "finish": "2026-11-01"})
    with pytest.raises(UsageError, match=r"missing parameter\(s\): end \(date\)"):
        build_params(WINDOW, {"start": "2025-11-01"})


def test_out_of_bounds_values_are_left_to_the_service() -> None:
    # The service is the one authority on bounds and allowed values.
    params = build_params(MIXED, {"start": "1999-01-01", "top": 500, "category": "juice"})
    assert params["top"].int_value == 500 and params["category"].string_value == "juice"


def test_parse_param_args() -> None:
    assert parse_param_args(["start=2025-11-01", "brand=Sakura Cha=1"]) == {
        "start": "2025-11-01", "brand": "Sakura Cha=1"}
    with pytest.raises(UsageError, match="NAME=VALUE"):
        parse_param_args(["start"])
    with pytest.raises(UsageError, match="given twice"):
        parse_param_args(["a=1", "a=2"])
