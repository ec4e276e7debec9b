"""Who the client is, and what the origin is told: pure rules."""

import ipaddress

import pytest

from addons.net import client_ip, embedded_ipv4, is_internal, parse_host_ip, parse_ip, parse_ipv4_host
from addons.scrub.forwarding import forwardable, forwarded_node, forwarding_headers

T = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"))


@pytest.mark.parametrize("peer, xff, trusted, expected", [
    ("203.0.113.9", ["1.2.3.4"], T, "203.0.113.9"),                    # untrusted peer: XFF ignored
    ("203.0.113.9", ["1.2.3.4"], (), "203.0.113.9"),                   # nobody trusted by default
    ("127.0.0.1", ["198.51.100.7"], T, "198.51.100.7"),                # trusted LB: its client
    ("127.0.0.1", ["6.6.6.6, 198.51.100.7"], T, "198.51.100.7"),       # left of the client: spoofable
    ("127.0.0.1", ["6.6.6.6, 198.51.100.7, 10.1.2.3"], T, "198.51.100.7"),  # skip trusted hops
    ("127.0.0.1", ["6.6.6.6", "198.51.100.7"], T, "198.51.100.7"),     # repeated header lines
    ("127.0.0.1", ["10.0.0.1, 10.0.0.2"], T, "127.0.0.1"),             # all trusted: the peer
    ("127.0.0.1", ["not-an-ip"], T, "127.0.0.1"),                      # garbage is not believed
    ("127.0.0.1", [], T, "127.0.0.1"),
    ("::ffff:127.0.0.1", ["2001:db8::5"], T, "2001:db8::5"),           # mapped peer, IPv6 client
])
def test_client_ip(peer, xff, trusted, expected):
    assert client_ip(peer, xff, trusted) == expected


@pytest.mark.parametrize("text, internal", [
    ("10.1.2.3", True), ("172.16.0.1", True), ("172.32.0.1", False), ("192.168.1.1", True),
    ("127.0.0.53", True), ("::1", True), ("fd12:3456::1", True), ("fe80::1%eth0", True),
    ("8.8.8.8", False), ("203.0.113.5", False), ("2001:db8::1", False), ("::ffff:10.0.0.1", True),
    ("0.0.0.0", True), ("::", True), ("::10.1.2.3", True), ("2002:a01:203::1", True), ("64:ff9b::10.1.2.3", True),
    ("2002:cb00:7101::1", False), ("64:ff9b::8.8.8.8", False), ("fec0::1", True), ("100.64.1.1", True),
])
def test_internal_addresses(text, internal):
    assert is_internal(parse_ip(text)) is internal


@pytest.mark.parametrize("host, ip", [
    ("10.1.2.3", "10.1.2.3"), ("167838211", "10.1.2.3"), ("0x0a010203", "10.1.2.3"), ("0X0A010203", "10.1.2.3"),
    ("012.1.2.3", "10.1.2.3"), ("0x0a.1.2.3", "10.1.2.3"), ("10.1.515", "10.1.2.3"), ("10.1", "10.0.0.1"),
    ("10.1.2.3.", "10.1.2.3"), ("0", "0.0.0.0"), ("0x", "0.0.0.0"), ("4294967295", "255.255.255.255"),
    ("4294967296", None), ("1.2.3.4.5", None), ("08.1.2.3", None), ("256.1.2.3", None), ("1_0.1.2.3", None),
    ("+10.1.2.3", None), ("10.1.2.3a", None), ("", None), ("1..2", None),
])
def test_ipv4_as_a_browser_reads_a_url_host(host, ip):
    parsed = parse_ipv4_host(host)
    assert (str(parsed) if parsed else None) == ip


@pytest.mark.parametrize("host, ip", [
    ("[::1]", "::1"), ("fe80::1%eth0", "fe80::1"), ("[fe80::1%25eth0]", "fe80::1"), ("167838211", "10.1.2.3"),
    ("shop.example", None), ("backend", None), ("10.1.2.3.nip.io", None), ("[zz::1]", None),
])
def test_parse_host_ip(host, ip):
    parsed = parse_host_ip(host)
    assert (str(parsed) if parsed else None) == ip


def test_embedded_ipv4():
    assert str(embedded_ipv4(parse_host_ip("::ffff:a01:203"))) == "10.1.2.3"
    assert str(embedded_ipv4(parse_host_ip("2002:a01:203::1"))) == "10.1.2.3"
    assert embedded_ipv4(parse_host_ip("2001:db8::1")) is None and embedded_ipv4(parse_host_ip("::1")) is None


def names(fields):
    return [k.decode() for k, _ in fields]


def test_hop_by_hop_and_connection_tokens_are_dropped_but_not_framing():
    fields = ((b"Host", b"a"), (b"Connection", b"close, X-Secret, Content-Length"), (b"X-Secret", b"1"),
              (b"Keep-Alive", b"5"), (b"TE", b"trailers"), (b"Upgrade", b"h2c"), (b"Proxy-Authorization", b"x"),
              (b"X-Forwarded-For", b"6.6.6.6"), (b"x-real-ip", b"6.6.6.6"), (b"Content-Length", b"3"),
              (b"Transfer-Encoding", b"chunked"), (b"Accept", b"*/*"))
    assert names(forwardable(fields)[0]) == ["Host", "Content-Length", "Transfer-Encoding", "Accept"]


def test_websocket_upgrade_survives():
    fields = ((b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"), (b"Sec-WebSocket-Key", b"k"))
    assert names(forwardable(fields)[0]) == ["Connection", "Upgrade", "Sec-WebSocket-Key"]


def test_forwarding_headers():
    assert forwarding_headers("198.51.100.7", "https", "shop.example") == {
        "X-Forwarded-For": "198.51.100.7", "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "shop.example", "Forwarded": 'for=198.51.100.7;proto=https;host="shop.example"'}
    assert forwarded_node("2001:db8::1") == '"[2001:db8::1]"'
    assert "X-Forwarded-Host" not in forwarding_headers("1.2.3.4", "http", None)
