#!/usr/bin/env python3
"""A partner's client for the clean room: list, describe and run allow-listed queries.

The gRPC stubs are generated at run time from the repository's proto/ with grpcio-tools into a
temporary directory, so no generated code is committed and the client always matches the proto it
ships with. Answers arrive as typed rows and as an Arrow IPC stream; the stream is loaded into a
Polars DataFrame.

    pip install -r examples/python/requirements.txt
    CLEANROOM_TOKEN=demo-sakura-token python examples/python/cleanroom_client.py \\
        --addr 127.0.0.1:50051 --query category_buyers_by_age_band \\
        --param start=2025-11-01 --param end=2026-11-01

Without --query it lists the queries open to the caller and stops. Exit codes: 0 on success, 1 for
a usage error (bad flag, missing token, unknown or badly typed parameter), 2 when the service
refuses a call (the gRPC status code name and its details are printed).

With --upload-list FILE it first uploads a customer list (retried with one request id while the
connection breaks, so a retry never stores it twice).

The functions below are the same pieces for scripts and tests: `load_stubs`, `PartnerClient`
(with `upload_list`), `read_list_csv`, `build_params`, `parse_param_args`, `typed_rows`,
`to_polars`, `format_description`, `format_metadata`.
"""

from __future__ import annotations

import argparse
import atexit
import csv
import datetime
import importlib
import io
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import grpc
import polars

PROTO_FILE = "cleanroom/v1/cleanroom.proto"
DEFAULT_PROTO_DIR = Path(__file__).resolve().parents[2] / "proto"
DEFAULT_ADDR = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 120.0
# Records per streamed upload message, as the Rust client sends them.
CHUNK_RECORDS = 2000
# Failures after which a write may or may not have been carried out: sent again with its id.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED}


class UsageError(Exception):
    """A mistake in how the client was called; exit code 1."""


# ---------------------------------------------------------------------------------------------
# Stubs, generated at run time


_STUBS: dict[Path, SimpleNamespace] = {}


def load_stubs(proto_dir: str | os.PathLike | None = None) -> SimpleNamespace:
    """Generates the Python stubs for cleanroom.v1 from `proto_dir` (default: the repository's
    proto/) into a temporary directory, imports them and returns
    `SimpleNamespace(pb2=..., pb2_grpc=..., out_dir=...)`. Generated once per process."""
    proto_dir = Path(proto_dir or os.environ.get("CLEANROOM_PROTO_DIR") or DEFAULT_PROTO_DIR).resolve()
    if proto_dir in _STUBS:
        return _STUBS[proto_dir]
    if _STUBS:
        # The generated modules are named after the proto package, so one process holds one set.
        raise UsageError("stubs were already generated from another proto directory")
    if not (proto_dir / PROTO_FILE).is_file():
        raise UsageError(f"{proto_dir / PROTO_FILE} not found (set --proto-dir or CLEANROOM_PROTO_DIR)")

    import grpc_tools
    from grpc_tools import protoc

    out_dir = Path(tempfile.mkdtemp(prefix="cleanroom-stubs-"))
    atexit.register(shutil.rmtree, out_dir, ignore_errors=True)
    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"--proto_path={proto_dir}",
        f"--proto_path={well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(proto_dir / PROTO_FILE),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"grpc_tools.protoc failed on {proto_dir / PROTO_FILE}")

    # The generated modules import each other as `cleanroom.v1.*` (implicit namespace packages).
    sys.path.insert(0, str(out_dir))
    importlib.invalidate_caches()
    module = PROTO_FILE[: -len(".proto")].replace("/", ".")
    try:
        pb2 = importlib.import_module(module + "_pb2")
        pb2_grpc = importlib.import_module(module + "_pb2_grpc")
    except Exception as error:  # typically protobuf's gencode/runtime version check
        raise UsageError(
            f"the stubs generated from {proto_dir / PROTO_FILE} do not load with the installed packages "
            f"({type(error).__name__}: {error}); pip install -r examples/python/requirements.txt"
        ) from error
    stubs = SimpleNamespace(pb2=pb2, pb2_grpc=pb2_grpc, out_dir=out_dir, proto_dir=proto_dir)
    _STUBS[proto_dir] = stubs
    return stubs


# ---------------------------------------------------------------------------------------------
# Calls


