#!/usr/bin/env python3
"""The benchmark's peers: the questions `cleanroom bench` asked, run in DuckDB and Polars on the
same generated files, tables in memory, with no privacy: the same join (purchases to members) and
group-by (age band, category) with the distinct buyers and the amount, for the same windows.

    pip install -r bench/requirements.txt
    cargo run --release -- bench --members 1000000 --dir /tmp/bench --json /tmp/bench/figures.json
    python bench/peers.py /tmp/bench/figures.json /tmp/bench/gen-1000000-7

It prints each engine's first and median time over the windows and the clean room's ratio to it
(the clean room's figures come from the JSON file `cleanroom bench` wrote in the same run).
"""

from __future__ import annotations

import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

import duckdb
import polars as pl

OFFSET = dt.timezone(dt.timedelta(hours=9))  # the sample retailer's local time


def age_band(birth: dt.date | None, as_of: dt.date) -> str:
    """As the service computes it at ingest (crates/core/src/generalize.rs)."""
    if birth is None:
        return "unknown"
    age = as_of.year - birth.year - ((as_of.month, as_of.day) < (birth.month, birth.day))
    if age < 0:
        return "unknown"
    for top, band in ((19, "under_20"), (29, "20-29"), (39, "30-39"), (49, "40-49"),
                      (59, "50-59"), (69, "60-69")):
        if age <= top:
            return band
    return "70_plus"


def local_midnight(day: str) -> dt.datetime:
    return dt.datetime.fromisoformat(day).replace(tzinfo=OFFSET).astimezone(dt.timezone.utc)


def load(gen: Path, as_of: dt.date) -> tuple[pl.DataFrame, pl.DataFrame]:
    members = pl.read_csv(gen / "members.csv", columns=["member_id", "birth_date"],
                          schema_overrides={"birth_date": pl.Utf8})
    births = members["birth_date"].str.to_date(strict=False)
    members = members.with_columns(
        pl.Series("age_band", [age_band(b, as_of) for b in births.to_list()])
    ).select("member_id", "age_band")
    purchases = pl.read_csv(gen / "purchases.csv",
                            columns=["member_id", "purchased_at", "category", "amount"])
    purchases = purchases.with_columns(
        pl.col("purchased_at").str.to_datetime(time_zone="UTC")
    )
    return members, purchases


def timed(run, windows) -> list[float]:
    times = []
    for start, end in windows:
        began = time.perf_counter()
        rows = run(local_midnight(start), local_midnight(end))
        times.append(time.perf_counter() - began)
        assert rows > 0, f"nothing in {start} .. {end}"
    return times


def polars_runner(members: pl.DataFrame, purchases: pl.DataFrame):
    def run(start, end) -> int:
        out = (purchases.filter((pl.col("purchased_at") >= start) & (pl.col("purchased_at") < end))
               .join(members, on="member_id")
               .group_by("age_band", "category")
               .agg(pl.col("member_id").n_unique().alias("buyers"),
                    pl.col("amount").sum().alias("amount_yen")))
        return out.height
    return run


def duckdb_runner(members: pl.DataFrame, purchases: pl.DataFrame):
    con = duckdb.connect()
    con.register("members_df", members.to_arrow())
    con.register("purchases_df", purchases.to_arrow())
    con.execute("CREATE TABLE members AS SELECT * FROM members_df")
    con.execute("CREATE TABLE purchases AS SELECT * FROM purchases_df")
    sql = ("SELECT m.age_band, p.category, COUNT(DISTINCT p.member_id) AS buyers, "
           "SUM(p.amount) AS amount_yen FROM purchases p JOIN members m ON p.member_id = m.member_id "
           "WHERE p.purchased_at >= ? AND p.purchased_at < ? GROUP BY m.age_band, p.category")

    def run(start, end) -> int:
        return len(con.execute(sql, [start, end]).fetchall())
    return run


def main(figures_path: str, gen_dir: str) -> int:
    figures = json.loads(Path(figures_path).read_text())
    as_of = dt.date.fromisoformat(figures["as_of"])
    windows = figures["windows"]
    began = time.perf_counter()
    members, purchases = load(Path(gen_dir), as_of)
    print(f"loaded {members.height} members, {purchases.height} purchases "
          f"in {time.perf_counter() - began:.1f} s (not timed below)")
    ours = figures["new_median_s"]
    raw = figures["raw_median_s"]
    print(f"\n| a new question (one year), {len(windows)} windows | first | median | "
          f"the clean room's ratio to it |")
    print("|---|---|---|---|")
    print(f"| the clean room (gRPC, client side) | {figures['new_first_s']:.3f} s | {ours:.3f} s | 1.00× |")
    print(f"| raw DataFusion (same process as the clean room) | {figures['raw_first_s']:.3f} s | "
          f"{raw:.3f} s | {ours / raw:.2f}× |")
    for name, make in (("DuckDB " + duckdb.__version__, duckdb_runner),
                       ("Polars " + pl.__version__, polars_runner)):
        times = timed(make(members, purchases), windows)
        median = statistics.median(times[1:])
        print(f"| {name}, tables in memory | {times[0]:.3f} s | {median:.3f} s | {ours / median:.2f}× |")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(1)
    sys.exit(main(sys.argv[1], sys.argv[2]))
