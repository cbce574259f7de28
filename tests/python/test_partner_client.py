"""Checks the Python partner client (examples/python/cleanroom_client.py) against a running service.

Runs as Sakura Foods and Kumo Denki on the demo's sample: lists the queries, runs one per partner,
and checks that the Arrow IPC stream loaded into Polars is exactly the typed rows, that every
released row has at least effective k buyers (within the noise the response states), that a
query off Sakura's list is NOT_FOUND, and that an upload sent again with its request id is stored
once.

Usage: python tests/python/test_partner_client.py HOST:PORT
(start the service with `cleanroom demo --keep-serving`). Plain Python, no pytest; exits non-zero
on any failure and ends with an `N passed, N failed` line.
"""

from __future__ import annotations

import math
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.dont_write_bytecode = True  # no __pycache__ next to examples/python/cleanroom_client.py
sys.path.insert(0, str(REPO / "examples" / "python"))

import grpc  # noqa: E402

import cleanroom_client as cc  # noqa: E402

SAKURA = "demo-sakura-token"  # sample data only
KUMO = "demo-kumo-token"
WINDOW = {"start": "2025-11-01", "end": "2026-11-01"}
SAKURA_QUERY = "category_buyers_by_age_band"
KUMO_QUERY = "appliance_buyers_by_owned_model"

passed = 0
failed = 0


def check(name, fn, *args):
    global passed, failed
    try:
        detail = fn(*args)
    except Exception as error:  # noqa: BLE001 - report every failure and go on
        failed += 1
        print(f"FAIL {name}: {type(error).__name__}: {error}")
        if not isinstance(error, (AssertionError, grpc.RpcError)):
            traceback.print_exc()
        return None
    passed += 1
    print(f"ok   {name}" + (f" ({detail})" if isinstance(detail, str) else ""))
    return detail


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b and type(a) is type(b)


def params_for(description, overrides: dict[str, str]) -> dict[str, str]:
    """Text values for every declared parameter: the overrides, else the first allowed value of an
    enum, else the window above for dates."""
    raw = {}
    for spec in description.parameters:
        if spec.name in overrides:
            raw[spec.name] = overrides[spec.name]
        elif spec.type == "enum" and spec.allowed_values:
            raw[spec.name] = spec.allowed_values[0]
        elif spec.type == "date" and spec.name in WINDOW:
            raw[spec.name] = WINDOW[spec.name]
        else:
            raise AssertionError(f"{description.id}: no test value for parameter {spec.name} ({spec.type})")
    return raw


def check_answer(client: cc.PartnerClient, query_id: str, overrides: dict[str, str]) -> str:
    description = client.describe_query(query_id)
    assert description.id == query_id, description.id
    params = cc.build_params(client.pb2, description, params_for(description, overrides))
    response = client.run_query(query_id, params)
    assert response.query_id == query_id, response.query_id
    assert response.effective_k == description.effective_k, (response.effective_k, description.effective_k)
    assert response.effective_k >= 10, f"effective k {response.effective_k} below the floor"

    columns = [c.name for c in response.columns]
    expected_columns = (
        [d.name for d in description.dimensions]
        + list(description.metrics)
        + [f"{m}_ci95" for m in description.metrics]
    )
    assert sorted(columns) == sorted(expected_columns), (columns, expected_columns)

    frame = cc.to_polars(response)
    assert frame.columns == columns, f"frame columns {frame.columns} != declared {columns}"
    assert frame.height == len(response.rows), f"frame has {frame.height} rows, response {len(response.rows)}"
    assert len(response.rows) > 0, "no row released"

    rows = cc.typed_rows(response)
    for i, (frame_row, typed_row) in enumerate(zip(frame.rows(), rows)):
        assert len(frame_row) == len(typed_row) == len(columns), (i, frame_row, typed_row)
        for column, a, b in zip(columns, frame_row, typed_row):
            assert same(a, b), f"row {i} column {column}: frame {a!r} != typed {b!r}"

    # Every released row has at least k true buyers and a noisy count at the release threshold;
    # the value shown is that noisy count.
    assert response.HasField("protection"), "no protection metadata"
    protection = response.protection
    assert protection.mode == "dp", protection.mode
    assert protection.period_epsilon > 0 and protection.answers_per_period > 0, protection
    if "buyers" in columns:
        at = columns.index("buyers")
        small = [row for row in rows if row[at] is None or row[at] < protection.release_threshold]
        assert not small, f"rows below the release threshold {protection.release_threshold}: {small}"
    assert response.audit_id, "no audit id"
    assert response.consent_snapshot_id, "no consent snapshot id"
    assert response.list_version >= 1, response.list_version
    return (
        f"{len(rows)} rows x {len(columns)} columns, {response.suppressed_rows} suppressed, "
        f"k={response.effective_k}, {response.consent_snapshot_id}, list v{response.list_version}, "
        f"{response.audit_id}, protection {protection.mode}"
    )


