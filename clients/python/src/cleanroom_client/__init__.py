"""A partner's client for the clean room.

    from cleanroom_client import Client

    with Client.connect("https://cleanroom.example.jp:50051", token, ca_file="ca.pem") as client:
        for query in client.list_queries():
            print(query)
        answer = client.run("category_buyers_by_age_band", start="2025-11-01", end="2026-11-01")
        print(answer.frame)        # a Polars DataFrame: the released rows, <metric>_ci95 columns
        print(answer.protection)   # noise, intervals, cost, the contract's guarantee
        result = client.upload_list("customers.csv")   # or a DataFrame; progress on stderr
        print(result.list_version)

The service's API is `proto/cleanroom/v1/cleanroom.proto` (cleanroom.v1.PartnerService); the
generated stubs are in `cleanroom_client._generated`.
"""

from .answers import Answer, Column, Protection, to_polars, typed_rows
from .client import Client, is_loopback, parse_address
from .errors import CleanroomError, UsageError
from .lists import CHUNK_RECORDS, LIST_COLUMNS, StderrProgress, dataframe_records, read_list_csv
from .models import Dimension, Parameter, QueryDescription, QuerySummary, UploadProgress, UploadResult
from .params import ParamInput, build_params, parse_param_args

__version__ = "0.1.0"

__all__ = [
    "CHUNK_RECORDS",
    "LIST_COLUMNS",
    "Answer",
    "CleanroomError",
    "Client",
    "Column",
    "Dimension",
    "ParamInput",
    "Parameter",
    "Protection",
    "QueryDescription",
    "QuerySummary",
    "StderrProgress",
    "UploadProgress",
    "UploadResult",
    "UsageError",
    "build_params",
    "dataframe_records",
    "is_loopback",
    "parse_address",
    "parse_param_args",
    "read_list_csv",
    "to_polars",
    "typed_rows",
]
