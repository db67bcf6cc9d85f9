"""Reading from hosts we do not control, over HTTP(S): time limits, an address policy, and one-line reasons.

Installed into fsspec's HTTP filesystem (`install`), so every HTTP request the project makes through fsspec (a
manifest, an image, a file's stamp, a checkpoint) gets:

- **time limits**: connecting (`VISION_BRIDGE_HTTP_CONNECT_TIMEOUT`, 10 s), silence between bytes
  (`VISION_BRIDGE_HTTP_READ_TIMEOUT`, 20 s) and one request from start to end (`VISION_BRIDGE_HTTP_TOTAL_TIMEOUT`,
  120 s: a host that sends a byte every few seconds fails too). A host that accepts the connection and never
  answers fails in the read limit; aiohttp's own default is no limit at all.
- **an address policy** against requests being steered inside the network: a redirect may not lead to a more
  internal class of address than the URL it came from (public < private < loopback), and link-local addresses
  (169.254.0.0/16, fe80::/10, and the metadata addresses 100.64.0.0/10 and fd00:ec2::254) are refused always, unless
  `VISION_BRIDGE_ALLOW_LINK_LOCAL=1`. A URL the user gave in a private range may redirect within it. Host names are
  resolved for the check; a name that resolves differently at connection time (DNS rebinding) is not covered.

`describe` turns the exceptions of aiohttp, fsspec and the OS into one line that names what happened.
The ground floor: imports nothing of the library.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from urllib.parse import urljoin, urlsplit

CONNECT_TIMEOUT_SETTING = "VISION_BRIDGE_HTTP_CONNECT_TIMEOUT"
READ_TIMEOUT_SETTING = "VISION_BRIDGE_HTTP_READ_TIMEOUT"
TOTAL_TIMEOUT_SETTING = "VISION_BRIDGE_HTTP_TOTAL_TIMEOUT"
ALLOW_LINK_LOCAL_SETTING = "VISION_BRIDGE_ALLOW_LINK_LOCAL"
DEFAULT_TIMEOUTS = {"connect": 10.0, "read": 20.0, "total": 120.0}
ADDRESS_CLASSES = ("public", "private", "loopback", "link-local")  # from outside in


class PrivateAddressError(PermissionError):
    """A request the address policy refuses (a redirect inward, or a link-local address)."""


class IncompleteReadError(OSError):
    """A body that ended before its end: a cut stream, or fewer bytes than the server stated."""


def timeouts() -> dict[str, float]:
    """The limits in seconds, from the environment (read at each use, so a test or a worker can set them)."""
    values = {}
    for name, setting in (("connect", CONNECT_TIMEOUT_SETTING), ("read", READ_TIMEOUT_SETTING),
                          ("total", TOTAL_TIMEOUT_SETTING)):
        raw = os.environ.get(setting)
        try:
            value = float(raw) if raw else DEFAULT_TIMEOUTS[name]
        except ValueError:
            raise ValueError(f"{setting} must be a number of seconds; got {raw!r}") from None
        if not value > 0:
            raise ValueError(f"{setting} must be > 0 seconds; got {raw!r}")
        values[name] = value
    return values


def client_timeout():
    import aiohttp

    limits = timeouts()
    return aiohttp.ClientTimeout(total=limits["total"], connect=limits["connect"], sock_connect=limits["connect"],
                                 sock_read=limits["read"])


# cloud metadata services outside 169.254/16: refused like link-local (Alibaba Cloud, AWS over IPv6), and the
# carrier-grade NAT range they live in
METADATA_NETWORKS = tuple(ipaddress.ip_network(n) for n in ("100.64.0.0/10", "fd00:ec2::254/128"))


def address_class(address: str) -> str:
    """"public", "private", "loopback" or "link-local" for an IP address (cloud metadata addresses count as
    link-local; the unspecified address, which reaches this machine, as loopback)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if getattr(ip, "ipv4_mapped", None):
        ip = ip.ipv4_mapped
    if ip.is_loopback or ip.is_unspecified:
        return "loopback"
    if ip.is_link_local or any(ip in network for network in METADATA_NETWORKS if network.version == ip.version):
        return "link-local"
    if ip.is_private or ip.is_reserved or ip.is_multicast:
        return "private"
    return "public"


async def host_class(host: str) -> str:
    """The most internal class among the addresses `host` resolves to (an IP literal is its own)."""
    try:
        return address_class(host.strip("[]"))
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return "public"  # unresolvable: the request itself fails with the DNS reason
    classes = {address_class(info[4][0]) for info in infos}
    return max(classes, key=ADDRESS_CLASSES.index) if classes else "public"


def _link_local_allowed() -> bool:
    return os.environ.get(ALLOW_LINK_LOCAL_SETTING, "") in ("1", "true", "yes")


