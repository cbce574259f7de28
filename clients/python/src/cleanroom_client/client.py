"""The partner's connection to the clean room: `Client.connect`, then list, describe and run
queries and upload customer lists."""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any, Callable, Optional, TypeVar, Union

import grpc

from ._generated import cleanroom_pb2 as pb2
from ._generated import cleanroom_pb2_grpc as pb2_grpc
from .answers import Answer
from .errors import CleanroomError, UsageError
from .lists import CHUNK_RECORDS, ListInput, ListSource, ProgressCallback, list_source, progress_callback
from .models import QueryDescription, QuerySummary, UploadProgress, UploadResult
from .params import ParamInput, build_params

#: Seconds a call may take before it is abandoned (DEADLINE_EXCEEDED).
DEFAULT_TIMEOUT_S = 120.0
#: Seconds `Client.connect` waits for the connection (and the TLS handshake) to be made.
DEFAULT_CONNECT_TIMEOUT_S = 10.0
#: The largest answer accepted, as the Rust client allows (gRPC's default is 4 MiB).
MAX_RECEIVE_BYTES = 64 * 1024 * 1024
#: Sends of one upload, the first included, while its connection breaks.
UPLOAD_ATTEMPTS = 4
#: Failures after which an upload may or may not have been carried out: it is sent again under
#: its request id, which the service recognises (a committed one is answered, not stored twice).
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED})

_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_T = TypeVar("_T")

PathArg = Union[str, os.PathLike[str]]


