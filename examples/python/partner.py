#!/usr/bin/env python3
"""A partner's use of the cleanroom_client package: upload a customer list, list the queries open
to you, describe one and run it into a Polars DataFrame.

    pip install ./clients/python
    CLEANROOM_TOKEN=demo-sakura-token python examples/python/partner.py --addr http://127.0.0.1:50051 \\
        --query category_buyers_by_age_band --param start=2025-11-01 --param end=2026-11-01

Over TLS: --addr https://HOST:PORT --ca ca.pem (or CLEANROOM_CA). Exit codes: 0 ok, 1 a usage
error, 2 the service refused a call (its gRPC status code and reason are printed).
"""

from __future__ import annotations

import argparse
import os
import sys

import polars as pl

from cleanroom_client import CleanroomError, Client, UsageError, parse_param_args


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default=os.environ.get("CLEANROOM_ADDR", "http://127.0.0.1:50051"))
    parser.add_argument("--ca", default=os.environ.get("CLEANROOM_CA"), help="the service's CA (PEM)")
    parser.add_argument("--upload-list", metavar="CSV", help="email,phone,attribute (or prep's tokens)")
    parser.add_argument("--query", help="query id to describe and run")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args()
    try:
        with Client.connect(args.addr, os.environ.get("CLEANROOM_TOKEN", ""), ca_file=args.ca) as client:
            if args.upload_list:
                print(client.upload_list(args.upload_list))  # progress on stderr
            for query in client.list_queries():
                print(query)
            if args.query:
                print(client.describe_query(args.query))
                answer = client.run(args.query, **parse_param_args(args.param))
                with pl.Config(tbl_rows=-1, tbl_cols=-1):
                    print(answer.frame)  # released rows; <metric>_ci95: 95 % interval half-widths
                print(answer.summary())  # suppressed rows, k, noise, cost, the guarantee
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except CleanroomError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
