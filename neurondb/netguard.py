"""SSRF guard for outbound HTTP whose URL comes from a job payload (the queue's `http_call` jobs).

A job can be enqueued by anyone who can INSERT into the queue table, and the worker runs next to the
database, often inside a cloud VPC: without a guard a job could read the cloud metadata service
(credentials), the database host's admin ports, or anything on the private network. So by default a job
may reach only public addresses; loopback, private, link-local, metadata, CGNAT, multicast and reserved
addresses need an entry in neurondb.http_allowlist (a host name, an IP address or a CIDR network).

Two classic bypasses are closed:
- DNS rebinding / time-of-check-time-of-use: the name is resolved once, every resolved address is
  checked, and the connection goes to the checked address (the URL's host is replaced by the IP, the Host
  header and TLS SNI keep the name, so virtual hosting and certificate checks work as usual). There is
  no second lookup an attacker's DNS server could answer differently. The async client keeps connections
  alive, keyed by the checked address and the name together, so a connection is reused only for the name
  it was opened (and TLS-checked) for, at the address checked for it; the sync client keeps none.
- Redirects: the guard sits in the transport, so every hop of a redirect chain is checked like the first.
Numeric tricks ("http://2130706433/", "http://0x7f.1/", "::ffff:127.0.0.1") are caught because the
check is on what getaddrinfo and ipaddress make of the host, and IPv4 embedded in IPv6 (mapped, NAT64,
6to4) is checked as the IPv4 address it reaches.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import httpx

from neurondb.providers.transport import KeepAliveTransport
from neurondb.redaction import redact_url, redact_urls, shorten
from neurondb.settings import parse_host_list

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]

SETTING = "neurondb.http_allowlist"
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean ...
    "169.254.170.2",  # AWS ECS task metadata
    "fd00:ec2::254",  # AWS IMDS over IPv6
    "100.100.100.200",  # Alibaba Cloud
))
# Names refused before any lookup: inside a cloud they resolve to the metadata service, and a resolver
# that maps them elsewhere (a split-horizon DNS) must not turn them into a way around the address check.
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata.goog", "metadata", "instance-data",
                            "instance-data.ec2.internal"})
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")  # connecting to 0.0.0.0 reaches the local host on Linux
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_PRIVATE = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7", "fec0::/10"))


class NetguardError(Exception):
    """An outbound request the guard stopped. `retryable` tells a job runner whether to try again."""

    retryable = False


class TargetRefused(NetguardError):
    """The URL's scheme or address is not allowed. Retrying cannot help; the allowlist can."""


class ResolveError(NetguardError):
    """The host name did not resolve. Retryable when the resolver said "try again" (EAI_AGAIN)."""

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address reaches: mapped (::ffff:a.b.c.d), NAT64 (64:ff9b::/96), 6to4."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def forbidden_reason(ip: IPAddress) -> str | None:
    """Why a request to `ip` is refused by default ("a private address", ...), or None if it is public."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            reason = forbidden_reason(inner)
            return f"an IPv6 address embedding {inner}, {reason}" if reason else None
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if ip.is_unspecified or ip in _THIS_NETWORK:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if ip in _CGNAT:
        return "a shared (CGNAT, 100.64.0.0/10) address"
    if any(ip in net for net in _PRIVATE if net.version == ip.version):
        return "a private address"
    if ip.is_reserved or (isinstance(ip, ipaddress.IPv4Address) and ip == ipaddress.IPv4Address("255.255.255.255")):
        return "a reserved address"
    if not ip.is_global:
        return "a special-purpose (non-global) address"
    return None


@dataclass(frozen=True)
class Allowlist:
    """neurondb.http_allowlist parsed: host names (exact, case-insensitive) and IP networks."""

    hosts: frozenset[str]
    networks: tuple[IPNetwork, ...]

    @classmethod
    def parse(cls, value: str | Iterable[str] | Allowlist | None) -> Allowlist:
        """From the setting's text, a list of entries, or an Allowlist (returned as is)."""
        if isinstance(value, Allowlist):
            return value
        entries = parse_host_list(value) if isinstance(value, str) else parse_host_list(",".join(value or ()))
        hosts, networks = set(), []
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(_normal_host(entry))
        return cls(frozenset(hosts), tuple(networks))

    def host_entry(self, host: str) -> str | None:
        """The entry allowing host name `host`, if any."""
        host = _normal_host(host)
        return host if host in self.hosts else None

    def ip_entry(self, ip: IPAddress) -> str | None:
        """The entry (network) containing `ip`; IPv4 entries also cover the IPv4-mapped IPv6 form."""
        candidates = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
        for net in self.networks:
            for cand in candidates:
                if cand.version == net.version and cand in net:
                    return str(net)
        return None


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _normal_host(host: str) -> str:
    return host.strip().lower().rstrip(".")