async def _on_request_start(session, context, params) -> None:
    host = params.url.host or ""
    if not _link_local_allowed() and await host_class(host) == "link-local":
        raise PrivateAddressError(f"{params.url}: refused: {host} is a link-local address (where cloud metadata "
                                  f"services answer); set {ALLOW_LINK_LOCAL_SETTING}=1 to allow it")


async def _on_request_redirect(session, context, params) -> None:
    # aiohttp follows `Location`, else `URI` (client.py): check the one it will follow
    location = params.response.headers.get("Location") or params.response.headers.get("URI") or ""
    target = urljoin(str(params.url), location)
    before, after = await host_class(params.url.host or ""), await host_class(urlsplit(target).hostname or "")
    if after == "link-local" and not _link_local_allowed():
        raise PrivateAddressError(f"{params.url}: refused a redirect to {target}: a link-local address (where cloud "
                                  f"metadata services answer); set {ALLOW_LINK_LOCAL_SETTING}=1 to allow it")
    if ADDRESS_CLASSES.index(after) > ADDRESS_CLASSES.index(before):
        raise PrivateAddressError(f"{params.url}: refused a redirect to {target}: from a {before} address to a {after} "
                                  "one (a redirect may not lead further inside the network than the URL given)")


def trace_config():
    import aiohttp

    config = aiohttp.TraceConfig()
    config.on_request_start.append(_on_request_start)
    config.on_request_redirect.append(_on_request_redirect)
    return config


async def get_client(**kwargs):
    """fsspec's `get_client`: an aiohttp session with the time limits and the address policy."""
    import aiohttp

    kwargs.setdefault("timeout", client_timeout())
    kwargs["trace_configs"] = [*kwargs.get("trace_configs", []), trace_config()]
    return aiohttp.ClientSession(**kwargs)


def install() -> None:
    """Makes fsspec's HTTP filesystems (http:// and https://) use `get_client` unless a caller chose another."""
    import fsspec

    for protocol in ("http", "https"):
        fsspec.config.conf.setdefault(protocol, {}).setdefault("get_client", get_client)


def describe(uri: str, error: BaseException) -> str:
    """One line naming the URL and what happened: refused, unreachable, DNS, TLS, timeout, HTTP status, cut short."""
    try:
        import aiohttp
    except ImportError:  # pragma: no cover - aiohttp comes with fsspec's HTTP and s3fs
        aiohttp = None
    # fsspec wraps an HTTP lookup's failure in FileNotFoundError, and aiohttp's timeouts in its FSTimeoutError: the
    # cause says what happened
    while error.__cause__ is not None and (isinstance(error, FileNotFoundError)
                                           or type(error).__name__ == "FSTimeoutError"):
        error = error.__cause__
    name = type(error).__name__
    if isinstance(error, (PrivateAddressError, IncompleteReadError)):
        return str(error) if str(error).startswith(uri) else f"{uri}: {error}"
    if aiohttp is not None:
        host = urlsplit(uri).netloc
        if isinstance(error, aiohttp.ClientConnectorDNSError):
            return f"{uri}: the host name {urlsplit(uri).hostname!r} could not be resolved (DNS)"
        if isinstance(error, (aiohttp.ClientConnectorCertificateError, aiohttp.ClientConnectorSSLError,
                              aiohttp.ClientSSLError)):
            return f"{uri}: TLS failure talking to {host} ({error})"
        if isinstance(error, aiohttp.ConnectionTimeoutError):
            return f"{uri}: no connection to {host} within {timeouts()['connect']:g} s"
        if isinstance(error, aiohttp.SocketTimeoutError):
            return f"{uri}: {host} sent nothing for {timeouts()['read']:g} s (read time limit)"
        if isinstance(error, aiohttp.ClientConnectorError):
            reason = "connection refused" if isinstance(error.os_error, ConnectionRefusedError) else (
                error.os_error.strerror or str(error.os_error)) if error.os_error else str(error)
            return f"{uri}: cannot connect to {host} ({reason})"
        if isinstance(error, aiohttp.ClientResponseError):
            return f"{uri}: HTTP {error.status} {error.message}".rstrip()
        if isinstance(error, aiohttp.ClientPayloadError):
            return f"{uri}: the server cut the response short ({error})"
        if isinstance(error, aiohttp.ServerDisconnectedError):
            return f"{uri}: {host} closed the connection before answering"
    if isinstance(error, (asyncio.TimeoutError, TimeoutError)):
        return f"{uri}: no complete answer within {timeouts()['total']:g} s (total time limit)"
    if isinstance(error, FileNotFoundError):
        return f"{uri}: not found" + (" (HTTP 404)" if uri.startswith(("http://", "https://")) else "")
    if isinstance(error, PermissionError):
        return f"{uri}: access denied ({error})"
    text = str(error).splitlines()[0] if str(error) else name
    return f"{uri}: {name}: {text}"[:300]
