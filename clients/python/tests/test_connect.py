"""Client.connect: addresses, TLS or plain text, and what is refused before anything is sent."""

from __future__ import annotations

import socket
from pathlib import Path

import grpc
import pytest

from cleanroom_client import CleanroomError, Client, UsageError, is_loopback, parse_address


@pytest.mark.parametrize(
    "addr, expected",
    [
        ("https://10.200.0.1:50443", ("https", "10.200.0.1", 50443)),
        ("http://127.0.0.1:50051/", ("http", "127.0.0.1", 50051)),
        ("cleanroom.example.jp:443", ("", "cleanroom.example.jp", 443)),
        ("HTTPS://[::1]:50051", ("https", "::1", 50051)),
        ("[fd00::1]:1", ("", "fd00::1", 1)),
    ],
)
def test_parse_address(addr: str, expected: tuple[str, str, int]) -> None:
    assert parse_address(addr) == expected


@pytest.mark.parametrize(
    "addr, message",
    [
        ("127.0.0.1", "no port"),
        ("https://example.jp", "no port"),
        ("::1:50051", "no port"),
        ("grpc://127.0.0.1:50051", "not grpc://"),
        ("127.0.0.1:http", "not a number"),
        ("127.0.0.1:70000", "out of range"),
        ("https://example.jp:443/path", r"expected \[https://\]HOST:PORT"),
        (":50051", "no host"),
    ],
)
def test_bad_addresses(addr: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_address(addr)


def test_loopback() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.8.9.10", "::1", "localhost", "LOCALHOST"]))
    assert not any(map(is_loopback, ["10.200.0.1", "0.0.0.0", "::", "example.jp", "localhost.example.jp"]))


@pytest.mark.parametrize("addr", ["10.200.0.1:50443", "http://10.200.0.1:50443", "cleanroom.example.jp:50051",
                                  "http://0.0.0.0:50051", "[fd00::1]:50051"])
def test_plain_text_off_loopback_is_refused_before_the_token_is_sent(addr: str) -> None:
    with pytest.raises(UsageError, match="refusing to send the token in plain text"):
        Client.connect(addr, "demo-sakura-token", connect_timeout=None)


@pytest.mark.parametrize("addr", ["127.0.0.1:50051", "http://localhost:50051", "http://[::1]:50051"])
def test_plain_text_on_loopback(addr: str) -> None:
    with Client.connect(addr, "demo-sakura-token", connect_timeout=None) as client:
        assert not client.tls


def test_tls_with_a_ca_file_or_an_https_address(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    with Client.connect("10.200.0.1:50443", "t", ca_file=ca, connect_timeout=None) as client:
        assert client.tls
    # https:// without a CA file: the system's trusted roots.
    with Client.connect("https://cleanroom.example.jp:443", "t", connect_timeout=None) as client:
        assert client.tls


def test_refused_combinations(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    with pytest.raises(UsageError, match="with a CA file, use https://"):
        Client.connect("http://127.0.0.1:50051", "t", ca_file=ca, connect_timeout=None)
    with pytest.raises(UsageError, match="go together"):
        Client.connect("https://example.jp:443", "t", client_cert=ca, connect_timeout=None)
    with pytest.raises(UsageError, match="needs TLS"):
        Client.connect("127.0.0.1:50051", "t", client_cert=ca, client_key=ca, connect_timeout=None)
    with pytest.raises(UsageError, match="missing.pem: No such file"):
        Client.connect("https://example.jp:443", "t", ca_file=tmp_path / "missing.pem", connect_timeout=None)


@pytest.mark.parametrize("token", ["", "  ", "two words", "line\nbreak", "トークン"])
def test_bad_tokens(token: str) -> None:
    with pytest.raises(UsageError, match="token"):
        Client.connect("127.0.0.1:50051", token, connect_timeout=None)


def test_nothing_listening_is_unavailable_within_the_connect_timeout() -> None:
    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(CleanroomError) as caught:
        Client.connect(f"127.0.0.1:{port}", "t", connect_timeout=0.5)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert f"cannot connect to 127.0.0.1:{port} within 0.5 s" in caught.value.message