def open_channel(address: str, ca: str | None = None, cert: str | None = None,
                 key: str | None = None) -> grpc.Channel:
    """A channel to the service: TLS trusting the CA file `ca` (and presenting the client
    certificate `cert` with its `key`, for mutual TLS), or plain text without `ca` (the service
    allows that on loopback only)."""
    if not ca:
        if cert or key:
            raise UsageError("a client certificate needs --ca as well")
        return grpc.insecure_channel(address)
    if bool(cert) != bool(key):
        raise UsageError("--cert and --key go together")

    def read(path: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as error:
            raise UsageError(f"{path}: {error.strerror}") from None

    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(ca),
        private_key=read(key) if key else None,
        certificate_chain=read(cert) if cert else None,
    )
    return grpc.secure_channel(address, credentials)


class PartnerClient:
    """PartnerService calls as one partner. The bearer token decides which partner: no request
    field can name another one."""

    def __init__(self, address: str, token: str, stubs: SimpleNamespace | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, ca: str | None = None,
                 cert: str | None = None, key: str | None = None):
        if not token:
            raise UsageError("no token: pass --token or set CLEANROOM_TOKEN")
        self.stubs = stubs or load_stubs()
        self.pb2 = self.stubs.pb2
        self.address = address
        self.timeout = timeout
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.channel = open_channel(address, ca, cert, key)
        self.stub = self.stubs.pb2_grpc.PartnerServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "PartnerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def list_queries(self):
        """The queries open to the caller's contract (QuerySummary list, in id order)."""
        response = self.stub.ListQueries(
            self.pb2.ListQueriesRequest(), metadata=self.metadata, timeout=self.timeout
        )
        return list(response.queries)

    def describe_query(self, query_id: str):
        """QueryDescription; NOT_FOUND if the query is not open to the caller."""
        return self.stub.DescribeQuery(
            self.pb2.DescribeQueryRequest(query_id=query_id), metadata=self.metadata, timeout=self.timeout
        )

    def run_query(self, query_id: str, params: dict):
        """Runs a query. `params` maps names to ParamValue messages (see `build_params`)."""
        request = self.pb2.RunQueryRequest(query_id=query_id)
        for name, value in params.items():
            request.params[name].CopyFrom(value)
        return self.stub.RunQuery(request, metadata=self.metadata, timeout=self.timeout)

    def upload_list(self, records, strict: bool = False, request_id: str | None = None,
                    attempts: int = 4, pause: float = 0.5):
        """Uploads a customer list: `records` are dicts with `email`, `phone` and `attribute`
        (or `email_token`/`phone_token` from `cleanroom prep`), streamed in chunks.

        The upload carries a request id (a new one unless given) and is sent again with the same
        id, at most `attempts` times, while the connection breaks or the service is unavailable:
        a retry of an upload that committed answers the original result (`already_committed`)
        and stores nothing new. Returns (UploadListResponse, request id, attempts made)."""
        request_id = request_id or uuid.uuid4().hex
        records = [self.pb2.CustomerRecord(**record) for record in records]
        header = self.pb2.UploadListHeader(strict=strict, request_id=request_id)

        def messages():
            yield self.pb2.UploadListRequest(header=header)
            for start in range(0, len(records), CHUNK_RECORDS):
                chunk = self.pb2.ListChunk(records=records[start:start + CHUNK_RECORDS])
                yield self.pb2.UploadListRequest(chunk=chunk)

        for attempt in range(1, attempts + 1):
            try:
                response = self.stub.UploadList(messages(), metadata=self.metadata,
                                                timeout=self.timeout)
                return response, request_id, attempt
            except grpc.RpcError as error:
                if error.code() not in RETRYABLE or attempt == attempts:
                    raise
                time.sleep(pause * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    def run_with_text_params(self, query_id: str, raw: dict[str, str]):
        """Describes the query, converts `raw` (name -> text) with the declared types, runs it.
        Returns (description, response)."""
        description = self.describe_query(query_id)
        return description, self.run_query(query_id, build_params(self.pb2, description, raw))


def read_list_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """A customer list file as records for `PartnerClient.upload_list`: the columns
    email,phone,attribute (raw) or email_token,phone_token,attribute (from `cleanroom prep`)."""
    columns = {"email", "phone", "email_token", "phone_token", "attribute"}
    with open(path, newline="", encoding="utf-8") as file:
        return [{k: v for k, v in row.items() if k in columns and v} for row in csv.DictReader(file)]


# ---------------------------------------------------------------------------------------------
# Parameters


def parse_param_args(items: list[str] | None) -> dict[str, str]:
    """`["start=2025-11-01", "brand=Sakura Cha"]` -> `{"start": "2025-11-01", ...}`."""
    params: dict[str, str] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise UsageError(f"--param {item!r}: expected NAME=VALUE")
        if name in params:
            raise UsageError(f"--param {name} given twice")
        params[name] = value
    return params


def build_params(pb2, description, raw: dict[str, str]) -> dict:
    """Converts text values to typed ParamValue messages using the types DescribeQuery declares:
    date -> date_value (YYYY-MM-DD), int -> int_value, enum -> string_value. Unknown, missing and
    badly typed parameters are usage errors; bounds, granularity and allowed values are left to the
    service, which is the one authority on them."""
    specs = {spec.name: spec for spec in description.parameters}
    unknown = sorted(set(raw) - set(specs))
    if unknown:
        declared = ", ".join(f"{s.name} ({s.type})" for s in description.parameters) or "none"
        raise UsageError(f"{description.id}: unknown parameter(s) {', '.join(unknown)}; declared: {declared}")
    missing = [s for s in description.parameters if s.name not in raw]
    if missing:
        raise UsageError(
            f"{description.id}: missing parameter(s): "
            + "; ".join(f"--param {s.name}=<{describe_param_type(s)}>" for s in missing)
        )
    params = {}
    for name, text in raw.items():
        spec = specs[name]
        if spec.type == "date":
            try:
                datetime.date.fromisoformat(text)
            except ValueError:
                raise UsageError(f"--param {name}={text!r}: expected a date YYYY-MM-DD") from None
            params[name] = pb2.ParamValue(date_value=text)
        elif spec.type == "int":
            try:
                number = int(text, 10)
            except ValueError:
                raise UsageError(f"--param {name}={text!r}: expected an integer") from None
            params[name] = pb2.ParamValue(int_value=number)
        elif spec.type == "enum":
            params[name] = pb2.ParamValue(string_value=text)
        else:
            raise UsageError(f"{description.id}: parameter {name} has a type this client does not know: {spec.type!r}")
    return params


def describe_param_type(spec) -> str:
    parts = [spec.type]
    if spec.allowed_values:
        parts.append("one of " + " | ".join(spec.allowed_values))
    if spec.min or spec.max:
        parts.append(f"{spec.min or '…'}..{spec.max or '…'}")
    if spec.granularity:
        parts.append(f"snaps to {spec.granularity}")
    min_window = getattr(spec, "min_window_days", 0)
    if min_window:
        parts.append(f"window >= {min_window} days")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# Answers


def value_of(value):
    """One typed Value -> a Python value (None for SQL NULL)."""
    kind = value.WhichOneof("kind")
    if kind is None or kind == "null_value":
        return None
    return getattr(value, kind)


def typed_rows(response) -> list[tuple]:
    """The released rows as tuples of Python values, in column order."""
    return [tuple(value_of(v) for v in row.values) for row in response.rows]


_POLARS_TYPES = {"string": polars.Utf8, "int": polars.Int64, "double": polars.Float64}


def to_polars(response) -> polars.DataFrame:
    """Loads the response's Arrow IPC stream into a Polars DataFrame."""
    if response.arrow_ipc:
        return polars.read_ipc_stream(io.BytesIO(response.arrow_ipc))
    # No stream at all: an empty frame with the declared schema.
    return polars.DataFrame(
        schema={c.name: _POLARS_TYPES.get(c.type, polars.Utf8) for c in response.columns}
    )


def format_summaries(summaries) -> str:
    lines = []
    for q in summaries:
        approval = getattr(q, "approval", "")
        suffix = f"  [{approval}]" if approval else ""
        lines.append(f"  {q.id} (v{q.version}): {q.title}{suffix}")
    return "\n".join(lines) if lines else "  (none)"


def format_description(d) -> str:
    lines = [
        f"{d.title} ({d.id}, v{d.version})",
        f"  {' '.join(d.description.split())}",
        f"  purposes: {', '.join(d.purposes)}; clause: {d.contract_clause}",
        f"  effective k: {d.effective_k}; content sha256: {d.content_sha256}",
        "  parameters:" if d.parameters else "  parameters: none",
    ]
    for p in d.parameters:
        lines.append(f"    {p.name}: {describe_param_type(p)}" + (f" - {p.description}" if p.description else ""))
    for dim in d.dimensions:
        lines.append(f"  dimension {dim.name}: {len(dim.domain)} values ({', '.join(dim.domain)})")
    lines.append(f"  metrics: {', '.join(d.metrics)}")
    return "\n".join(lines)


def format_metadata(response) -> str:
    lines = [
        f"query: {response.query_id} v{response.query_version}",
        f"released rows: {len(response.rows)}",
        f"suppressed rows: {response.suppressed_rows}",
        f"effective k: {response.effective_k}",
        f"consent snapshot: {response.consent_snapshot_id}",
        f"list version: {response.list_version}",
        f"audit id: {response.audit_id}",
        f"server time: {response.elapsed_ms} ms",
    ]
    effective = getattr(response, "effective_params", None)
    if effective:
        lines.append("effective params: " + ", ".join(f"{k}={effective[k]}" for k in sorted(effective)))
    if hasattr(response, "protection") and response.HasField("protection"):
        p = response.protection
        text = f"protection: {p.mode or 'none'}"
        if p.interval95:
            text += "; 95% intervals " + ", ".join(f"{k}=±{v}" for k, v in sorted(p.interval95.items()))
        if p.per_member_bound:
            text += "; per-member bound " + ", ".join(f"{k}={v}" for k, v in sorted(p.per_member_bound.items()))
        if p.release_threshold:
            text += f"; release threshold {p.release_threshold:g}"
        text += (
            f"; epsilon spent {p.epsilon_spent:g}; {p.answers_used} of {p.answers_per_period} fresh answers "
            f"used (epsilon {p.period_epsilon:g}, delta {p.period_delta:g} per {p.period_days} days)"
        )
        if p.budget_resets_at:
            text += f" (resets {p.budget_resets_at})"
        lines.append(text)
    return "\n".join(lines)


def format_rpc_error(error: grpc.RpcError, call: str = "") -> str:
    code = error.code() if hasattr(error, "code") else None
    name = code.name if code is not None else "UNKNOWN"
    details = error.details() if hasattr(error, "details") else str(error)
    prefix = f"{call} failed: " if call else ""
    return f"{prefix}{name}: {details}"


# ---------------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse exits 2 by default; 2 is reserved for gRPC errors here.
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def build_arg_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        description="List, describe and run the clean room queries open to a partner.",
        epilog="Exit codes: 0 ok, 1 usage error, 2 the service refused a call (gRPC status).",
    )
    parser.add_argument("--addr", default=os.environ.get("CLEANROOM_ADDR", DEFAULT_ADDR),
                        help=f"HOST:PORT of the service (env CLEANROOM_ADDR; default {DEFAULT_ADDR})")
    parser.add_argument("--token", default=None, help="bearer token (default: env CLEANROOM_TOKEN)")
    parser.add_argument("--ca", default=os.environ.get("CLEANROOM_CA"),
                        help="CA certificate (PEM) to verify the service over TLS (env CLEANROOM_CA); "
                             "without it, plain text (loopback only)")
    parser.add_argument("--cert", default=None, help="client certificate (PEM), for mutual TLS")
    parser.add_argument("--key", default=None, help="the client certificate's key (PEM)")
    parser.add_argument("--upload-list", metavar="FILE",
                        help="upload this customer list first (email,phone,attribute), retried "
                             "with one request id while the connection breaks")
    parser.add_argument("--query", help="query id to describe and run; without it, only list")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="query parameter, repeatable; typed from DescribeQuery")
    parser.add_argument("--describe-only", action="store_true", help="describe --query, do not run it")
    parser.add_argument("--proto-dir", default=None,
                        help="directory holding cleanroom/v1/cleanroom.proto (default: the repository's proto/)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per call")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    token = args.token or os.environ.get("CLEANROOM_TOKEN", "")
    call = ""
    try:
        raw = parse_param_args(args.param)
        if raw and not args.query:
            raise UsageError("--param needs --query")
        stubs = load_stubs(args.proto_dir)
        with PartnerClient(args.addr, token, stubs, timeout=args.timeout, ca=args.ca,
                           cert=args.cert, key=args.key) as client:
            if args.upload_list:
                call = "UploadList"
                response, request_id, attempts = client.upload_list(read_list_csv(args.upload_list))
                how = ("committed by an earlier attempt; nothing new was stored"
                       if response.already_committed else f"committed on attempt {attempts}")
                print(f"list v{response.list_version}: {response.records_received} received, "
                      f"{response.records_accepted} accepted ({how}; request id {request_id})")
            call = "ListQueries"
            summaries = client.list_queries()
            print(f"queries open to this partner ({len(summaries)}):")
            print(format_summaries(summaries))
            if not args.query:
                return 0
            call = "DescribeQuery"
            description = client.describe_query(args.query)
            print()
            print(format_description(description))
            if args.describe_only:
                return 0
            params = build_params(stubs.pb2, description, raw)
            call = "RunQuery"
            response = client.run_query(args.query, params)
            frame = to_polars(response)
            print()
            with polars.Config(tbl_rows=-1, tbl_cols=-1, fmt_str_lengths=80):
                print(frame)
            print(format_metadata(response))
            return 0
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except grpc.RpcError as error:
        print(f"error: {format_rpc_error(error, call)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
