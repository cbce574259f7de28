"""The package against the real service, loaded with the sample (tests/deploy/serve_in_netns.sh:
`cleanroom serve` with TLS on a non-loopback address, the sample ingested, both partners' lists
uploaded and the allow-list approved).

    CLEANROOM_TEST_ADDR=https://10.200.0.1:50443 CLEANROOM_TEST_CA=ca.pem pytest -m integration clients/python/tests

CLEANROOM_TEST_ADDR: the service (skipped without it; the deploy script always sets it).
CLEANROOM_TEST_CA: its CA certificate, when it serves TLS.
CLEANROOM_TEST_SAKURA_TOKEN, CLEANROOM_TEST_KUMO_TOKEN: the two partners' tokens (default: the
sample's demo tokens, which `serve --allow-demo-tokens` accepts).

It uploads a list version per partner (of the four a window allows) and asks each partner's
query once more than the deployment did: run it against a fresh deployment."""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import polars as pl
import pytest

from cleanroom_client import Answer, CleanroomError, Client, UploadProgress, UsageError, is_loopback, parse_address
from cleanroom_client.answers import same_value, typed_rows

from .conftest import REPO

pytestmark = pytest.mark.integration

ADDR = os.environ.get("CLEANROOM_TEST_ADDR", "")
CA = os.environ.get("CLEANROOM_TEST_CA") or None
SAKURA_TOKEN = os.environ.get("CLEANROOM_TEST_SAKURA_TOKEN", "demo-sakura-token")  # sample data only
KUMO_TOKEN = os.environ.get("CLEANROOM_TEST_KUMO_TOKEN", "demo-kumo-token")
LISTS = REPO / "sample_data" / "partner_lists"
SAKURA_QUERY = "category_buyers_by_age_band"
KUMO_QUERY = "appliance_buyers_by_owned_model"
START, END = datetime.date(2025, 11, 1), "2026-11-01"

@pytest.fixture(scope="module", autouse=True)
def service() -> None:
    if not ADDR:
        pytest.skip("CLEANROOM_TEST_ADDR is not set (tests/deploy/serve_in_netns.sh sets it)")


@pytest.fixture(scope="module")
def sakura(service: None) -> Iterator[Client]:
    with Client.connect(ADDR, SAKURA_TOKEN, ca_file=CA) as client:
        yield client


@pytest.fixture(scope="module")
def kumo(service: None) -> Iterator[Client]:
    with Client.connect(ADDR, KUMO_TOKEN, ca_file=CA) as client:
        yield client


def test_tls_and_no_plain_text_off_loopback(sakura: Client) -> None:
    assert sakura.tls == (CA is not None or ADDR.startswith("https://"))
    _, host, port = parse_address(ADDR)
    if not is_loopback(host):
        with pytest.raises(UsageError, match="refusing to send the token in plain text"):
            Client.connect(f"http://{host}:{port}", SAKURA_TOKEN)


def test_list_and_describe(sakura: Client, kumo: Client) -> None:
    sakura_ids = [q.id for q in sakura.list_queries()]
    kumo_queries = {q.id: q for q in kumo.list_queries()}
    assert SAKURA_QUERY in sakura_ids and KUMO_QUERY in kumo_queries and KUMO_QUERY not in sakura_ids
    assert kumo_queries[KUMO_QUERY].approval == "approved"
    description = sakura.describe_query(SAKURA_QUERY)
    assert description.id == SAKURA_QUERY and description.effective_k >= 10
    assert [(p.name, p.type, p.granularity) for p in description.parameters] == [
        ("start", "date", "month"), ("end", "date", "month")]
    assert description.metrics and description.dimensions and description.contract_clause


def check_answer(client: Client, query_id: str) -> Answer:
    description = client.describe_query(query_id)
    answer = client.run(query_id, start=START, end=END)
    assert answer.query_id == query_id and answer.effective_k == description.effective_k >= 10
    expected = ([d.name for d in description.dimensions] + list(description.metrics)
                + [f"{m}_ci95" for m in description.metrics])
    frame = answer.frame
    assert isinstance(frame, pl.DataFrame)
    assert sorted(frame.columns) == sorted(expected) and frame.columns == [c.name for c in answer.columns]
    assert answer.released_rows == len(answer.response.rows) > 0
    # The Arrow IPC stream and the typed rows carry the same values.
    for i, (frame_row, typed) in enumerate(zip(frame.rows(), typed_rows(answer.response))):
        for column, a, b in zip(frame.columns, frame_row, typed):
            assert same_value(a, b), f"row {i} column {column}: frame {a!r} != typed {b!r}"
    # Every released row's noisy count reaches the release threshold; each metric has its interval.
    protection = answer.protection
    assert protection is not None and protection.mode == "dp"
    assert set(answer.intervals) == set(description.metrics)
    for metric, half_width in answer.intervals.items():
        assert frame[f"{metric}_ci95"].to_list() == [half_width] * frame.height
    if "buyers" in frame.columns:
        assert frame["buyers"].min() >= protection.release_threshold  # type: ignore[operator]
    assert protection.period_epsilon > 0 and protection.answers_used <= protection.answers_per_period
    assert f"over any {protection.period_days} days" in protection.guarantee
    assert answer.audit_id and answer.consent_snapshot_id and answer.list_version >= 1
    assert answer.effective_params == {"start": "2025-11-01", "end": "2026-11-01"}
    return answer


