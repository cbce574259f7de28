"""What ListQueries, DescribeQuery and UploadList answer, as plain typed values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ._generated import cleanroom_pb2 as pb2


@dataclass(frozen=True)
class QuerySummary:
    """One query open to the caller's contract."""

    id: str
    #: The version number the query's authors give it.
    version: int
    title: str
    #: `approved` (it may run now), `pending` (new or changed content awaits legal review) or
    #: `withdrawn`. RunQuery refuses a query that is not approved.
    approval: str

    @classmethod
    def from_proto(cls, message: pb2.QuerySummary) -> QuerySummary:
        return cls(id=message.id, version=message.version, title=message.title, approval=message.approval)

    def __str__(self) -> str:
        suffix = f"  [{self.approval}]" if self.approval else ""
        return f"{self.id} (v{self.version}): {self.title}{suffix}"


@dataclass(frozen=True)
class Parameter:
    """One typed parameter of a query and the values it accepts."""

    name: str
    #: `date` (YYYY-MM-DD), `int` or `enum`.
    type: str
    description: str = ""
    #: For `enum`: the accepted values.
    allowed_values: tuple[str, ...] = ()
    #: For `date` and `int`: inclusive bounds as text, empty if unbounded.
    min: str = ""
    max: str = ""
    #: For `date`: `week` or `month`; the service snaps values outward to it.
    granularity: str = ""
    #: For a window's end: the shortest window allowed after snapping, in days (0: none).
    min_window_days: int = 0

    @classmethod
    def from_proto(cls, message: pb2.ParameterSpec) -> Parameter:
        return cls(
            name=message.name,
            type=message.type,
            description=message.description,
            allowed_values=tuple(message.allowed_values),
            min=message.min,
            max=message.max,
            granularity=message.granularity,
            min_window_days=message.min_window_days,
        )

    def accepts(self) -> str:
        """What the parameter accepts, in words: `date, 2024-01-01..2027-12-01, snaps to month`."""
        parts = [self.type]
        if self.allowed_values:
            parts.append("one of " + " | ".join(self.allowed_values))
        if self.min or self.max:
            parts.append(f"{self.min or '…'}..{self.max or '…'}")
        if self.granularity:
            parts.append(f"snaps to {self.granularity}")
        if self.min_window_days:
            parts.append(f"window >= {self.min_window_days} days")
        return ", ".join(parts)


@dataclass(frozen=True)
class Dimension:
    """A grouping column of a query's output and every value it can take."""

    name: str
    domain: tuple[str, ...]


@dataclass(frozen=True)
class QueryDescription:
    """Everything needed to call a query correctly (DescribeQuery)."""

    id: str
    version: int
    title: str
    description: str
    #: The consent purposes the query may serve.
    purposes: tuple[str, ...]
    #: The contract clause that allows it.
    contract_clause: str
    parameters: tuple[Parameter, ...]
    #: Output columns that group the rows, each with its fixed domain.
    dimensions: tuple[Dimension, ...]
    #: Output columns that carry aggregates; each has a `<metric>_ci95` column beside it.
    metrics: tuple[str, ...]
    #: The fewest distinct members behind every released row.
    effective_k: int
    #: SHA-256 (hex) of the query's canonical content: what a legal approval covers.
    content_sha256: str

    @classmethod
    def from_proto(cls, message: pb2.QueryDescription) -> QueryDescription:
        return cls(
            id=message.id,
            version=message.version,
            title=message.title,
            description=message.description,
            purposes=tuple(message.purposes),
            contract_clause=message.contract_clause,
            parameters=tuple(Parameter.from_proto(p) for p in message.parameters),
            dimensions=tuple(Dimension(d.name, tuple(d.domain)) for d in message.dimensions),
            metrics=tuple(message.metrics),
            effective_k=message.effective_k,
            content_sha256=message.content_sha256,
        )

    def parameter(self, name: str) -> Optional[Parameter]:
        """The parameter called `name`, or None."""
        return next((p for p in self.parameters if p.name == name), None)

    def __str__(self) -> str:
        lines = [
            f"{self.title} ({self.id}, v{self.version})",
            f"  {' '.join(self.description.split())}",
            f"  purposes: {', '.join(self.purposes)}; clause: {self.contract_clause}",
            f"  effective k: {self.effective_k}; content sha256: {self.content_sha256}",
            "  parameters:" if self.parameters else "  parameters: none",
        ]
        for p in self.parameters:
            lines.append(f"    {p.name}: {p.accepts()}" + (f" - {p.description}" if p.description else ""))
        for d in self.dimensions:
            lines.append(f"  dimension {d.name}: {len(d.domain)} values ({', '.join(d.domain)})")
        lines.append(f"  metrics: {', '.join(self.metrics)}")
        return "\n".join(lines)


@dataclass(frozen=True)
class UploadResult:
    """The outcome of an accepted customer list upload."""

    #: The new list version; queries match against it from now on.
    list_version: int
    records_received: int
    records_accepted: int
    #: Records skipped, by reason (for example `email: no @`); never the rejected value.
    rejected_by_reason: dict[str, int]
    audit_id: str
    #: True when the service answered a retry of an upload it had already committed under the
    #: same request id: nothing new was stored and the figures are the original upload's.
    already_committed: bool
    #: The request id the upload was sent under (give it again to retry an upload whose outcome
    #: was not known).
    request_id: str
    #: How many times the upload was sent (more than 1 when the connection broke).
    attempts: int = 1

    @classmethod
    def from_proto(cls, message: pb2.UploadListResponse, request_id: str, attempts: int) -> UploadResult:
        return cls(
            list_version=message.list_version,
            records_received=message.records_received,
            records_accepted=message.records_accepted,
            rejected_by_reason=dict(message.rejected_by_reason),
            audit_id=message.audit_id,
            already_committed=message.already_committed,
            request_id=request_id,
            attempts=attempts,
        )

    def __str__(self) -> str:
        how = (
            "committed by an earlier attempt; nothing new was stored"
            if self.already_committed
            else f"committed on attempt {self.attempts}"
        )
        text = (
            f"list v{self.list_version}: {self.records_received} received, {self.records_accepted} "
            f"accepted ({how}; request id {self.request_id})"
        )
        if self.rejected_by_reason:
            text += "; skipped: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.rejected_by_reason.items()))
        return text


@dataclass(frozen=True)
class UploadProgress:
    """How far an upload has got, as handed to a `progress` callback after each chunk."""

    #: What is uploaded: the file's path, `DataFrame` or `records`.
    source: str
    #: Records handed to the connection so far in this attempt.
    records_sent: int
    #: All records, when known before reading (a DataFrame or a list; not a file).
    total_records: Optional[int] = None
    #: Bytes of the file read so far, and its size (files only).
    bytes_read: Optional[int] = None
    total_bytes: Optional[int] = None
    #: Which sending of the upload this is (1, then 2... after a broken connection).
    attempt: int = 1
    #: True once, when the service has answered.
    done: bool = False

    def fraction(self) -> Optional[float]:
        """Between 0 and 1 when the total is known, else None."""
        if self.total_records:
            return min(1.0, self.records_sent / self.total_records)
        if self.total_bytes and self.bytes_read is not None:
            return min(1.0, self.bytes_read / self.total_bytes)
        return None
