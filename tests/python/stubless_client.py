"""A gRPC client that has never seen the clean room's stubs or proto files.

It discovers everything through server reflection, as grpcurl or any grpcio tool would: lists the
services, checks health, then builds a RunQuery request from the reflected descriptors and runs it.
.ci/run runs this against `cleanroom serve` over TLS (tests/deploy/serve_in_netns.sh); it works as
well against `cleanroom demo --keep-serving`.

Usage: python stubless_client.py HOST:PORT [CA.pem]
"""

import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

TOKEN = "demo-sakura-token"  # sample data only


def unary(channel, pool, service, method_name):
    method = pool.FindServiceByName(service).FindMethodByName(method_name)
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    call = channel.unary_unary(
        f"/{service}/{method_name}",
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    return request_class, call


def main(address, ca=None):
    if ca:
        with open(ca, "rb") as f:
            channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=f.read()))
        print("TLS, trusting", ca)
    else:
        channel = grpc.insecure_channel(address)
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    print("services:", sorted(services))
    for expected in ("cleanroom.v1.PartnerService", "cleanroom.v1.AdminService", "grpc.health.v1.Health"):
        assert expected in services, f"{expected} not listed by reflection"
    pool = descriptor_pool.DescriptorPool(database)

    check_request, check = unary(channel, pool, "grpc.health.v1.Health", "Check")
    health = check(json_format.ParseDict({"service": "cleanroom.v1.PartnerService"}, check_request()))
    status = json_format.MessageToDict(health)["status"]
    print("health:", status)
    assert status == "SERVING", status

    run_request, run = unary(channel, pool, "cleanroom.v1.PartnerService", "RunQuery")
    request = json_format.ParseDict(
        {
            "query_id": "category_buyers_by_age_band",
            "params": {"start": {"date_value": "2025-11-01"}, "end": {"date_value": "2026-11-01"}},
        },
        run_request(),
    )
    response = run(request, metadata=[("authorization", f"Bearer {TOKEN}")])
    columns = [c.name for c in response.columns]
    print("columns:", columns, "rows:", len(response.rows), "suppressed:", response.suppressed_rows)
    assert columns == ["age_band", "category", "buyers", "amount_yen", "buyers_ci95", "amount_yen_ci95"], columns
    assert len(response.rows) > 0 and response.effective_k >= 10
    assert all(row.values[2].int_value >= response.effective_k for row in response.rows)

    try:
        run(request, metadata=[("authorization", "Bearer not-a-token")])
        raise AssertionError("an unknown token was accepted")
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.code()
    if ca:
        refused_without_the_ca(address, ca)
    print("stubless client: all checks passed")


def refused_without_the_ca(address, ca):
    """Plain text, and TLS trusting a certificate that is not the service's CA (a partner's
    client certificate next to it), both get no answer."""
    import os  # noqa: PLC0415

    wrong = os.path.join(os.path.dirname(ca), "sakura_foods.pem")
    with open(wrong, "rb") as f:
        channels = {
            "plain text": grpc.insecure_channel(address),
            "another trust root": grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=f.read())),
        }
    for what, channel in channels.items():
        try:
            grpc.channel_ready_future(channel).result(timeout=5)
            raise AssertionError(f"{what}: the channel became ready")
        except grpc.FutureTimeoutError:
            print(f"{what}: refused (the channel never becomes ready)")
        finally:
            channel.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
