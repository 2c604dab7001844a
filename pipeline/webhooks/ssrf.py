"""Where a webhook may go: a public address over https, checked when the URL is saved and again
on every connection.

`parse_url` checks the URL itself; `resolve` resolves its host and refuses the whole name when any
one of its addresses is not public (loopback, private, link-local, CGNAT, multicast, unspecified,
reserved, documentation, cloud metadata; IPv4 inside IPv6 forms is judged as the IPv4 it
carries). `GuardedTransport` is an httpx transport whose every TCP connection goes through that
check and then to the checked address itself, so a name that resolves differently the second time
(DNS rebinding) cannot slip through; TLS still verifies the certificate against the URL's host.

`allow_private` (the development config) lifts the address rules and allows plain http.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import anyio
import httpcore
import httpx

from pipeline.errors import MailpipeError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_URL_LENGTH = 2048


class UnsafeUrl(MailpipeError):
    """A webhook URL, or an address its host resolves to, is not allowed; says why."""


_NET = ipaddress.ip_network

METADATA = (ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254"))
"""Cloud instance metadata endpoints (AWS, GCP, Azure, ...): named apart in refusals."""

_BLOCKED: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = (
    (_NET("0.0.0.0/8"), "unspecified"),
    (_NET("10.0.0.0/8"), "private"),
    (_NET("100.64.0.0/10"), "CGNAT (shared address space)"),
    (_NET("127.0.0.0/8"), "loopback"),
    (_NET("169.254.0.0/16"), "link-local"),
    (_NET("172.16.0.0/12"), "private"),
    (_NET("192.0.0.0/24"), "reserved (IETF protocol assignments)"),
    (_NET("192.0.2.0/24"), "reserved (documentation)"),
    (_NET("192.88.99.0/24"), "reserved (6to4 relay anycast)"),
    (_NET("192.168.0.0/16"), "private"),
    (_NET("198.18.0.0/15"), "reserved (benchmarking)"),
    (_NET("198.51.100.0/24"), "reserved (documentation)"),
    (_NET("203.0.113.0/24"), "reserved (documentation)"),
    (_NET("224.0.0.0/4"), "multicast"),
    (_NET("240.0.0.0/4"), "reserved"),
    (_NET("::/128"), "unspecified"),
    (_NET("::1/128"), "loopback"),
    (_NET("::/96"), "reserved (IPv4-compatible)"),
    (_NET("100::/64"), "reserved (discard)"),
    (_NET("2001:db8::/32"), "reserved (documentation)"),
    (_NET("fc00::/7"), "private (unique local)"),
    (_NET("fe80::/10"), "link-local"),
    (_NET("fec0::/10"), "reserved (site-local)"),
    (_NET("ff00::/8"), "multicast"),
)

_NAT64 = _NET("64:ff9b::/96")


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, NAT64, 6to4, Teredo), if any."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


def classify(ip: IPAddress) -> str | None:
    """Why `ip` is not a public unicast address (None when it is one)."""
    if ip in METADATA:
        return "cloud metadata"
    inner = embedded_ipv4(ip)
    if inner is not None:
        reason = classify(inner)
        return None if reason is None else f"{reason}, as IPv4 inside IPv6"
    for network, reason in _BLOCKED:
        if ip.version == network.version and ip in network:
            return reason
    if not ip.is_global:  # whatever else IANA lists as not globally reachable
        return "reserved"
    return None


def check_address(ip: IPAddress, *, allow_private: bool) -> None:
    """Raise UnsafeUrl when `ip` may not be connected to."""
    if allow_private:
        return
    reason = classify(ip)
    if reason is not None:
        raise UnsafeUrl(f"{ip} is a {reason} address")


def parse_ip(host: str) -> IPAddress | None:
    """The address when `host` is an IP literal (with or without IPv6 brackets), else None."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


@dataclass(frozen=True)
class Target:
    """A syntactically acceptable webhook URL, split into what a connection needs."""

    url: httpx.URL
    host: str
    """ASCII (IDNA-encoded) host name, or the IP literal without brackets."""
    port: int


def parse_url(url: str, *, allow_private: bool) -> Target:
    """Check the URL alone (no DNS): absolute http(s) with a host, no credentials or fragment;
    https only unless `allow_private`. IP literals are checked here already."""
    if len(url) > MAX_URL_LENGTH:
        raise UnsafeUrl(f"longer than {MAX_URL_LENGTH} characters")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise UnsafeUrl("must not contain whitespace or control characters")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as exc:
        raise UnsafeUrl(f"not a valid URL ({exc})") from None
    schemes = ("https", "http") if allow_private else ("https",)
    if parsed.scheme not in schemes:
        raise UnsafeUrl("must be an https:// URL" if not allow_private else "must be http(s)://")
    if not parsed.raw_host:
        raise UnsafeUrl("must name a host")
    if parsed.userinfo:
        raise UnsafeUrl("must not carry credentials; requests are signed instead")
    if parsed.fragment:
        raise UnsafeUrl("must not have a #fragment")
    host = parsed.raw_host.decode("ascii")
    ip = parse_ip(host)
    if ip is not None:
        check_address(ip, allow_private=allow_private)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return Target(parsed, host, port)


async def resolve(host: str, port: int, *, allow_private: bool) -> list[IPAddress]:
    """Every address `host` resolves to, once each, in resolver order; UnsafeUrl when it does
    not resolve or when any one of them is refused (a name is trusted whole or not at all)."""
    ip = parse_ip(host)
    if ip is not None:
        check_address(ip, allow_private=allow_private)
        return [ip]
    try:
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise UnsafeUrl(f"{host} does not resolve ({exc})") from None
    found: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in found:
            found.append(address)
    if not found:
        raise UnsafeUrl(f"{host} does not resolve")
    if not allow_private:
        for address in found:
            reason = classify(address)
            if reason is not None:
                raise UnsafeUrl(f"{host} resolves to {address}, a {reason} address")
    return found


async def check_url(url: str, *, allow_private: bool) -> Target:
    """`parse_url`, then resolve the host and check every address."""
    target = parse_url(url, allow_private=allow_private)
    await resolve(target.host, target.port, allow_private=allow_private)
    return target


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """An httpcore network backend that resolves, checks, then connects to a checked address
    (trying each in turn); unix sockets are refused."""

    def __init__(self, *, allow_private: bool, inner: httpcore.AsyncNetworkBackend | None = None):
        self.allow_private = allow_private
        self._inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await resolve(host, port, allow_private=self.allow_private)
        failure: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    str(address),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise UnsafeUrl("unix sockets are not webhook targets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport (connection pool, TLS verification, error mapping) whose
    connections all go through `GuardedBackend`. No proxy is ever used (one would connect
    wherever it likes), whatever the environment says."""

    def __init__(self, *, allow_private: bool, limits: httpx.Limits | None = None) -> None:
        limits = limits or httpx.Limits()
        super().__init__(trust_env=False, limits=limits)
        # httpx has no public hook for the network backend: rebuild its pool with ours (the
        # integration tests check that a refused address is refused through this transport).
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=GuardedBackend(allow_private=allow_private),
        )
