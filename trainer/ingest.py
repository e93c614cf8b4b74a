"""Training images from chat attachments, hostile by default.

A request names its files two ways: `image_urls`, downloaded here through skillgen.runtime.fetch (allowlisted
hosts, address checks in the resolver, byte caps; no chat token: Discord's attachment URLs need none), and
`images`, blobs that a bot already fetched into the blob store (Slack's private files: only the Slack bot holds
its token), read back with their sha256 checked. A zip is inspected from its directory before any member is
read: member count, total uncompressed size, compression ratio, absolute paths, `..`, symlinks, encryption and
nested archives. Images are PNG, JPEG or WebP only; their pixel count and aspect ratio are checked from the
header before Pillow decodes them, and each is downscaled to IngestLimits.max_side_px as it is decoded.

Each rejection is an IngestError whose message names the file or image by its position ("file 2", "image 3",
"file 1, entry 4") and the limit, never by the sender's file names, which are their text and would be posted
back into a channel (a member named `<!here>.png` must not ping anyone).
"""

from __future__ import annotations

import asyncio
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
from schemas.messages import MAX_PROMPT_CHARS, BlobRef, FineTuneRequest
from skillgen.runtime.blobstore import BlobError, BlobStore
from skillgen.runtime.fetch import IngestError, bytes_limit, download_all

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