class Client:
    """PartnerService calls as one partner. The bearer token decides which partner: no request
    field can name another one.

        with Client.connect("https://cleanroom.example.jp:50051", token, ca_file="ca.pem") as client:
            answer = client.run("category_buyers_by_age_band", start="2025-11-01", end="2026-11-01")
            print(answer.frame, answer.protection)

    Every call raises CleanroomError when the service refuses it, UsageError when something given
    is wrong before anything is sent."""

    def __init__(self, channel: grpc.Channel, token: str, *, timeout: float = DEFAULT_TIMEOUT_S,
                 address: str = "", tls: bool = False) -> None:
        """A client over an open `channel` (use `Client.connect` unless you make channels yourself)."""
        self._channel = channel
        self._metadata = (("authorization", f"Bearer {_checked_token(token)}"),)
        self._stub: Any = pb2_grpc.PartnerServiceStub(channel)  # type: ignore[no-untyped-call]
        #: Seconds each call may take.
        self.timeout = timeout
        #: The address connected to, and whether the channel is TLS.
        self.address = address
        self.tls = tls

    @classmethod
    def connect(
        cls,
        addr: str,
        token: str,
        ca_file: Optional[PathArg] = None,
        client_cert: Optional[PathArg] = None,
        client_key: Optional[PathArg] = None,
        *,
        server_name: Optional[str] = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        connect_timeout: Optional[float] = DEFAULT_CONNECT_TIMEOUT_S,
    ) -> Client:
        """Connects to the service at `addr` as the holder of `token`.

        `addr` is `https://host:port`, `http://host:port` or `host:port`. The channel is TLS when
        `ca_file` is given (the CA certificate, PEM, that the service's certificate must chain to)
        or the address is `https://` (without `ca_file`: the system's trusted roots). Plain text
        is for loopback only (`http://127.0.0.1:50051`, `localhost`, `[::1]`), as the service
        itself allows: any other plain-text address is refused with UsageError before the token
        is sent. `client_cert` and `client_key` (PEM) go together, for mutual TLS.
        `server_name` is the name the service's certificate must carry when it is not the
        address's host. `timeout` is per call; `connect_timeout` is how long to wait for the
        connection (None: do not wait, connect at the first call).

        Raises UsageError for a refused address or unreadable files, CleanroomError (UNAVAILABLE)
        when no connection is made within `connect_timeout`."""
        token = _checked_token(token)
        scheme, host, port = parse_address(addr)
        tls = ca_file is not None or scheme == "https"
        if scheme == "http" and ca_file is not None:
            raise UsageError(f"{addr}: an http:// address is plain text; with a CA file, use https://")
        if (client_cert is None) != (client_key is None):
            raise UsageError("client_cert and client_key go together (mutual TLS)")
        if not tls:
            if client_cert is not None:
                raise UsageError("a client certificate needs TLS: give ca_file or an https:// address")
            if not is_loopback(host):
                raise UsageError(
                    f"{addr}: refusing to send the token in plain text to {host}, which is not loopback; "
                    "give ca_file (the service's CA certificate) or an https:// address"
                )
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if tls:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(ca_file) if ca_file is not None else None,
                private_key=_read(client_key) if client_key is not None else None,
                certificate_chain=_read(client_cert) if client_cert is not None else None,
            )
            channel = grpc.secure_channel(target, credentials, options=options)
        else:
            channel = grpc.insecure_channel(target, options=options)
        if connect_timeout is not None:
            try:
                grpc.channel_ready_future(channel).result(timeout=connect_timeout)
            except grpc.FutureTimeoutError:
                channel.close()
                hint = (
                    f"is the service running there, and does its certificate chain to {ca_file or 'the system roots'} "
                    f"and name {server_name or host}?"
                    if tls
                    else "is the service running there?"
                )
                raise CleanroomError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"cannot connect to {addr} within {connect_timeout:g} s ({hint})",
                    "connect",
                ) from None
        return cls(channel, token, timeout=timeout, address=addr, tls=tls)

    def close(self) -> None:
        """Closes the connection."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -----------------------------------------------------------------------------------------
    # Queries

    def list_queries(self) -> list[QuerySummary]:
        """The queries open to the caller's contract, in id order."""
        response = self._call("ListQueries", lambda: self._stub.ListQueries(
            pb2.ListQueriesRequest(), metadata=self._metadata, timeout=self.timeout))
        return [QuerySummary.from_proto(q) for q in response.queries]

    def describe_query(self, query_id: str) -> QueryDescription:
        """One query's description: parameters, output, effective k. NOT_FOUND (CleanroomError)
        if the query is not open to the caller."""
        response = self._call("DescribeQuery", lambda: self._stub.DescribeQuery(
            pb2.DescribeQueryRequest(query_id=query_id), metadata=self._metadata, timeout=self.timeout))
        return QueryDescription.from_proto(response)

    def run(self, query_id: str, /, **params: ParamInput) -> Answer:
        """Runs a query and loads its released rows into a Polars DataFrame (`Answer.frame`).

        Parameters are given by name and converted by the types DescribeQuery declares (one
        DescribeQuery call first): a `datetime.date` or `"YYYY-MM-DD"` for a date, an int (or its
        decimal text) for an int, text for an enum. A name that is not a Python identifier goes
        as `client.run(query_id, **{"name": value})`."""
        description = self.describe_query(query_id)
        converted = build_params(description, params)
        return self.run_with(query_id, converted)

    def run_with(self, query_id: str, params: dict[str, pb2.ParamValue]) -> Answer:
        """Runs a query with parameters already typed as `ParamValue` messages (no DescribeQuery)."""
        request = pb2.RunQueryRequest(query_id=query_id)
        for name, value in params.items():
            request.params[name].CopyFrom(value)
        response = self._call("RunQuery", lambda: self._stub.RunQuery(
            request, metadata=self._metadata, timeout=self.timeout))
        return Answer.from_response(response)

    # -----------------------------------------------------------------------------------------
    # Customer lists

    def upload_list(
        self,
        source: Union[ListInput, ListSource],
        strict: bool = False,
        progress: Union[bool, ProgressCallback] = True,
        *,
        request_id: Optional[str] = None,
        attempts: int = UPLOAD_ATTEMPTS,
        pause: float = 0.5,
    ) -> UploadResult:
        """Uploads a new version of the caller's customer list and returns its result
        (`UploadResult.list_version`).

        `source` is a CSV file's path (read a chunk at a time), a Polars DataFrame or an iterable
        of mappings, with the columns `email`, `phone`, `attribute` or, from `cleanroom prep`,
        `email_token`, `phone_token`, `attribute`. It is streamed in chunks of 2,000 records.
        With `strict`, one invalid identifier fails the whole upload (INVALID_ARGUMENT, nothing
        stored); otherwise invalid ones are skipped and counted by reason.

        The upload carries a request id (a new one unless given) and is sent again under the
        same id, at most `attempts` times, `pause` seconds apart (doubling), while the
        connection breaks or the service is unavailable: a retry of an upload that committed is
        answered with the original result (`already_committed`) and stores nothing new.

        `progress`: True shows it on standard error, False nothing, or a callable gets an
        `UploadProgress` after each chunk (called from gRPC's sending thread; an exception it
        raises cancels the upload) and once when the service has answered.

        A row of the file that does not match its header raises UsageError and cancels the
        upload: nothing is stored."""
        if strict not in (True, False):
            raise UsageError("strict must be True or False")
        if attempts < 1:
            raise UsageError("attempts must be at least 1")
        request_id = request_id if request_id is not None else uuid.uuid4().hex
        if not _REQUEST_ID.fullmatch(request_id):
            raise UsageError("a request id is 1 to 64 letters, digits, '-' or '_'")
        reader = list_source(source)
        report = progress_callback(progress)
        header = pb2.UploadListHeader(strict=strict, request_id=request_id)
        wait = pause
        for attempt in range(1, attempts + 1):
            failure: list[BaseException] = []
            sent = [0]
            messages = _upload_messages(reader, header, attempt, report, failure, sent)
            try:
                response = self._stub.UploadList(messages, metadata=self._metadata, timeout=self.timeout)
            except grpc.RpcError as error:
                if failure:
                    # Reading the list failed: the call was cancelled, so nothing was stored.
                    raise failure[0] from None
                code = error.code() if isinstance(error, grpc.Call) else None
                if code in RETRYABLE and attempt < attempts:
                    time.sleep(wait)
                    wait *= 2
                    continue
                raise CleanroomError.from_rpc_error(error, "UploadList") from None
            if report is not None:
                report(_progress(reader, sent[0], None, attempt, done=True))
            return UploadResult.from_proto(response, request_id, attempt)
        raise AssertionError("unreachable")

    # -----------------------------------------------------------------------------------------

    def _call(self, name: str, call: Callable[[], _T]) -> _T:
        try:
            return call()
        except grpc.RpcError as error:
            raise CleanroomError.from_rpc_error(error, name) from None


