"""One delivery attempt: POST the signed body, read only the status line's code, follow nothing.

`AddressGuard` decides which URLs may be called. On AWS (`AddressGuard.public()`): https only, and the
host is resolved here, every address it resolves to must be public (no private, loopback, link-local
(the instance metadata service), ULA, CGNAT, multicast, reserved or unspecified address, also inside
IPv4-mapped IPv6), and the connection goes to the address that was checked (with the host name for
TLS SNI, certificate check and the Host header), so a second DNS answer cannot move it elsewhere.
Locally (`AddressGuard.local()`) http and private addresses are allowed: receivers often run on the
same machine.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

Resolve = Callable[[str, int], list[str]]

USER_AGENT = "batch-api-webhooks/1"


class RefusedUrl(ValueError):
    """The guard does not let the delivery call this URL."""


@dataclass(frozen=True)
class Attempt:
    """What one attempt got: an HTTP status, or an error (no answer, or a refused URL)."""

    status_code: int | None
    error: str | None = None

    def describe(self) -> str:
        return f"HTTP {self.status_code}" if self.status_code is not None else f"{self.error}"


# one attempt: (url, body, headers) -> what it got (`WebhookSender.post`, or a test's)
Post = Callable[[str, bytes, Mapping[str, str]], Attempt]


def resolve_host(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (A and AAAA), in the resolver's order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def is_public_address(address: str) -> bool:
    """True for a globally routable unicast address; False for anything private, local or special."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is not None:
            return is_public_address(str(embedded))
        if ip.teredo is not None:
            return False
    special = (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local)
    )
    return ip.is_global and not special  # is_global leaves out CGNAT (100.64.0.0/10) too


@dataclass(frozen=True)
class AddressGuard:
    allow_http: bool
    allow_private: bool
    resolve: Resolve = resolve_host

    @classmethod
    def public(cls, resolve: Resolve = resolve_host) -> AddressGuard:
        """AWS: https only, public addresses only."""
        return cls(allow_http=False, allow_private=False, resolve=resolve)

    @classmethod
    def local(cls, resolve: Resolve = resolve_host) -> AddressGuard:
        """The local server: http and private addresses too."""
        return cls(allow_http=True, allow_private=True, resolve=resolve)

    def check_url(self, url: str) -> None:
        """Refuse a URL this guard never calls, whatever its host resolves to (config time)."""
        parts = urlsplit(url)
        allowed = ("https", "http") if self.allow_http else ("https",)
        if parts.scheme not in allowed:
            raise RefusedUrl(f"only {' or '.join(allowed)} URLs are allowed, not {parts.scheme or 'none'!r}")
        if not parts.hostname:
            raise RefusedUrl("the URL has no host")
        if parts.username or parts.password:
            raise RefusedUrl("the URL must not carry credentials")
        if not self.allow_private:
            try:
                literal = ipaddress.ip_address(parts.hostname)
            except ValueError:
                return
            if not is_public_address(str(literal)):
                raise RefusedUrl(f"{parts.hostname} is not a public address")

    def address_for(self, host: str, port: int) -> str:
        """The checked address to connect to: every address of `host` must pass, the first is used."""
        addresses = self.resolve(host, port)
        if not addresses:
            raise RefusedUrl(f"{host} resolves to no address")
        if not self.allow_private:
            refused = [a for a in addresses if not is_public_address(a)]
            if refused:
                raise RefusedUrl(f"{host} resolves to a non-public address ({refused[0]})")
        return addresses[0]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP to `address`, with `host` in the Host header."""

    def __init__(self, host: str, port: int, *, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """TLS to `address`, verifying the certificate for `host` (SNI too)."""

    def __init__(
        self, host: str, port: int, *, address: str, timeout: float, context: ssl.SSLContext
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._address = address
        self._tls = context

    def connect(self) -> None:
        raw = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._tls.wrap_socket(raw, server_hostname=self.host)


def _cut_off(connection: http.client.HTTPConnection, cut: threading.Event) -> None:
    """End an attempt whose time is up: shut its socket down, which wakes a read blocked on it."""
    cut.set()
    sock = connection.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


@dataclass(frozen=True)
class WebhookSender:
    """Sends one attempt. http.client never follows a redirect: a 3xx is just a failed attempt."""

    guard: AddressGuard
    timeout_seconds: float
    tls: ssl.SSLContext | None = None

    def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> Attempt:
        try:
            self.guard.check_url(url)
            parts = urlsplit(url)
            host = parts.hostname or ""
            port = parts.port or (443 if parts.scheme == "https" else 80)
            address = self.guard.address_for(host, port)
        except (RefusedUrl, OSError, ValueError) as exc:
            return Attempt(None, f"refused: {exc}" if isinstance(exc, RefusedUrl) else f"no address: {exc}")
        connection: http.client.HTTPConnection
        if parts.scheme == "https":
            connection = _PinnedHTTPSConnection(
                host,
                port,
                address=address,
                timeout=self.timeout_seconds,
                context=self.tls or ssl.create_default_context(),
            )
        else:
            connection = _PinnedHTTPConnection(host, port, address=address, timeout=self.timeout_seconds)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        # `timeout_seconds` bounds the whole attempt, not each socket read: a receiver that answers a
        # byte at a time is cut off when the time is up (the socket's own timeout bounds the connect)
        cut = threading.Event()
        watchdog = threading.Timer(self.timeout_seconds, _cut_off, args=(connection, cut))
        watchdog.daemon = True
        watchdog.start()
        try:
            connection.request(
                "POST",
                target,
                body=body,
                headers={**headers, "user-agent": USER_AGENT, "content-length": str(len(body))},
            )
            status = connection.getresponse().status  # the body is never read
        except TimeoutError:
            return Attempt(None, "timeout")
        except (OSError, http.client.HTTPException) as exc:
            if cut.is_set():
                return Attempt(None, "timeout")
            return Attempt(None, f"{type(exc).__name__}: {exc}")
        finally:
            watchdog.cancel()
            connection.close()
        if cut.is_set():  # the status line came, but not in time: a receiver too slow to count on
            return Attempt(None, "timeout")
        return Attempt(status)