def unpack_zip(what: str, data: bytes, limits: IngestLimits) -> tuple[list[tuple[str, bytes]], tuple[str, bytes] | None]:
    """The zip's image members as (path, bytes) and its captions file, if any, after every check. `what` names
    the zip in messages ("file 1"); a member is named by its position in the zip's directory, not its path."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise IngestError(f"{what} is not a readable zip ({type(exc).__name__})") from None
    infos = archive.infolist()
    if len(infos) > limits.max_zip_members:
        raise IngestError(f"{what} has {len(infos)} entries; at most {limits.max_zip_members} are allowed")
    total = sum(info.file_size for info in infos)
    if total > limits.max_zip_total_bytes:
        raise IngestError(f"{what} unpacks to {total} bytes; at most {limits.max_zip_total_bytes} are allowed")
    images: list[tuple[str, bytes]] = []
    captions: tuple[str, bytes] | None = None
    for n, info in enumerate(infos, 1):
        member = info.filename.replace("\\", "/")
        where = f"entry {n} of {what}"
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
            raise IngestError(f"{where} cannot be read ({type(exc).__name__})") from None  # (its text names the member)
        kind = _archive_kind(body)
        if kind:
            raise IngestError(f"{where} is a {kind} archive inside the zip; send the images themselves")
        if path.name.lower() in CAPTION_FILES:
            if captions is not None:
                raise IngestError(f"{what} has two captions files (entry {n} is the second); keep one")
            captions = (member, body)
        else:
            images.append((member, body))
    return images, captions


def parse_captions(name: str, data: bytes, known: set[str]) -> dict[str, str]:
    """file name -> caption, from a jsonl ({"file_name"|"file", "text"|"caption"}) or csv (same columns) file.
    `name` (the member's path) says which format; messages say "the captions file" and the line."""
    what = "the captions file"
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise IngestError(f"{what} is not UTF-8 text") from None
    rows: list[tuple[int, dict]] = []
    if name.lower().endswith(".jsonl"):
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise IngestError(f"line {n} of {what} is not JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise IngestError(f"line {n} of {what} is not a JSON object")
                rows.append((n, row))
    else:
        try:
            rows = list(enumerate(csv.DictReader(io.StringIO(text)), 2))
        except csv.Error as exc:
            raise IngestError(f"{what} is not valid CSV ({exc})") from None
    out: dict[str, str] = {}
    for n, row in rows:
        file = row.get("file_name", row.get("file"))
        caption = row.get("text", row.get("caption"))
        if not isinstance(file, str) or not isinstance(caption, str):
            raise IngestError(f"line {n} of {what} needs a file_name (or file) and a text (or caption)")
        if len(caption) > MAX_PROMPT_CHARS:
            raise IngestError(f"line {n} of {what}: the caption is {len(caption)} characters; at most {MAX_PROMPT_CHARS}")
        match = [k for k in known if k == file or PurePosixPath(k).name == file]
        if len(match) != 1:
            why = "is not in the zip" if not match else "matches more than one image"
            raise IngestError(f"line {n} of {what} names a file that {why}")
        out[match[0]] = caption.strip()
    return out


# --------------------------------------------------------------------------------------------------- images


def open_image(what: str, data: bytes, limits: IngestLimits) -> Image.Image:
    """The image as RGB, its long side at most `limits.max_side_px`, if it is a PNG, JPEG or WebP within the
    pixel and aspect-ratio limits. `what` names it in messages ("image 3").

    Pillow opens lazily: `Image.open` reads the header only, so the size is checked before a single pixel is
    decoded (a 16 KB PNG can declare 262144x64), and a JPEG is decoded at a reduced scale (`draft`)."""
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:
        raise IngestError(f"{what} declares an enormous size; at most {limits.max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise IngestError(f"{what} is not a PNG, JPEG or WebP image") from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise IngestError(f"{what} is {width}x{height} = {width * height} pixels; at most {limits.max_pixels}")
    if min(width, height) < 1 or max(width, height) > limits.max_aspect_ratio * min(width, height):
        raise IngestError(f"{what} is {width}x{height} pixels: its long side may be at most "
                          f"{limits.max_aspect_ratio:g} times its short side")
    side = limits.max_side_px
    try:
        if image.format == "JPEG":
            image.draft(image.mode, (side, side))  # decode at 1/2, 1/4 or 1/8 scale, never below the target
        image.load()
        image = image.convert("RGB")
        image.thumbnail((side, side), Image.Resampling.LANCZOS)  # in place; keeps the aspect ratio
        return image
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise IngestError(f"{what} is truncated or corrupt ({exc})") from None


def template_caption(trigger: str, caption: str | None) -> str:
    """The caption of an image the sender did not caption: theirs (with the trigger word) or a template."""
    return with_trigger(trigger, caption) if caption else f"a {trigger} picture"


def with_trigger(trigger: str, caption: str) -> str:
    # The trigger word is what calls the concept up at generation time, so every caption carries it.
    return caption if re.search(rf"(?<![\w-]){re.escape(trigger)}(?![\w-])", caption) else f"{trigger}, {caption}"


def collect(files: list[tuple[str, bytes]], trigger: str, caption: str | None, limits: IngestLimits) -> list[Example]:
    """Examples from fetched files (images or zips), after every check. Files are named by position in messages
    ("file 1"), images by their position among all the images, zip members in the zip's order ("image 3")."""
    named: list[tuple[str, bytes, str | None]] = []  # (name, bytes, the caption its zip's captions file gives)
    for n, (name, data) in enumerate(files, 1):
        if not is_zip(data):
            named.append((name, data, None))
            continue
        members, captions_file = unpack_zip(f"file {n}", data, limits)
        texts = parse_captions(captions_file[0], captions_file[1], {m for m, _ in members}) if captions_file else {}
        named.extend((member, body, texts.get(member)) for member, body in members)
    if not named:
        raise IngestError("no images found: attach PNG, JPEG or WebP images, or one zip of them")
    if len(named) > limits.max_images:
        raise IngestError(f"{len(named)} images sent; at most {limits.max_images} per training")
    examples = []
    for i, (name, data, own) in enumerate(named, 1):
        image = open_image(f"image {i}", data, limits)
        text = with_trigger(trigger, own) if own is not None else template_caption(trigger, caption)
        examples.append(Example(name, image, hashlib.sha256(data).hexdigest(), text))
    return examples


def read_uploads(refs: list[BlobRef], limits: IngestLimits, blobs: BlobStore, first: int = 1,
                 max_total_bytes: int | None = None) -> list[tuple[str, bytes]]:
    """(name, bytes) of files a bot put in the blob store, in order, numbered from `first` in messages. The store
    checks each blob's sha256 and refuses a reference outside its own content-addressed names. Blocking I/O."""
    if len(refs) > limits.max_images:
        raise IngestError(f"{len(refs)} files sent; at most {limits.max_images} images per training")
    budget = limits.max_total_bytes if max_total_bytes is None else max_total_bytes
    files: list[tuple[str, bytes]] = []
    for n, ref in enumerate(refs, first):
        if ref.bytes > limits.max_file_bytes:
            raise IngestError(f"file {n} is {ref.bytes} bytes; {bytes_limit(limits.max_file_bytes)}")
        try:
            data = blobs.get(ref)
        except BlobError:
            raise IngestError(f"file {n} cannot be read back from the blob store; send it again") from None
        if len(data) > limits.max_file_bytes:
            raise IngestError(f"file {n} is {len(data)} bytes; {bytes_limit(limits.max_file_bytes)}")
        budget -= len(data)
        if budget < 0:
            raise IngestError(f"the files add up to more than {limits.max_total_bytes} bytes; send fewer or smaller images")
        files.append((f"upload-{n}", data))
    return files


async def ingest(req: FineTuneRequest, limits: IngestLimits, blobs: BlobStore) -> list[Example]:
    """The request's training examples: its URLs downloaded (no chat token: none is needed or held here), then its
    uploaded blobs read back, then every file checked and decoded off the event loop."""
    files = await download_all(req.image_urls, limits) if req.image_urls else []
    left = limits.max_total_bytes - sum(len(data) for _, data in files)
    files += await asyncio.to_thread(read_uploads, req.images, limits, blobs, len(files) + 1, left)
    return await asyncio.to_thread(collect, files, req.trigger, req.caption, limits)