def _upload_messages(reader: ListSource, header: pb2.UploadListHeader, attempt: int,
                     report: Optional[ProgressCallback], failure: list[BaseException],
                     sent: list[int]) -> Iterator[pb2.UploadListRequest]:
    """The request stream of one attempt: the header, then the chunks. An error while reading is
    kept in `failure` and raised into gRPC, which cancels the call (a stream that ended instead
    would commit the part read so far)."""
    yield pb2.UploadListRequest(header=header)
    try:
        for records, bytes_read in reader.chunks(CHUNK_RECORDS):
            chunk = pb2.ListChunk(records=[pb2.CustomerRecord(**r) for r in records])
            sent[0] += len(records)
            if report is not None:
                report(_progress(reader, sent[0], bytes_read, attempt))
            yield pb2.UploadListRequest(chunk=chunk)
    except Exception as error:
        failure.append(error)
        try:
            error._cleanroom_read_error = True  # type: ignore[attr-defined]
        except AttributeError:
            pass
        raise


def _progress(reader: ListSource, sent: int, bytes_read: Optional[int], attempt: int,
              done: bool = False) -> UploadProgress:
    if done and reader.total_bytes is not None:
        bytes_read = reader.total_bytes
    return UploadProgress(source=reader.name, records_sent=sent, total_records=reader.total_records,
                          bytes_read=bytes_read, total_bytes=reader.total_bytes, attempt=attempt, done=done)


class _QuietReadErrors(logging.Filter):
    """gRPC logs the traceback of any error raised by a request stream; a list that failed to read
    is reported to the caller as a UsageError instead, so that log record is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not getattr(error, "_cleanroom_read_error", False)


logging.getLogger("grpc._channel").addFilter(_QuietReadErrors())


def parse_address(addr: str) -> tuple[str, str, int]:
    """`https://host:port` -> `("https", "host", port)`; the scheme is "" when none is given.
    An IPv6 host is written in brackets (`[::1]:50051`) and returned without them."""
    text = addr.strip()
    scheme = ""
    if "://" in text:
        scheme, text = text.split("://", 1)
        scheme = scheme.lower()
        if scheme not in ("http", "https"):
            raise UsageError(f"{addr}: the scheme is http:// or https://, not {scheme}://")
        text = text[:-1] if text.endswith("/") else text
    if "/" in text or not text:
        raise UsageError(f"{addr}: expected [https://]HOST:PORT")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise UsageError(f"{addr}: expected [IPv6]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise UsageError(f"{addr}: no port (expected HOST:PORT; an IPv6 address goes in brackets)")
    if not host:
        raise UsageError(f"{addr}: no host")
    try:
        port = int(port_text, 10)
    except ValueError:
        raise UsageError(f"{addr}: the port is not a number") from None
    if not 0 < port < 65536:
        raise UsageError(f"{addr}: port {port} out of range")
    return scheme, host, port


def is_loopback(host: str) -> bool:
    """Whether `host` is this machine's loopback: `localhost`, 127.0.0.0/8 or ::1 (names are not
    resolved: a name that merely resolves to loopback does not count)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _checked_token(token: str) -> str:
    if not isinstance(token, str) or not token.strip():
        raise UsageError("no token: give the partner's bearer token (for example from CLEANROOM_TOKEN)")
    if any(not (0x21 <= ord(c) <= 0x7E) for c in token):
        raise UsageError("the token holds characters a bearer token cannot (spaces, line breaks or non-ASCII)")
    return token


def _read(path: PathArg) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise UsageError(f"{os.fspath(path)}: {error.strerror}") from None