def test_run_sakura_into_polars(sakura: Client) -> None:
    check_answer(sakura, SAKURA_QUERY)


def test_run_kumo_into_polars(kumo: Client) -> None:
    check_answer(kumo, KUMO_QUERY)


def test_refusals_carry_their_status_code(sakura: Client) -> None:
    with pytest.raises(CleanroomError) as caught:
        sakura.describe_query(KUMO_QUERY)  # Kumo's, not Sakura's
    assert caught.value.code == grpc.StatusCode.NOT_FOUND and caught.value.call == "DescribeQuery"
    from cleanroom_client._generated import cleanroom_pb2 as pb2

    with pytest.raises(CleanroomError) as caught:
        sakura.run_with(KUMO_QUERY, {"start": pb2.ParamValue(date_value="2025-11-01"),
                                     "end": pb2.ParamValue(date_value="2026-11-01")})
    assert caught.value.code == grpc.StatusCode.NOT_FOUND and caught.value.call == "RunQuery"
    with pytest.raises(CleanroomError) as caught:
        sakura.run("no_such_query")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(UsageError, match="unknown parameter"):
        sakura.run(SAKURA_QUERY, start=START, end=END, brand="x")
    with Client.connect(ADDR, "not-a-token", ca_file=CA) as stranger:
        with pytest.raises(CleanroomError) as caught:
            stranger.list_queries()
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_upload_a_file_then_its_retry_is_stored_once(kumo: Client, capsys: pytest.CaptureFixture[str]) -> None:
    path = LISTS / "kumo_denki.csv"
    rows = sum(1 for line in path.read_text(encoding="utf-8").splitlines()[1:] if line)
    first = kumo.upload_list(path)
    assert not first.already_committed and first.records_received == rows and first.records_accepted > 0
    assert f"upload {path}: {rows:,} records sent (100%), answered" in capsys.readouterr().err
    again = kumo.upload_list(path, progress=False, request_id=first.request_id)
    assert again.already_committed and again.list_version == first.list_version
    assert again.records_accepted == first.records_accepted


def test_a_strict_upload_with_an_invalid_identifier_is_refused(kumo: Client) -> None:
    with pytest.raises(CleanroomError) as caught:
        kumo.upload_list([{"email": "a@example.jp", "attribute": "KK-10"},
                          {"email": "no at sign", "attribute": "KK-10"}], strict=True, progress=False)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and "no at sign" not in caught.value.message


def test_a_broken_file_stores_nothing_and_a_dataframe_uploads(sakura: Client, tmp_path: Path) -> None:
    # The list version queries match now (asking the same question again is free).
    before = sakura.run(SAKURA_QUERY, start=START, end=END).list_version
    broken = tmp_path / "broken.csv"
    lines = (LISTS / "sakura_foods.csv").read_text(encoding="utf-8").splitlines()
    broken.write_text("\n".join(lines[:2501] + ["one,field,too,many"]) + "\n", encoding="utf-8")
    with pytest.raises(UsageError, match="line 2502 has 4 fields where the header has 3"):
        sakura.upload_list(broken, progress=False)
    # Identifiers stay text (a phone read as a number loses its leading zero).
    frame = pl.read_csv(LISTS / "sakura_foods.csv", infer_schema_length=0)
    seen: list[UploadProgress] = []
    result = sakura.upload_list(frame, progress=seen.append)
    assert result.list_version == before + 1, "the broken upload stored a version"
    assert result.records_received == frame.height and not result.already_committed
    assert seen[-1].done and seen[-1].records_sent == seen[-1].total_records == frame.height
    assert sakura.run(SAKURA_QUERY, start=START, end=END).list_version == result.list_version
