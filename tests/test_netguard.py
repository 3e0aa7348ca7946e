"""The SSRF guard of http_call jobs: every forbidden address class, the allowlist, redirects, rebinding.

Address checks use literal IPs and stub resolvers, so no packet leaves the machine; the requests that are
really sent go to servers on 127.0.0.1 / 127.0.0.2 only.
"""

from __future__ import annotations

import asyncio
import socket
import tracemalloc
from collections.abc import Iterator

import httpx
import pytest

from neurondb.netguard import (
    ResolveError,
    Resolver,
    TargetRefused,
    _pinned,
    aread_bounded,
    check_url,
    guarded_async_client,
    guarded_client,
    read_bounded,
)
from neurondb.providers.transport import MAX_BODY
from tests.fakeprovider import FakeProvider


def no_dns(host: str, port: int) -> list[str]:
    raise AssertionError(f"the guard looked up {host}, which it must refuse without a lookup")


def stub(table: dict[str, list[str]]) -> Resolver:
    """A resolver answering from `table`, unknown names failing like getaddrinfo does."""
    def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]
    return resolve


@pytest.mark.parametrize(("host", "reason"), [
    ("127.0.0.1", "a loopback address"),
    ("127.8.9.10", "a loopback address"),
    ("[::1]", "a loopback address"),
    ("10.0.0.5", "a private address"),
    ("172.16.3.4", "a private address"),
    ("192.168.1.1", "a private address"),
    ("[fd12:3456::1]", "a private address"),
    ("169.254.10.1", "a link-local address"),
    ("[fe80::1]", "a link-local address"),
    ("169.254.169.254", "a cloud metadata address"),
    ("[fd00:ec2::254]", "a cloud metadata address"),
    ("224.0.0.1", "a multicast address"),
    ("[ff02::1]", "a multicast address"),
    ("0.0.0.0", "an unspecified address"),
    ("[::]", "an unspecified address"),
    ("240.0.0.1", "a reserved address"),
    ("255.255.255.255", "a reserved address"),
    ("100.64.0.1", "a shared (CGNAT, 100.64.0.0/10) address"),
    ("198.18.0.1", "a special-purpose (non-global) address"),
    ("[::ffff:127.0.0.1]", "embedding 127.0.0.1, a loopback address"),
    ("[::ffff:10.0.0.1]", "embedding 10.0.0.1, a private address"),
    ("[::ffff:169.254.169.254]", "embedding 169.254.169.254, a cloud metadata address"),
    ("[64:ff9b::a9fe:a9fe]", "embedding 169.254.169.254, a cloud metadata address"),
])
def test_forbidden_address_classes_are_refused(host: str, reason: str) -> None:
    with pytest.raises(TargetRefused) as info:
        check_url(f"http://{host}:8080/path", "", resolver=no_dns)
    message = str(info.value)
    assert reason in message and message.endswith("add it to neurondb.http_allowlist to allow")
    assert not info.value.retryable


def test_message_names_address_and_host() -> None:
    with pytest.raises(TargetRefused) as info:
        check_url("https://internal.example/api", "", resolver=stub({"internal.example": ["10.0.0.5"]}))
    assert str(info.value) == ("refused: 10.0.0.5 (host internal.example) is a private address; "
                               "add it to neurondb.http_allowlist to allow")


def test_localhost_and_numeric_spellings_of_loopback() -> None:
    for url in ("http://localhost/", "http://LOCALHOST./", "http://2130706433/", "http://0x7f.1/", "http://127.1/"):
        with pytest.raises(TargetRefused, match="is a loopback address"):
            check_url(url, "")  # the system resolver: these never leave the machine


def test_metadata_names_refused_without_lookup() -> None:
    with pytest.raises(TargetRefused, match=r"metadata\.google\.internal is a cloud metadata service name"):
        check_url("http://metadata.google.internal/computeMetadata/v1/", "", resolver=no_dns)


def test_only_http_and_https() -> None:
    for url in ("ftp://example.com/file", "file:///etc/passwd", "gopher://example.com/"):
        with pytest.raises(TargetRefused, match="only http and https"):
            check_url(url, "", resolver=no_dns)