def assert_in(item, items) -> str:
    assert item in items, f"{item} not in {items}"
    return ", ".join(items)


def expect_code(code: grpc.StatusCode, fn, *args) -> str:
    try:
        fn(*args)
    except grpc.RpcError as error:
        assert error.code() == code, f"expected {code.name}, got {cc.format_rpc_error(error)}"
        return cc.format_rpc_error(error)
    raise AssertionError(f"expected {code.name}, the call succeeded")


def upload_twice(client: cc.PartnerClient) -> str:
    """The same list under one request id, twice (a retry): one version, the second answer
    says it replays the first."""
    records = cc.read_list_csv(REPO / "sample_data" / "partner_lists" / "kumo_denki.csv")
    first, request_id, _ = client.upload_list(records)
    assert not first.already_committed, first
    again, _, _ = client.upload_list(records, request_id=request_id)
    assert again.already_committed, again
    assert again.list_version == first.list_version, (first.list_version, again.list_version)
    return f"list v{first.list_version}, request id {request_id}"


def main(address: str, ca: str | None = None) -> int:
    stubs = cc.load_stubs()
    print(f"stubs generated from {stubs.proto_dir} into {stubs.out_dir}")
    with cc.PartnerClient(address, SAKURA, stubs, ca=ca) as sakura, \
            cc.PartnerClient(address, KUMO, stubs, ca=ca) as kumo:
        sakura_ids = check("sakura: ListQueries", lambda: [q.id for q in sakura.list_queries()]) or []
        check("sakura: list holds " + SAKURA_QUERY, assert_in, SAKURA_QUERY, sakura_ids)
        check(f"sakura: RunQuery {SAKURA_QUERY} start=2025-11-01 end=2026-11-01",
              check_answer, sakura, SAKURA_QUERY, WINDOW)

        kumo_ids = check("kumo: ListQueries", lambda: [q.id for q in kumo.list_queries()]) or []
        check("kumo: list holds " + KUMO_QUERY, assert_in, KUMO_QUERY, kumo_ids)
        check(f"kumo: RunQuery {KUMO_QUERY}", check_answer, kumo, KUMO_QUERY, WINDOW)

        off_list = sorted(set(kumo_ids) - set(sakura_ids)) or [KUMO_QUERY]
        for query_id in off_list:
            check(f"sakura: RunQuery {query_id} (Kumo's only) is NOT_FOUND", expect_code,
                  grpc.StatusCode.NOT_FOUND, sakura.run_query, query_id,
                  {k: stubs.pb2.ParamValue(date_value=v) for k, v in WINDOW.items()})
            check(f"sakura: DescribeQuery {query_id} is NOT_FOUND", expect_code,
                  grpc.StatusCode.NOT_FOUND, sakura.describe_query, query_id)
        check("sakura: RunQuery of an unknown id is NOT_FOUND", expect_code,
              grpc.StatusCode.NOT_FOUND, sakura.run_query, "no_such_query", {})
        check("kumo: an upload sent twice with one request id is stored once",
              upload_twice, kumo)
        with cc.PartnerClient(address, "not-a-token", stubs, ca=ca) as stranger:
            check("unknown token is UNAUTHENTICATED", expect_code, grpc.StatusCode.UNAUTHENTICATED,
                  stranger.list_queries)

    print(f"partner_client: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        sys.exit(1)
    sys.exit(main(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else None))
