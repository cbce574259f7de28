"""The two kinds of failure: the service refused a call (`CleanroomError`, with its gRPC status
code), or the call was never made because something given to the client is wrong (`UsageError`)."""

from __future__ import annotations

import grpc


class CleanroomError(Exception):
    """The service refused a call, or could not be reached.

    `code` is the gRPC status code (`grpc.StatusCode.NOT_FOUND`, `UNAUTHENTICATED`,
    `FAILED_PRECONDITION`, `UNAVAILABLE`, ...), `message` the service's plain reason (an internal
    failure carries only an audit id the retailer can look up), `call` the RPC that failed."""

    def __init__(self, code: grpc.StatusCode, message: str, call: str = "") -> None:
        prefix = f"{call} failed: " if call else ""
        super().__init__(f"{prefix}{code.name}: {message}")
        self.code = code
        self.message = message
        self.call = call

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError, call: str = "") -> CleanroomError:
        """The error a grpc call raised, as a CleanroomError."""
        code = error.code() if isinstance(error, grpc.Call) else None
        details = error.details() if isinstance(error, grpc.Call) else None
        return cls(code if code is not None else grpc.StatusCode.UNKNOWN, details or str(error), call)


class UsageError(ValueError):
    """A mistake caught before anything was sent: an address that would send the token in plain
    text off this machine, a missing or badly typed query parameter, a customer list file whose
    rows do not match its header, ... The message says what to change; it never repeats a value
    read from a customer list."""
