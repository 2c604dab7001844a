"""Which webhook URLs and addresses are refused, and that the HTTP transport enforces it."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import httpx
import pytest
from anyio.abc import SocketAttribute, SocketStream

from pipeline.webhooks import ssrf


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "cloud metadata"),
        ("169.254.1.1", "link-local"),
        ("100.64.0.1", "CGNAT"),
        ("100.127.255.254", "CGNAT"),
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("192.0.2.10", "documentation"),
        ("198.18.0.1", "benchmarking"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("fd00:ec2::254", "cloud metadata"),
        ("ff02::1", "multicast"),
        ("2001:db8::1", "documentation"),
        ("::ffff:127.0.0.1", "loopback, as IPv4 inside IPv6"),
        ("::ffff:10.0.0.1", "private, as IPv4 inside IPv6"),
        ("::ffff:169.254.169.254", "cloud metadata, as IPv4 inside IPv6"),
        ("64:ff9b::a00:1", "private, as IPv4 inside IPv6"),  # NAT64 of 10.0.0.1
        ("2002:7f00:1::", "loopback, as IPv4 inside IPv6"),  # 6to4 of 127.0.0.1
    ],
)
def test_refused_addresses(address: str, reason: str) -> None:
    ip = ipaddress.ip_address(address)
    assert reason in (ssrf.classify(ip) or "")
    with pytest.raises(ssrf.UnsafeUrl, match=reason.split(",")[0]):
        ssrf.check_address(ip, allow_private=False)
    ssrf.check_address(ip, allow_private=True)  # the development config lets it through


@pytest.mark.parametrize(
    "address", ["93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"]
)
def test_public_addresses_pass(address: str) -> None:
    assert ssrf.classify(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://93.184.216.34/hook", "https"),
        ("ftp://example.com/", "https"),
        ("https:///nohost", "host"),
        ("/relative/path", "https"),
        ("https://user:pw@93.184.216.34/", "credentials"),
        ("https://93.184.216.34/#frag", "fragment"),
        ("https://93.184.216.34/a b", "whitespace"),
        ("https://127.0.0.1/hook", "loopback"),
        ("https://10.0.0.1/hook", "private"),
        ("https://169.254.169.254/latest/meta-data/", "cloud metadata"),
        ("https://[::1]:8443/hook", "loopback"),
        ("https://[::ffff:7f00:1]/hook", "loopback"),
        ("https://" + "a" * 2100 + ".com/", "longer"),
    ],
)
def test_refused_urls(url: str, why: str) -> None:
    with pytest.raises(ssrf.UnsafeUrl, match=why):
        ssrf.parse_url(url, allow_private=False)


def test_accepted_urls() -> None:
    target = ssrf.parse_url("https://93.184.216.34/hooks?x=1", allow_private=False)
    assert (target.host, target.port) == ("93.184.216.34", 443)
    target = ssrf.parse_url("https://[2606:4700:4700::1111]:8443/", allow_private=False)
    assert (target.host, target.port) == ("2606:4700:4700::1111", 8443)
    target = ssrf.parse_url("https://bücher.example/", allow_private=False)
    assert target.host == "xn--bcher-kva.example"  # IDNA, as it is resolved
    target = ssrf.parse_url("http://127.0.0.1:9000/hook", allow_private=True)
    assert (target.host, target.port) == ("127.0.0.1", 9000)


def private_name() -> str:
    """A host name this machine resolves to a non-public address without any network: its
    own name when that is so (commonly 127.0.1.1 or a private address), else localhost."""
    name = socket.gethostname()
    try:
        infos = socket.getaddrinfo(name, 443, type=socket.SOCK_STREAM)
    except OSError:
        return "localhost"
    addresses = {ipaddress.ip_address(str(i[4][0]).split("%")[0]) for i in infos}
    if addresses and all(ssrf.classify(a) is not None for a in addresses):
        return name
    return "localhost"


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["localhost", private_name()])
async def test_names_resolving_to_private_addresses_are_refused(name: str) -> None:
    with pytest.raises(ssrf.UnsafeUrl, match=f"{name} resolves to"):
        await ssrf.check_url(f"https://{name}/hook", allow_private=False)
    target = await ssrf.check_url(f"http://{name}/hook", allow_private=True)
    assert target.host == name


@pytest.mark.anyio
async def test_an_unresolvable_name_is_refused() -> None:
    with pytest.raises(ssrf.UnsafeUrl, match="does not resolve"):
        await ssrf.resolve("no-such-host.invalid", 443, allow_private=False)


@asynccontextmanager
async def http_listener() -> AsyncIterator[tuple[int, list[bytes]]]:
    """A bare HTTP/1.1 server on 127.0.0.1 answering 204 to anything; yields (port, requests)."""
    seen: list[bytes] = []

    async def serve(stream: SocketStream) -> None:
        async with stream:
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    data += await stream.receive()
                seen.append(data)
                await stream.send(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        yield listener.extra(SocketAttribute.local_port), seen
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_the_transport_refuses_every_connection_to_a_refused_address() -> None:
    """The check is in the connection itself, whatever the URL looked like when saved."""
    async with http_listener() as (port, seen):
        guarded = ssrf.GuardedTransport(allow_private=False)
        async with httpx.AsyncClient(transport=guarded) as client:
            for host in ("127.0.0.1", "localhost", "[::ffff:127.0.0.1]"):
                with pytest.raises(ssrf.UnsafeUrl):
                    await client.get(f"http://{host}:{port}/")
        assert seen == []

        allowed = ssrf.GuardedTransport(allow_private=True)
        async with httpx.AsyncClient(transport=allowed) as client:
            r = await client.get(f"http://localhost:{port}/x")
        assert r.status_code == 204
        assert seen[0].startswith(b"GET /x HTTP/1.1\r\n")
        assert b"\r\nhost: localhost:" in seen[0].lower()  # the name, not the address


@pytest.mark.anyio
async def test_the_transport_connects_to_the_address_it_checked() -> None:
    """A name is resolved once per connection: the address checked is the address used."""

    async with http_listener() as (port, _seen):
        backend = ssrf.GuardedBackend(allow_private=True)
        stream = await backend.connect_tcp("localhost", port)
        try:
            assert stream.get_extra_info("server_addr")[0] == "127.0.0.1"
        finally:
            await stream.aclose()
        with pytest.raises(ssrf.UnsafeUrl):
            await ssrf.GuardedBackend(allow_private=False).connect_tcp("localhost", port)
        with pytest.raises(ssrf.UnsafeUrl):
            await backend.connect_unix_socket("/var/run/docker.sock")