def test_public_addresses_pass() -> None:
    target = check_url("https://93.184.216.34/x?y=1", "", resolver=no_dns)
    assert (target.address, target.port, target.allowed_by) == ("93.184.216.34", 443, None)
    target = check_url("http://api.example.com:8000/", "", resolver=stub({"api.example.com": ["203.0.114.7"]}))
    assert target.host == "api.example.com" and target.address == "203.0.114.7"


def test_name_with_any_forbidden_address_is_refused() -> None:
    resolver = stub({"mixed.example": ["93.184.216.34", "192.168.0.10"]})
    with pytest.raises(TargetRefused, match=r"192\.168\.0\.10 \(host mixed\.example\) is a private address"):
        check_url("http://mixed.example/", "", resolver=resolver)


def test_allowlist_by_host_ip_and_cidr() -> None:
    resolver = stub({"internal.example": ["10.0.0.5"], "other.example": ["10.0.0.6"]})
    target = check_url("http://internal.example/", "internal.example", resolver=resolver)
    assert target.address == "10.0.0.5" and target.allowed_by == "internal.example"
    assert check_url("http://INTERNAL.example./", "internal.example", resolver=resolver).address == "10.0.0.5"
    assert check_url("http://10.0.0.5/", "10.0.0.5").allowed_by == "10.0.0.5/32"
    assert check_url("http://other.example/", "api.example.com, 10.0.0.0/8", resolver=resolver).allowed_by \
        == "10.0.0.0/8"
    assert check_url("http://[::ffff:10.0.0.7]/", ["10.0.0.0/8"]).allowed_by == "10.0.0.0/8"
    assert check_url("http://localhost/", "localhost").allowed_by == "localhost"
    assert check_url("http://127.0.0.1/", "127.0.0.0/8").allowed_by == "127.0.0.0/8"
    with pytest.raises(TargetRefused):
        check_url("http://other.example/", "internal.example, 10.0.0.5", resolver=resolver)
    with pytest.raises(ValueError, match="is not a host name, IP address or CIDR"):
        check_url("http://10.0.0.5/", "not a host!")


def test_unresolvable_host() -> None:
    with pytest.raises(ResolveError, match=r"cannot resolve host nowhere\.invalid") as info:
        check_url("http://nowhere.invalid/", "", resolver=stub({}))
    assert not info.value.retryable


def test_pinned_request_keeps_host_header_and_sni() -> None:
    request = httpx.Request("GET", "https://api.example.com:8443/v1?q=1", headers={"X-A": "1"})
    target = check_url(request.url, "", resolver=stub({"api.example.com": ["93.184.216.34"]}))
    pinned = _pinned(request, target)
    assert str(pinned.url) == "https://93.184.216.34:8443/v1?q=1"
    assert pinned.headers["host"] == "api.example.com:8443" and pinned.headers["x-a"] == "1"
    assert pinned.extensions["sni_hostname"] == "api.example.com"


# ---------------------------------------------------------------------------------------------------
# Real requests on loopback: redirects and rebinding


@pytest.fixture
def servers() -> Iterator[tuple[FakeProvider, FakeProvider]]:
    """A public-facing server (127.0.0.1) and an "internal" one (127.0.0.2) it may redirect to."""
    with FakeProvider() as outside, FakeProvider(host="127.0.0.2") as inside:
        yield outside, inside


def test_redirect_to_forbidden_address_is_refused(servers: tuple[FakeProvider, FakeProvider]) -> None:
    outside, inside = servers
    url = f"{outside.url}/redirect?to={inside.url}/secret"
    # Without the guard the redirect reaches the internal server: the test below is about a real hop.
    assert httpx.get(url, follow_redirects=True).json()["path"] == "/secret"
    assert inside.count() == 1
    inside.reset()
    # The first hop is allowed, the second is not.
    with guarded_client("127.0.0.1") as client, \
            pytest.raises(TargetRefused, match=r"refused: 127\.0\.0\.2 is a loopback address"):
        client.get(url)
    assert outside.count("/redirect") == 2 and inside.count() == 0
    with guarded_client("127.0.0.0/8") as client:  # allowlisting the second hop lets it through
        assert client.get(url).json()["path"] == "/secret"
    assert inside.count() == 1


def test_redirect_refused_async(servers: tuple[FakeProvider, FakeProvider]) -> None:
    outside, inside = servers

    async def run() -> None:
        async with guarded_async_client(["127.0.0.1"]) as client:
            async with client.stream("GET", f"{outside.url}/plain") as response:
                assert await aread_bounded(response, 5) == (b'{"pat', True)
            with pytest.raises(TargetRefused):
                await client.get(f"{outside.url}/redirect?to={inside.url}/secret")

    asyncio.run(run())
    assert inside.count() == 0


