"""Downloads from hostile URLs (chat attachments), for every service that fetches one.

Every URL is checked before anything is fetched: https only, an allowlisted host on its default port, no
credentials in the URL. The addresses a host resolves to are checked inside the HTTP client's own resolver
(so the address checked is the address connected to: no DNS rebinding between check and connect), and every
redirect hop is checked again, up to a few hops. Bodies are read with a byte cap whatever Content-Length says.
Each refusal is an IngestError whose message names the file by its position ("file 2") and the host, never by
the sender's file name or the URL's path (those are the sender's text, posted back into a channel), and the limit.
"""

from __future__ import annotations

import ipaddress
import socket

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from schemas.limits import IngestLimits, MiB

REDIRECT_STATUSES = (301, 302, 303, 307, 308)


class IngestError(ValueError):
    """A file sent for training was refused; the message says which file (by position) and why, for its sender."""


class TooLarge(IngestError):
    pass


# ------------------------------------------------------------------------------------------------ addresses


def check_address(address: str, host: str, limits: IngestLimits) -> None:
    """Refuse addresses that reach inside the network: private, loopback, link-local, multicast, reserved."""
    if limits.allow_private_addresses:
        return
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind in ("unspecified", "loopback", "link_local", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{kind}"):
            raise IngestError(f"{host} resolves to {ip}, a {kind.replace('_', '-')} address: refusing to download")
    if not ip.is_global:
        raise IngestError(f"{host} resolves to {ip}, which is not a public address: refusing to download")


def check_url(url: str, limits: IngestLimits) -> URL:
    """The URL if the policy allows fetching it, else IngestError saying why. No network."""
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        raise IngestError("the link is not a URL") from None
    host = (parsed.host or "").lower().rstrip(".")
    where = (host if parsed.explicit_port is None else f"{host}:{parsed.explicit_port}") or "the link"
    scheme = (parsed.scheme or "").lower()
    if scheme != "https" and (limits.require_https or scheme != "http"):
        raise IngestError(f"{shorten(where)}: only https downloads are allowed")
    if parsed.user is not None or parsed.password is not None:
        raise IngestError(f"{shorten(where)}: URLs with credentials are not allowed")
    if not host:
        raise IngestError("the link has no host")
    if where not in limits.allowed_hosts:
        allowed = ", ".join(limits.allowed_hosts)
        raise IngestError(f"{shorten(where)}: downloads only come from {allowed}; attach the images to the message")
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return parsed
    # aiohttp skips the resolver for IP literals, so they are checked here.
    check_address(host.strip("[]"), host, limits)
    return parsed


class CheckedResolver(AbstractResolver):
    """Resolves with the default resolver, then refuses the whole answer if any address is not public."""

    def __init__(self, limits: IngestLimits):
        self.limits = limits
        self._inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            check_address(result["host"], host, self.limits)
        return results

    async def close(self) -> None:
        await self._inner.close()


# ------------------------------------------------------------------------------------------------ downloads


def shorten(text: str, max_chars: int = 80) -> str:
    # Discord's signed query strings are noise to a person and should not be echoed back.
    text = text.split("?", 1)[0]
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def file_name(url: URL | str) -> str:
    return shorten(URL(str(url)).name or "file", 60)


def session(limits: IngestLimits) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(resolver=CheckedResolver(limits), limit=4)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=limits.timeout_s),
        auto_decompress=False,  # the byte cap must count what the server sends, not what it inflates to
        trust_env=False,  # no proxy from the environment: the address check must see the real peer
    )


async def download(http: aiohttp.ClientSession, url: str, limits: IngestLimits, max_bytes: int,
                   slack_token: str | None = None) -> bytes:
    """The body of `url`, following at most `limits.max_redirects` redirects, each hop checked like the first."""
    current = check_url(url, limits)
    for _hop in range(limits.max_redirects + 1):
        headers = {"Accept-Encoding": "identity"}
        if slack_token and _is_slack_file_host(current, limits):
            # Only Slack's own file host ever sees the bot token, never a host a redirect points at.
            headers["Authorization"] = f"Bearer {slack_token}"
        try:
            async with http.get(current, headers=headers, allow_redirects=False) as resp:
                if resp.status in REDIRECT_STATUSES and "Location" in resp.headers:
                    current = check_url(str(current.join(URL(resp.headers["Location"]))), limits)
                    continue
                if resp.status != 200:
                    raise IngestError(f"{shorten(current.host or '')}: the server answered HTTP {resp.status}")
                if resp.content_length is not None and resp.content_length > max_bytes:
                    raise TooLarge(f"the file is {resp.content_length} bytes; {bytes_limit(max_bytes)}")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > max_bytes:
                        raise TooLarge(f"the file is over {max_bytes} bytes; {bytes_limit(max_bytes)}")
                return bytes(body)
        except IngestError:
            raise  # the resolver's refusal passes through aiohttp unchanged
        except aiohttp.ClientConnectorError as exc:
            raise IngestError(f"cannot connect to {shorten(current.host or '')} ({exc.os_error})") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise IngestError(f"{shorten(current.host or '')}: download failed ({type(exc).__name__})") from None
    raise IngestError(f"more than {limits.max_redirects} redirects")


def _is_slack_file_host(url: URL, limits: IngestLimits) -> bool:
    host = (url.host or "").lower().rstrip(".")
    return host in limits.slack_file_hosts or f"{host}:{url.explicit_port}" in limits.slack_file_hosts


def bytes_limit(max_bytes: int) -> str:
    return f"the limit is {max_bytes} bytes ({max_bytes / MiB:.1f} MiB)"


async def download_all(urls: list[str], limits: IngestLimits, slack_token: str | None = None) -> list[tuple[str, bytes]]:
    """(name, bytes) of every URL, in order; all URLs are checked before the first byte is fetched. A refusal
    names the file by its position: "file 2: ..."."""
    if len(urls) > limits.max_images:
        raise IngestError(f"{len(urls)} files sent; at most {limits.max_images} images per training")
    for n, url in enumerate(urls, 1):
        try:
            check_url(url, limits)
        except IngestError as exc:
            raise IngestError(f"file {n}: {exc}") from None
    files: list[tuple[str, bytes]] = []
    total = 0
    async with session(limits) as http:
        for n, url in enumerate(urls, 1):
            left = limits.max_total_bytes - total
            try:
                data = await download(http, url, limits, min(limits.max_file_bytes, left), slack_token)
            except TooLarge as exc:
                if left < limits.max_file_bytes:
                    raise IngestError(
                        f"the files add up to more than {limits.max_total_bytes} bytes; send fewer or smaller images"
                    ) from None
                raise TooLarge(f"file {n}: {exc}") from None
            except IngestError as exc:
                raise IngestError(f"file {n}: {exc}") from None
            total += len(data)
            files.append((file_name(url), data))
    return files
