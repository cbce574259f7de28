"""The client against an in-process PartnerService on loopback (the generated servicer): the
token on every call, answers into Polars, errors as CleanroomError, and uploads streamed in
chunks under one request id that a retry reuses. The real service is in test_integration.py."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import polars as pl
import pytest

from cleanroom_client import CleanroomError, Client, UploadProgress, UsageError
from cleanroom_client._generated import cleanroom_pb2 as pb2
from cleanroom_client._generated import cleanroom_pb2_grpc as pb2_grpc
from cleanroom_client.answers import same_value, typed_rows

TOKEN = "fake-partner-token"

FRAME = pl.DataFrame({
    "age_band": ["20-29", "30-39"],
    "buyers": [41, 57],
    "buyers_ci95": [9, 9],
})


def answer_response(query_id: str, params: dict[str, pb2.ParamValue]) -> pb2.RunQueryResponse:
    buffer = io.BytesIO()
    FRAME.write_ipc_stream(buffer)
    response = pb2.RunQueryResponse(
        query_id=query_id, query_version=3, arrow_ipc=buffer.getvalue(), suppressed_rows=4,
        effective_k=10, consent_snapshot_id="cs-1", list_version=2, audit_id="aud-1", elapsed_ms=250,
        effective_params={name: value.date_value for name, value in params.items()},
        protection=pb2.Protection(
            mode="dp", noise_sd={"buyers": 4.5}, per_member_bound={"buyers": 1}, release_threshold=14,
            interval95={"buyers": 9}, rows_per_member=1, fresh=True, rho_spent=0.01, epsilon_spent=0.4,
            delta_spent=5e-8, period_epsilon=8.0, period_delta=1e-6, period_days=30, answers_per_period=20,
            answers_used=3, budget_resets_at="2026-12-01T00:00:00Z",
        ),
    )
    for name, kind in (("age_band", "string"), ("buyers", "int"), ("buyers_ci95", "int")):
        response.columns.add(name=name, type=kind)
    for band, buyers, ci in FRAME.rows():
        row = response.rows.add()
        row.values.add(string_value=band)
        row.values.add(int_value=buyers)
        row.values.add(int_value=ci)
    return response


class FakePartnerService(pb2_grpc.PartnerServiceServicer):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.versions = 1
        # request id -> committed response
        self.committed: dict[str, pb2.UploadListResponse] = {}
        self.uploads: list[dict[str, Any]] = []
        self.break_after_commit = 0
        self.finished = threading.Event()
        self.run_requests: list[pb2.RunQueryRequest] = []

    def authorize(self, context: grpc.ServicerContext) -> None:
        if dict(context.invocation_metadata()).get("authorization") != f"Bearer {TOKEN}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown token")

    def ListQueries(self, request: pb2.ListQueriesRequest, context: grpc.ServicerContext) -> pb2.ListQueriesResponse:
        self.authorize(context)
        return pb2.ListQueriesResponse(queries=[
            pb2.QuerySummary(id="buyers_by_age_band", version=3, title="Buyers by age band", approval="approved"),
            pb2.QuerySummary(id="pending_one", version=1, title="Pending", approval="pending"),
        ])

    def DescribeQuery(self, request: pb2.DescribeQueryRequest, context: grpc.ServicerContext) -> pb2.QueryDescription:
        self.authorize(context)
        if request.query_id != "buyers_by_age_band":
            context.abort(grpc.StatusCode.NOT_FOUND, f"query {request.query_id} not found")
        return pb2.QueryDescription(
            id="buyers_by_age_band", version=3, title="Buyers by age band", description="Buyers per age band.",
            purposes=["product_insight"], contract_clause="art. 4.2",
            parameters=[pb2.ParameterSpec(name="start", type="date", granularity="month"),
                        pb2.ParameterSpec(name="end", type="date", granularity="month")],
            dimensions=[pb2.DimensionSpec(name="age_band", domain=["20-29", "30-39", "40-49"])],
            metrics=["buyers"], effective_k=10, content_sha256="ab" * 32,
        )

    def RunQuery(self, request: pb2.RunQueryRequest, context: grpc.ServicerContext) -> pb2.RunQueryResponse:
        self.authorize(context)
        self.run_requests.append(request)
        if request.params["start"].date_value > request.params["end"].date_value:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "start is after end")
        return answer_response(request.query_id, dict(request.params))

    def UploadList(self, requests: Iterator[pb2.UploadListRequest],
                   context: grpc.ServicerContext) -> pb2.UploadListResponse:
        self.authorize(context)
        context.add_callback(self.finished.set)
        first = next(requests)
        header = first.header
        chunks = []
        try:
            for message in requests:
                chunks.append(len(message.chunk.records))
                records = list(message.chunk.records)
                self.uploads.append({"request_id": header.request_id, "strict": header.strict, "records": records})
        except Exception:
            # The client cancelled the stream (or it broke): nothing is committed.
            return pb2.UploadListResponse()
        # gRPC Python's server may end the request iterator of a cancelled call as if the stream
        # had ended, just before it marks the call cancelled: give the cancel time to land (a
        # real service sees the cancel as an error of the stream).
        time.sleep(0.2)
        if not context.is_active():
            return pb2.UploadListResponse()
        with self.lock:
            if header.request_id in self.committed:
                original = pb2.UploadListResponse()
                original.CopyFrom(self.committed[header.request_id])
                original.already_committed = True
                return original
            self.versions += 1
            total = sum(chunks)
            response = pb2.UploadListResponse(list_version=self.versions, records_received=total,
                                              records_accepted=total, audit_id=f"aud-up-{self.versions}")
            self.committed[header.request_id] = response
            self.chunk_sizes = chunks
            if self.break_after_commit:
                # Committed, but the answer is lost: the client only sees the connection break.
                self.break_after_commit -= 1
                context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
            return response


@pytest.fixture
def service() -> Iterator[tuple[FakePartnerService, str]]:
    fake = FakePartnerService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb2_grpc.add_PartnerServiceServicer_to_server(fake, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield fake, f"http://127.0.0.1:{port}"
    server.stop(None)


@pytest.fixture
def client(service: tuple[FakePartnerService, str]) -> Iterator[Client]:
    with Client.connect(service[1], TOKEN) as c:
        yield c


def test_list_and_describe(client: Client) -> None:
    queries = client.list_queries()
    assert [(q.id, q.approval) for q in queries] == [("buyers_by_age_band", "approved"), ("pending_one", "pending")]
    assert str(queries[0]) == "buyers_by_age_band (v3): Buyers by age band  [approved]"
    d = client.describe_query("buyers_by_age_band")
    assert [p.name for p in d.parameters] == ["start", "end"] and d.parameter("end") is not None
    assert d.dimensions[0].domain == ("20-29", "30-39", "40-49") and d.effective_k == 10
    assert "dimension age_band: 3 values" in str(d)


def test_run_into_polars_with_intervals_and_protection(service: tuple[FakePartnerService, str], client: Client) -> None:
    import datetime

    answer = client.run("buyers_by_age_band", start=datetime.date(2025, 11, 1), end="2026-11-01")
    request = service[0].run_requests[-1]
    assert request.params["start"].date_value == "2025-11-01" and request.params["end"].date_value == "2026-11-01"
    assert answer.frame.equals(FRAME)
    assert answer.frame.columns == [c.name for c in answer.columns] == ["age_band", "buyers", "buyers_ci95"]
    for frame_row, typed in zip(answer.frame.rows(), typed_rows(answer.response)):
        assert all(same_value(a, b) for a, b in zip(frame_row, typed))
    assert (answer.released_rows, answer.suppressed_rows, answer.effective_k) == (2, 4, 10)
    assert answer.intervals == {"buyers": 9} and answer.fresh
    assert answer.effective_params == {"start": "2025-11-01", "end": "2026-11-01"}
    protection = answer.protection
    assert protection is not None and protection.release_threshold == 14 and protection.noise_sd == {"buyers": 4.5}
    assert protection.guarantee == (
        "everything this partner receives over any 30 days together is (8, 1e-06)-differentially private, "
        "paid out as 20 fresh answers; 3 used in this period (the oldest charge leaves it at 2026-12-01T00:00:00Z)"
    )
    summary = answer.summary()
    assert "suppressed rows: 4" in summary and "95% intervals buyers=±9" in summary and "epsilon spent 0.4" in summary


def test_service_errors_carry_the_status_code(service: tuple[FakePartnerService, str], client: Client) -> None:
    with pytest.raises(CleanroomError) as caught:
        client.describe_query("not_on_my_list")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert caught.value.message == "query not_on_my_list not found" and caught.value.call == "DescribeQuery"
    assert str(caught.value) == "DescribeQuery failed: NOT_FOUND: query not_on_my_list not found"
    with pytest.raises(CleanroomError) as caught:
        client.run("buyers_by_age_band", start="2026-11-01", end="2025-11-01")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and caught.value.call == "RunQuery"
    # A mistake in the parameters is caught before RunQuery.
    before = len(service[0].run_requests)
    with pytest.raises(UsageError, match="missing parameter"):
        client.run("buyers_by_age_band", start="2025-11-01")
    assert len(service[0].run_requests) == before
    with Client.connect(service[1], "someone-else") as stranger:
        with pytest.raises(CleanroomError) as caught:
            stranger.list_queries()
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED


def list_file(tmp_path: Path, rows: int) -> Path:
    path = tmp_path / "list.csv"
    path.write_text("email,phone,attribute\n" + "".join(f"m{i}@example.jp,,gold\n" for i in range(rows)))
    return path


def test_upload_a_file_in_chunks_with_progress(service: tuple[FakePartnerService, str], client: Client,
                                                tmp_path: Path) -> None:
    seen: list[UploadProgress] = []
    result = client.upload_list(list_file(tmp_path, 4500), progress=seen.append)
    fake = service[0]
    assert fake.chunk_sizes == [2000, 2000, 500]
    assert (result.list_version, result.records_received) == (2, 4500)
    assert not result.already_committed and result.attempts == 1
    assert len(result.request_id) == 32 and {u["request_id"] for u in fake.uploads} == {result.request_id}
    assert fake.uploads[0]["records"][0] == pb2.CustomerRecord(email="m0@example.jp", attribute="gold")
    assert [p.records_sent for p in seen] == [2000, 4000, 4500, 4500] and seen[-1].done
    assert seen[-1].fraction() == 1.0


def test_upload_a_dataframe_with_progress_on_stderr(service: tuple[FakePartnerService, str], client: Client,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    frame = pl.DataFrame({"email": [f"m{i}@example.jp" for i in range(2500)], "attribute": ["gold"] * 2500})
    result = client.upload_list(frame, strict=True)
    assert result.list_version == 2 and result.records_accepted == 2500
    assert service[0].uploads[0]["strict"] is True
    err = capsys.readouterr().err
    assert "upload DataFrame: 2,500 records sent of 2,500 (100%), answered" in err


def test_a_retry_reuses_the_request_id_and_is_not_stored_twice(service: tuple[FakePartnerService, str],
                                                               client: Client, tmp_path: Path) -> None:
    fake = service[0]
    fake.break_after_commit = 1  # the first attempt commits, then its answer is lost
    seen: list[UploadProgress] = []
    result = client.upload_list(list_file(tmp_path, 2100), progress=seen.append, pause=0.01)
    assert result.attempts == 2 and result.already_committed and result.list_version == 2
    assert fake.versions == 2  # stored once
    ids = {u["request_id"] for u in fake.uploads}
    assert ids == {result.request_id}
    assert sum(len(u["records"]) for u in fake.uploads) == 2 * 2100  # the whole list sent twice
    assert [p.attempt for p in seen] == [1, 1, 2, 2, 2]
    # Given again by the caller, the same id is answered from the first commit.
    again = client.upload_list(list_file(tmp_path, 2100), progress=False, request_id=result.request_id)
    assert again.already_committed and again.list_version == 2 and fake.versions == 2


def test_a_refusal_is_not_retried(service: tuple[FakePartnerService, str], tmp_path: Path) -> None:
    with Client.connect(service[1], "someone-else") as stranger:
        with pytest.raises(CleanroomError) as caught:
            stranger.upload_list(list_file(tmp_path, 10), progress=False)
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED and caught.value.call == "UploadList"
    assert service[0].versions == 1


def test_a_broken_file_cancels_the_upload_and_stores_nothing(service: tuple[FakePartnerService, str],
                                                             client: Client, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    path = list_file(tmp_path, 2500)
    with path.open("a") as file:
        file.write("secret@example.jp,gold\n")  # two fields of three, on line 2502
    with pytest.raises(UsageError, match="line 2502 has 2 fields where the header has 3"):
        client.upload_list(path, progress=False)
    fake = service[0]
    assert fake.finished.wait(5), "the call did not end on the service"
    assert fake.versions == 1 and not fake.committed
    # The first chunk was sent before the bad row was read; the cancel may overtake it.
    assert sum(len(u["records"]) for u in fake.uploads) in (0, 2000)
    assert "Exception iterating requests" not in caplog.text


def test_bad_upload_arguments(client: Client, tmp_path: Path) -> None:
    path = list_file(tmp_path, 1)
    with pytest.raises(UsageError, match="request id"):
        client.upload_list(path, request_id="has spaces")
    with pytest.raises(UsageError, match="request id"):
        client.upload_list(path, request_id="x" * 65)
    with pytest.raises(UsageError, match="progress"):
        client.upload_list(path, progress="yes")  # type: ignore[arg-type]
