"""Training images from chat attachments, hostile by default.

Every URL is checked before anything is fetched: https only, an allowlisted host on its default port, no
credentials in the URL. The addresses a host resolves to are checked inside the HTTP client's own resolver
(so the address checked is the address connected to: no DNS rebinding between check and connect), and every
redirect hop is checked again, up to a few hops. Bodies are read with a byte cap whatever Content-Length says.
A zip is inspected from its directory before any member is read: member count, total uncompressed size,
compression ratio, absolute paths, `..`, symlinks, encryption and nested archives. Images are PNG, JPEG or
WebP only, and their pixel count is checked from the header before Pillow decodes them.

Each rejection is an IngestError whose message names the file and the limit, for the person who sent it.
No torch here: the bots may pre-check URLs with `check_url`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import ipaddress
import json
import re
import socket
import stat
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field
from yarl import URL

from schemas.messages import MAX_PROMPT_CHARS
from trainer.errors import TrainerError

MiB = 1024 * 1024
DISCORD_HOSTS = ("cdn.discordapp.com", "media.discordapp.net")
SLACK_HOSTS = ("files.slack.com",)
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
CAPTION_FILES = ("captions.jsonl", "captions.csv", "metadata.jsonl", "metadata.csv")
ARCHIVE_SUFFIXES = (".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar", ".zst", ".jar")
# Leading bytes of archive formats, for members whose name does not give them away.
ARCHIVE_MAGIC = {
    b"PK\x03\x04": "zip",
    b"PK\x05\x06": "zip",
    b"\x1f\x8b": "gzip",
    b"7z\xbc\xaf\x27\x1c": "7z",
    b"Rar!": "rar",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
}
REDIRECT_STATUSES = (301, 302, 303, 307, 308)


class IngestError(TrainerError):
    """A training input was refused; the message says which file and why."""


class TooLarge(IngestError):
    pass


class IngestLimits(BaseModel):
    """What a `/skill-train` may send. `allowed_hosts`, `require_https` and `allow_private_addresses` are loosened
    only by tests, which serve images from a local server."""

    max_images: int = Field(50, ge=1, le=200)
    max_file_bytes: int = Field(10 * MiB, gt=0)
    max_total_bytes: int = Field(100 * MiB, gt=0)
    max_pixels: int = Field(4096 * 4096, gt=0, description="width x height, checked before decoding")
    max_zip_members: int = Field(200, ge=1)
    max_zip_total_bytes: int = Field(200 * MiB, gt=0, description="sum of the members' uncompressed sizes")
    max_zip_ratio: float = Field(50.0, gt=1.0, description="uncompressed / compressed size of any one member")
    max_redirects: int = Field(3, ge=0, le=10)
    timeout_s: float = Field(30.0, gt=0)
    allowed_hosts: tuple[str, ...] = Field(DISCORD_HOSTS + SLACK_HOSTS, description="host, or host:port")
    # Read when the limits are made (not at import), so a test that swaps SLACK_HOSTS sees its own.
    slack_file_hosts: tuple[str, ...] = Field(
        default_factory=lambda: SLACK_HOSTS,
        description="where the Slack bot token is sent: host (any port) or host:port; only ever to an allowed host",
    )
    require_https: bool = True
    allow_private_addresses: bool = False


@dataclass(frozen=True)
class Example:
    """One training image, decoded to RGB, with its caption."""

    name: str
    image: Image.Image
    sha256: str
    caption: str


def dataset_sha256(examples: list[Example]) -> str:
    """Names the training data by content: the same images with the same captions hash alike in any order."""
    items = sorted((e.sha256, e.caption) for e in examples)
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()


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
        raise IngestError(f"{_shorten(url)} is not a URL") from None
    scheme = (parsed.scheme or "").lower()
    if scheme != "https" and (limits.require_https or scheme != "http"):
        raise IngestError(f"{_shorten(url)}: only https downloads are allowed")
    if parsed.user is not None or parsed.password is not None:
        raise IngestError(f"{_shorten(url)}: URLs with credentials are not allowed")
    host = (parsed.host or "").lower().rstrip(".")
    if not host:
        raise IngestError(f"{_shorten(url)} has no host")
    where = host if parsed.explicit_port is None else f"{host}:{parsed.explicit_port}"
    if where not in limits.allowed_hosts:
        allowed = ", ".join(limits.allowed_hosts)
        raise IngestError(f"{_shorten(url)}: downloads only come from {allowed}; attach the images to the message")
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


def _shorten(text: str, max_chars: int = 80) -> str:
    # Discord's signed query strings are noise to a person and should not be echoed back.
    text = text.split("?", 1)[0]
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def file_name(url: URL | str) -> str:
    return _shorten(URL(str(url)).name or "file", 60)


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
                    raise IngestError(f"{file_name(current)}: the server answered HTTP {resp.status}")
                if resp.content_length is not None and resp.content_length > max_bytes:
                    raise TooLarge(f"{file_name(current)} is {resp.content_length} bytes; {_bytes_limit(max_bytes)}")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > max_bytes:
                        raise TooLarge(f"{file_name(current)} is over {max_bytes} bytes; {_bytes_limit(max_bytes)}")
                return bytes(body)
        except IngestError:
            raise  # the resolver's refusal passes through aiohttp unchanged
        except aiohttp.ClientConnectorError as exc:
            raise IngestError(f"{file_name(current)}: cannot connect to {current.host} ({exc.os_error})") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise IngestError(f"{file_name(current)}: download failed ({type(exc).__name__})") from None
    raise IngestError(f"{file_name(url)}: more than {limits.max_redirects} redirects")


def _is_slack_file_host(url: URL, limits: IngestLimits) -> bool:
    host = (url.host or "").lower().rstrip(".")
    return host in limits.slack_file_hosts or f"{host}:{url.explicit_port}" in limits.slack_file_hosts


def _bytes_limit(max_bytes: int) -> str:
    return f"the limit is {max_bytes} bytes ({max_bytes / MiB:.1f} MiB)"


async def download_all(urls: list[str], limits: IngestLimits, slack_token: str | None = None) -> list[tuple[str, bytes]]:
    """(name, bytes) of every URL, in order; all URLs are checked before the first byte is fetched."""
    if len(urls) > limits.max_images:
        raise IngestError(f"{len(urls)} files sent; at most {limits.max_images} images per training")
    for url in urls:
        check_url(url, limits)
    files: list[tuple[str, bytes]] = []
    total = 0
    async with session(limits) as http:
        for url in urls:
            left = limits.max_total_bytes - total
            try:
                data = await download(http, url, limits, min(limits.max_file_bytes, left), slack_token)
            except TooLarge:
                if left < limits.max_file_bytes:
                    raise IngestError(
                        f"the files add up to more than {limits.max_total_bytes} bytes; send fewer or smaller images"
                    ) from None
                raise
            total += len(data)
            files.append((file_name(url), data))
    return files


# ----------------------------------------------------------------------------------------------------- zips


def is_zip(data: bytes) -> bool:
    return data[:4] in (b"PK\x03\x04", b"PK\x05\x06")


def _archive_kind(data: bytes) -> str | None:
    for magic, kind in ARCHIVE_MAGIC.items():
        if data.startswith(magic):
            return kind
    if data[257:262] == b"ustar":
        return "tar"
    return None


def _skipped(path: PurePosixPath) -> bool:
    # macOS Finder's "Compress" adds resource forks and folder metadata that are not the sender's images.
    return path.parts[0] == "__MACOSX" or path.name == ".DS_Store"


def unpack_zip(name: str, data: bytes, limits: IngestLimits) -> tuple[list[tuple[str, bytes]], tuple[str, bytes] | None]:
    """The zip's image members as (path, bytes) and its captions file, if any, after every check."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise IngestError(f"{name} is not a readable zip ({exc})") from None
    infos = archive.infolist()
    if len(infos) > limits.max_zip_members:
        raise IngestError(f"{name} has {len(infos)} entries; at most {limits.max_zip_members} are allowed")
    total = sum(info.file_size for info in infos)
    if total > limits.max_zip_total_bytes:
        raise IngestError(f"{name} unpacks to {total} bytes; at most {limits.max_zip_total_bytes} are allowed")
    images: list[tuple[str, bytes]] = []
    captions: tuple[str, bytes] | None = None
    for info in infos:
        member = info.filename.replace("\\", "/")
        where = f"{name}: {_shorten(member, 60)!r}"
        if member.startswith("/") or re.match(r"^[A-Za-z]:", member):
            raise IngestError(f"{where} has an absolute path")
        path = PurePosixPath(member)
        if ".." in path.parts:
            raise IngestError(f"{where} climbs out of the zip with '..'")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise IngestError(f"{where} is a symbolic link")
        if info.is_dir() or _skipped(path):
            continue
        if info.flag_bits & 0x1:
            raise IngestError(f"{where} is encrypted")
        if info.file_size > limits.max_file_bytes:
            raise IngestError(f"{where} is {info.file_size} bytes; {_bytes_limit(limits.max_file_bytes)}")
        ratio = info.file_size / max(info.compress_size, 1)
        if ratio > limits.max_zip_ratio:
            raise IngestError(f"{where} is compressed {ratio:.0f}:1; at most {limits.max_zip_ratio:.0f}:1 is allowed")
        if path.suffix.lower() in ARCHIVE_SUFFIXES:
            raise IngestError(f"{where} is an archive inside the zip; send the images themselves")
        try:
            # zipfile never yields more than the header's file_size, which the checks above bounded.
            body = archive.read(info)
        except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError) as exc:
            raise IngestError(f"{where} cannot be read ({exc})") from None
        kind = _archive_kind(body)
        if kind:
            raise IngestError(f"{where} is a {kind} archive inside the zip; send the images themselves")
        if path.name.lower() in CAPTION_FILES:
            if captions is not None:
                raise IngestError(f"{name} has two captions files ({captions[0]} and {member}); keep one")
            captions = (member, body)
        else:
            images.append((member, body))
    return images, captions