def system_resolver(host: str, port: int) -> list[str]:
    """Addresses of `host` from getaddrinfo, in the system's preference order."""
    return [str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


@dataclass(frozen=True)
class ResolvedTarget:
    """A URL that passed the guard, and the address a connection to it must use."""

    url: str
    scheme: str
    host: str  # the name as sent in Host / SNI (IDNA-encoded, lowercase)
    port: int
    address: str  # the checked address to connect to
    addresses: tuple[str, ...]  # every address the name resolved to (all passed)
    allowed_by: str | None  # the allowlist entry that let a non-public target through, None if public


def _refused(ip: str, host: str, reason: str) -> TargetRefused:
    named = f" (host {host})" if host != ip else ""
    return TargetRefused(f"refused: {ip}{named} is {reason}; add it to {SETTING} to allow")


def _addresses(host: str, port: int, resolver: Resolver | None, *, allowlisted: bool) -> list[str]:
    """`host` itself if it is an IP literal, else what the resolver makes of it (no duplicates)."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    if host in METADATA_HOSTS and not allowlisted:
        raise TargetRefused(f"refused: host {host} is a cloud metadata service name; add it to {SETTING} to allow")
    try:
        addresses = list(dict.fromkeys((resolver or system_resolver)(host, port)))
    except socket.gaierror as exc:
        raise ResolveError(f"cannot resolve host {host}: {exc.strerror or exc}",
                           retryable=exc.errno == socket.EAI_AGAIN) from None
    if not addresses:
        raise ResolveError(f"cannot resolve host {host}: no addresses", retryable=False)
    return addresses


def check_url(url: str | httpx.URL, allowlist: str | Iterable[str] | Allowlist | None,
              *, resolver: Resolver | None = None) -> ResolvedTarget:
    """Resolve `url`'s host and refuse it unless it is public or allowlisted; see the module docstring.

    Raises TargetRefused (bad scheme, forbidden address) or ResolveError (unknown host).
    """
    allow = Allowlist.parse(allowlist)
    shown = shorten(redact_url(str(url)), 200)   # a URL may carry credentials: never quoted whole
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise TargetRefused(f"refused: {shown!r} is not a valid URL: {redact_urls(str(exc))}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise TargetRefused(f"refused: {shown!r} is not an absolute http(s) URL (only http and https, with a host)")
    host = _normal_host(parsed.raw_host.decode("ascii"))
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    host_entry = allow.host_entry(host)
    addresses = _addresses(host, port, resolver, allowlisted=host_entry is not None)
    allowed_by = host_entry
    for text in addresses:
        ip = ipaddress.ip_address(text)
        reason = forbidden_reason(ip)
        if reason is None or host_entry is not None:
            continue
        entry = allow.ip_entry(ip)
        if entry is None:
            raise _refused(text, host, reason)
        allowed_by = allowed_by or entry
    return ResolvedTarget(str(parsed), parsed.scheme, host, port, addresses[0], tuple(addresses), allowed_by)


def _pinned(request: httpx.Request, target: ResolvedTarget) -> httpx.Request:
    """`request` aimed at the checked address, keeping the Host header and (for https) the name as SNI.

    A new Request rather than a mutated one: httpx builds redirect requests from the original, and a
    relative redirect must resolve against the name, not the IP.
    """
    extensions = dict(request.extensions)
    if target.scheme == "https":
        extensions["sni_hostname"] = target.host
    return httpx.Request(request.method, request.url.copy_with(host=target.address), headers=request.headers,
                         stream=request.stream, extensions=extensions)


def _inner_limits() -> httpx.Limits:
    # No keep-alive: httpx pools connections by the pinned IP alone, so a connection opened (and TLS-checked)
    # for one name could otherwise carry a request for another name on the same address.
    return httpx.Limits(max_keepalive_connections=0)


IDLE_CONNECTIONS = 64    # keep-alive connections an async guarded client keeps idle, over all hosts


class GuardedTransport(httpx.BaseTransport):
    """An httpx transport that checks every request (every redirect hop) and connects to the checked IP."""

    def __init__(self, allowlist: str | Iterable[str] | Allowlist | None, *, resolver: Resolver | None = None,
                 verify: bool = True) -> None:
        self._allow = Allowlist.parse(allowlist)
        self._resolver = resolver
        self._inner = httpx.HTTPTransport(verify=verify, limits=_inner_limits())

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        target = check_url(request.url, self._allow, resolver=self._resolver)
        return self._inner.handle_request(_pinned(request, target))

    def close(self) -> None:
        self._inner.close()


class AsyncGuardedTransport(httpx.AsyncBaseTransport):
    """GuardedTransport for httpx.AsyncClient; the lookup runs in a thread (getaddrinfo blocks).

    Its connections are the LLM worker's keep-alive transport (providers/transport.py), which keys them by
    (scheme, pinned address, port, name): reused only for the same name at the same checked address.
    """

    def __init__(self, allowlist: str | Iterable[str] | Allowlist | None, *, resolver: Resolver | None = None,
                 verify: bool = True) -> None:
        self._allow = Allowlist.parse(allowlist)
        self._resolver = resolver
        self._inner = KeepAliveTransport(IDLE_CONNECTIONS, verify=verify)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if _is_ip_literal(request.url.host):     # nothing to look up: checked in the loop, no thread hop
            target = check_url(request.url, self._allow, resolver=self._resolver)
        else:
            target = await asyncio.to_thread(check_url, request.url, self._allow, resolver=self._resolver)
        return await self._inner.handle_async_request(_pinned(request, target))

    async def aclose(self) -> None:
        await self._inner.aclose()


def guarded_client(allowlist: str | Iterable[str] | Allowlist | None, timeout: float = 30.0, *,
                   follow_redirects: bool = True, max_redirects: int = 5, resolver: Resolver | None = None,
                   verify: bool = True) -> httpx.Client:
    """An httpx.Client for job-supplied URLs. Environment proxies are ignored (trust_env=False): through a
    proxy the guard would check the proxy, not the target."""
    return httpx.Client(transport=GuardedTransport(allowlist, resolver=resolver, verify=verify), timeout=timeout,
                        follow_redirects=follow_redirects, max_redirects=max_redirects, trust_env=False)


def guarded_async_client(allowlist: str | Iterable[str] | Allowlist | None, timeout: float = 30.0, *,
                         follow_redirects: bool = True, max_redirects: int = 5, resolver: Resolver | None = None,
                         verify: bool = True) -> httpx.AsyncClient:
    """The async twin of guarded_client."""
    return httpx.AsyncClient(transport=AsyncGuardedTransport(allowlist, resolver=resolver, verify=verify),
                             timeout=timeout, follow_redirects=follow_redirects, max_redirects=max_redirects,
                             trust_env=False)


def read_bounded(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """Up to `limit` bytes of a streamed response's (decoded) body and whether it was cut, reading no more
    than that from the network beyond one chunk: a job's result has a size bound
    (neurondb.http_max_response_size) and a huge or endless body must not fill the worker's memory."""
    kept = bytearray()
    for chunk in response.iter_bytes():
        kept += chunk
        if len(kept) > limit:
            response.close()
            return bytes(kept[:limit]), True
    return bytes(kept), False


async def aread_bounded(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """The async twin of read_bounded."""
    kept = bytearray()
    async for chunk in response.aiter_bytes():
        kept += chunk
        if len(kept) > limit:
            await response.aclose()
            return bytes(kept[:limit]), True
    return bytes(kept), False
