"""A query's answer: the released rows as a Polars DataFrame, and how they were protected."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import polars as pl

from ._generated import cleanroom_pb2 as pb2

#: A value of a released row, as the typed rows carry it (None for SQL NULL).
CellValue = Union[str, int, float, None]

_POLARS_TYPES: dict[str, Any] = {"string": pl.Utf8, "int": pl.Int64, "double": pl.Float64}


@dataclass(frozen=True)
class Column:
    """One output column: its name and its type (`string`, `int` or `double`)."""

    name: str
    type: str


@dataclass(frozen=True)
class Protection:
    """How an answer was protected (the response's `protection`).

    Every answer is differentially private with the retailer's member as the unit: noise on every
    cell's member count and every metric, a row released only if its true count is at least k
    and its noisy count reaches `release_threshold`, and its cost charged to the partner's budget
    for the period. A repeat of an answer already paid for is served again at no cost
    (`fresh` False, the `*_spent` figures 0)."""

    #: Always `dp` (zero-concentrated differential privacy, discrete Gaussian noise).
    mode: str
    #: Per metric: the standard deviation of the noise on each released value.
    noise_sd: dict[str, float]
    #: Per metric: the most one member may add to one row.
    per_member_bound: dict[str, int]
    #: A row is released only if its noisy member count reaches this.
    release_threshold: int
    #: Per metric: the half-width of a 95 % interval around each released value (the same as the
    #: `<metric>_ci95` columns of the frame).
    interval95: dict[str, int]
    #: The most output rows one member was counted in.
    rows_per_member: int
    #: Whether this answer was computed now (and charged) rather than served again.
    fresh: bool
    #: This call's privacy cost: rho (zCDP), and the same as (epsilon, delta)-DP. 0 for a repeat.
    rho_spent: float
    epsilon_spent: float
    delta_spent: float
    #: The contract's guarantee: everything received over any `period_days` days together is
    #: (period_epsilon, period_delta)-DP, paid out as `answers_per_period` fresh answers.
    period_epsilon: float
    period_delta: float
    period_days: int
    answers_per_period: int
    #: Fresh answers used in the current period, this one included.
    answers_used: int
    #: When the oldest charge leaves the period (RFC 3339), empty if none.
    budget_resets_at: str

    @classmethod
    def from_proto(cls, message: pb2.Protection) -> Protection:
        return cls(
            mode=message.mode,
            noise_sd=dict(message.noise_sd),
            per_member_bound=dict(message.per_member_bound),
            release_threshold=message.release_threshold,
            interval95=dict(message.interval95),
            rows_per_member=message.rows_per_member,
            fresh=message.fresh,
            rho_spent=message.rho_spent,
            epsilon_spent=message.epsilon_spent,
            delta_spent=message.delta_spent,
            period_epsilon=message.period_epsilon,
            period_delta=message.period_delta,
            period_days=message.period_days,
            answers_per_period=message.answers_per_period,
            answers_used=message.answers_used,
            budget_resets_at=message.budget_resets_at,
        )

    @property
    def guarantee(self) -> str:
        """The contract's guarantee in one sentence."""
        text = (
            f"everything this partner receives over any {self.period_days} days together is "
            f"({self.period_epsilon:g}, {self.period_delta:g})-differentially private, paid out as "
            f"{self.answers_per_period} fresh answers; {self.answers_used} used in this period"
        )
        if self.budget_resets_at:
            text += f" (the oldest charge leaves it at {self.budget_resets_at})"
        return text

    def __str__(self) -> str:
        text = f"protection: {self.mode or 'none'}"
        if self.interval95:
            text += "; 95% intervals " + ", ".join(f"{k}=±{v}" for k, v in sorted(self.interval95.items()))
        if self.per_member_bound:
            text += "; per-member bound " + ", ".join(f"{k}={v}" for k, v in sorted(self.per_member_bound.items()))
        if self.release_threshold:
            text += f"; release threshold {self.release_threshold}"
        if self.fresh:
            text += f"; fresh answer, epsilon spent {self.epsilon_spent:g}"
        else:
            text += "; served again at no cost"
        return text + f"; guarantee: {self.guarantee}"


@dataclass(frozen=True, eq=False)
class Answer:
    """A query's answer (RunQuery).

    `frame` holds the released rows, loaded from the answer's Arrow IPC stream: the dimensions,
    the metrics and each metric's `<metric>_ci95` column (the half-width of its 95 % interval).
    Rows of the output's full domain that were not released are counted in `suppressed_rows`."""

    query_id: str
    query_version: int
    frame: pl.DataFrame
    columns: tuple[Column, ...]
    #: Rows of the output's full domain not released; the same whether a withheld row had no
    #: member at all or some below k.
    suppressed_rows: int
    #: The fewest distinct members behind every released row.
    effective_k: int
    #: The consent state the query was evaluated against.
    consent_snapshot_id: str
    #: The version of the caller's customer list the query matched against.
    list_version: int
    #: The audit record of this call.
    audit_id: str
    #: Server-side time of the run in milliseconds (rounded up to a multiple of 250).
    elapsed_ms: int
    #: The parameters the query ran with, after the service snapped dates to weeks or months.
    effective_params: dict[str, str]
    protection: Optional[Protection]
    #: The response as it came (a `cleanroom.v1.RunQueryResponse` message).
    response: pb2.RunQueryResponse = field(repr=False)

    @classmethod
    def from_response(cls, response: pb2.RunQueryResponse) -> Answer:
        return cls(
            query_id=response.query_id,
            query_version=response.query_version,
            frame=to_polars(response),
            columns=tuple(Column(c.name, c.type) for c in response.columns),
            suppressed_rows=response.suppressed_rows,
            effective_k=response.effective_k,
            consent_snapshot_id=response.consent_snapshot_id,
            list_version=response.list_version,
            audit_id=response.audit_id,
            elapsed_ms=response.elapsed_ms,
            effective_params=dict(response.effective_params),
            protection=Protection.from_proto(response.protection) if response.HasField("protection") else None,
            response=response,
        )

    @property
    def released_rows(self) -> int:
        """How many rows were released (the frame's height)."""
        return self.frame.height

    @property
    def fresh(self) -> bool:
        """Whether the answer was computed now and charged (False: served again, free)."""
        return self.protection is not None and self.protection.fresh

    @property
    def intervals(self) -> dict[str, int]:
        """Per metric: the half-width of each released value's 95 % interval."""
        return dict(self.protection.interval95) if self.protection else {}

    def summary(self) -> str:
        """Everything but the rows, one fact a line."""
        lines = [
            f"query: {self.query_id} v{self.query_version}",
            f"released rows: {self.released_rows}",
            f"suppressed rows: {self.suppressed_rows}",
            f"effective k: {self.effective_k}",
            f"consent snapshot: {self.consent_snapshot_id}",
            f"list version: {self.list_version}",
            f"audit id: {self.audit_id}",
            f"server time: {self.elapsed_ms} ms",
        ]
        if self.effective_params:
            params = sorted(self.effective_params.items())
            lines.append("effective params: " + ", ".join(f"{k}={v}" for k, v in params))
        if self.protection is not None:
            lines.append(str(self.protection))
        return "\n".join(lines)


def to_polars(response: pb2.RunQueryResponse) -> pl.DataFrame:
    """The response's Arrow IPC stream as a Polars DataFrame; an empty frame with the declared
    columns when the response carries no stream."""
    if response.arrow_ipc:
        return pl.read_ipc_stream(io.BytesIO(response.arrow_ipc))
    return pl.DataFrame(schema={c.name: _POLARS_TYPES.get(c.type, pl.Utf8) for c in response.columns})


def value_of(value: pb2.Value) -> CellValue:
    """One typed value of a row: str, int, float, or None for SQL NULL."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "int_value":
        return value.int_value
    if kind == "double_value":
        return value.double_value
    return None


def typed_rows(response: pb2.RunQueryResponse) -> list[tuple[CellValue, ...]]:
    """The released rows as the response's typed values carry them, in column order (the same
    rows as the Arrow IPC stream; a check of one against the other)."""
    return [tuple(value_of(v) for v in row.values) for row in response.rows]


def same_value(a: object, b: object) -> bool:
    """Equal and of one type, NaN equal to NaN."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b and type(a) is type(b)