def parse_captions(name: str, data: bytes, known: set[str]) -> dict[str, str]:
    """file name -> caption, from a jsonl ({"file_name"|"file", "text"|"caption"}) or csv (same columns) file."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise IngestError(f"{name} is not UTF-8 text") from None
    rows: list[tuple[int, dict]] = []
    if name.lower().endswith(".jsonl"):
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise IngestError(f"{name} line {n} is not JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise IngestError(f"{name} line {n} is not a JSON object")
                rows.append((n, row))
    else:
        try:
            rows = list(enumerate(csv.DictReader(io.StringIO(text)), 2))
        except csv.Error as exc:
            raise IngestError(f"{name} is not valid CSV ({exc})") from None
    out: dict[str, str] = {}
    for n, row in rows:
        file = row.get("file_name", row.get("file"))
        caption = row.get("text", row.get("caption"))
        if not isinstance(file, str) or not isinstance(caption, str):
            raise IngestError(f"{name} line {n} needs a file_name (or file) and a text (or caption)")
        if len(caption) > MAX_PROMPT_CHARS:
            raise IngestError(f"{name} line {n}: the caption is {len(caption)} characters; at most {MAX_PROMPT_CHARS}")
        match = [k for k in known if k == file or PurePosixPath(k).name == file]
        if len(match) != 1:
            why = "is not in the zip" if not match else "matches more than one image"
            raise IngestError(f"{name} line {n} names {file!r}, which {why}")
        out[match[0]] = caption.strip()
    return out


# --------------------------------------------------------------------------------------------------- images


def open_image(name: str, data: bytes, limits: IngestLimits) -> Image.Image:
    """The image as RGB, if it is a PNG, JPEG or WebP within the pixel limit."""
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:
        raise IngestError(f"{name} declares an enormous size; at most {limits.max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise IngestError(f"{name} is not a PNG, JPEG or WebP image") from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise IngestError(f"{name} is {width}x{height} = {width * height} pixels; at most {limits.max_pixels}")
    try:
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise IngestError(f"{name} is truncated or corrupt ({exc})") from None


def template_caption(trigger: str, caption: str | None) -> str:
    """The caption of an image the sender did not caption: theirs (with the trigger word) or a template."""
    return with_trigger(trigger, caption) if caption else f"a {trigger} picture"


def with_trigger(trigger: str, caption: str) -> str:
    # The trigger word is what calls the concept up at generation time, so every caption carries it.
    return caption if re.search(rf"(?<![\w-]){re.escape(trigger)}(?![\w-])", caption) else f"{trigger}, {caption}"


def collect(files: list[tuple[str, bytes]], trigger: str, caption: str | None, limits: IngestLimits) -> list[Example]:
    """Examples from downloaded files (images or zips), after every check."""
    named: list[tuple[str, bytes]] = []
    captions: dict[str, str] = {}
    for name, data in files:
        if not is_zip(data):
            named.append((name, data))
            continue
        members, captions_file = unpack_zip(name, data, limits)
        if captions_file:
            captions.update(parse_captions(captions_file[0], captions_file[1], {m for m, _ in members}))
        named.extend(members)
    if not named:
        raise IngestError("no images found: attach PNG, JPEG or WebP images, or one zip of them")
    if len(named) > limits.max_images:
        raise IngestError(f"{len(named)} images sent; at most {limits.max_images} per training")
    examples = []
    for name, data in named:
        image = open_image(name, data, limits)
        text = with_trigger(trigger, captions[name]) if name in captions else template_caption(trigger, caption)
        examples.append(Example(name, image, hashlib.sha256(data).hexdigest(), text))
    return examples


async def ingest(urls: list[str], trigger: str, caption: str | None, limits: IngestLimits,
                 slack_token: str | None = None) -> list[Example]:
    return collect(await download_all(urls, limits, slack_token), trigger, caption, limits)
