"""Training images from chat attachments, hostile by default.

Downloads go through skillgen.runtime.fetch (allowlisted hosts, address checks in the resolver, byte caps). A zip is inspected from its directory before any member is read: member count, total uncompressed size,
compression ratio, absolute paths, `..`, symlinks, encryption and nested archives. Images are PNG, JPEG or
WebP only, and their pixel count is checked from the header before Pillow decodes them.

Each rejection is an IngestError whose message names the file and the limit, for the person who sent it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import stat
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath

from PIL import Image, UnidentifiedImageError

from schemas.limits import IngestLimits
from schemas.messages import MAX_PROMPT_CHARS
from skillgen.runtime.fetch import IngestError, bytes_limit, download_all, shorten

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
        where = f"{name}: {shorten(member, 60)!r}"
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
            raise IngestError(f"{where} is {info.file_size} bytes; {bytes_limit(limits.max_file_bytes)}")
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