def test_async_keep_alive_is_per_name_and_every_request_is_checked(servers: tuple[FakeProvider, FakeProvider]) -> None:
    """The async client reuses a connection only for the name it was opened for, and a pooled connection
    never spares a request its check: a name rebound to a private address is refused, not sent."""
    outside, _ = servers
    answers = {"a.test": ["127.0.0.1"], "b.test": ["127.0.0.1"]}

    async def run() -> list[int]:
        async with guarded_async_client("127.0.0.1", resolver=lambda host, port: answers[host]) as client:
            peers = [(await client.get(f"http://{host}:{outside.port}/peer")).json()["peer"]
                     for host in ("a.test", "a.test", "b.test", "b.test")]
            answers["a.test"] = ["10.0.0.5"]
            with pytest.raises(TargetRefused, match=r"10\.0\.0\.5 \(host a\.test\) is a private address"):
                await client.get(f"http://a.test:{outside.port}/peer")
            return peers

    peers = asyncio.run(run())
    assert peers[0] == peers[1] and peers[2] == peers[3] and peers[0] != peers[2], peers
    assert outside.count("/peer") == 4


@pytest.mark.parametrize("chunked", [False, True])
def test_async_body_limit_reads_no_more_than_it_keeps(servers: tuple[FakeProvider, FakeProvider],
                                                      chunked: bool) -> None:
    """A 50 MB answer to a request limited to 1,000 bytes: 1,000 bytes kept, the cut reported, and the
    transport never holds the rest (peak Python memory well under the body's size). HEAD answers, whose
    Content-Length describes no body, do not hang the connection."""
    outside, _ = servers

    async def run() -> tuple[int, bool, int]:
        async with guarded_async_client(["127.0.0.1"]) as client:
            tracemalloc.start()
            try:
                async with client.stream("GET", f"{outside.url}/big?bytes=50000000&chunked={int(chunked)}",
                                         extensions={MAX_BODY: 1000}) as response:
                    body, cut = await aread_bounded(response, 1000)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            head = await client.head(f"{outside.url}/x", timeout=5.0)
            assert head.status_code == 501 and head.content == b""   # the fake has no HEAD: an error, no body
            assert (await client.get(f"{outside.url}/x")).json()["path"] == "/x"
            return len(body), cut, peak

    size, cut, peak = asyncio.run(run())
    assert (size, cut) == (1000, True)
    assert peak < 5_000_000, peak


def test_connects_to_the_checked_address_only(servers: tuple[FakeProvider, FakeProvider]) -> None:
    """DNS rebinding: the name is resolved once per hop and the connection goes to that answer.

    The stub answers 127.0.0.1 first and a private address afterwards, like a rebinding DNS server. The
    name does not exist in real DNS, so the request can only succeed if the connection used the checked
    address; a relative redirect then makes a second hop on the same name, whose rebound answer is refused.
    """
    outside, _ = servers
    answers = iter([["127.0.0.1"], ["10.0.0.5"]])
    calls = []

    def rebinding(host: str, port: int) -> list[str]:
        calls.append(host)
        return next(answers)

    name = f"rebind.test:{outside.port}"
    with guarded_client("127.0.0.1", resolver=rebinding) as client:
        response = client.get(f"http://{name}/first")
        assert response.json() == {"path": "/first", "host": name}
        assert calls == ["rebind.test"]
        with pytest.raises(TargetRefused, match=r"10\.0\.0\.5 \(host rebind\.test\) is a private address"):
            client.get(f"http://{name}/redirect?to=/second")
    assert outside.count("/second") == 0


def test_read_bounded(servers: tuple[FakeProvider, FakeProvider]) -> None:
    outside, _ = servers
    with guarded_client("127.0.0.1") as client:
        with client.stream("GET", f"{outside.url}/some/long/path/to/make/the/body/longer") as response:
            body, cut = read_bounded(response, 10)
        assert (len(body), cut) == (10, True)
        with client.stream("GET", f"{outside.url}/x") as response:
            body, cut = read_bounded(response, 10_000)
        assert cut is False and body.startswith(b'{"path":"/x"')
