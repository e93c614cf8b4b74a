"""The init image of an img2img request: read from our blob store and opened within bounds, before the GPU.

The request's BlobRef is hostile input. The contract already refused URLs that are not a PNG blob's
content-addressed name; here the store resolves it only through its own names (`BlobStore.name_of`: this
store's location, `ab/<sha256>.png`, the digest checked again after reading), and the PNG's header is checked
before a pixel is decoded: a PNG, at exactly the size the request implies (its width and height, or half of them
for upscale=2), so a small file that declares an enormous size never reaches the decoder.
"""

from __future__ import annotations

import io
import logging

from PIL import Image, UnidentifiedImageError

from schemas.messages import MAX_INIT_IMAGE_BYTES, MAX_SIDE_PX, GenerateRequest
from skillgen.inference.errors import PipelineError
from skillgen.runtime.blobstore import BlobError, BlobStore
from skillgen.runtime.logs import job as job_fields

log = logging.getLogger("skillgen.consumer")


class InitImageError(PipelineError):
    """The init image cannot be used; the message (one line) is for the requester."""


def expected_size(req: GenerateRequest) -> tuple[int, int]:
    return req.width // req.upscale, req.height // req.upscale


def check_ref(blobs: BlobStore, req: GenerateRequest) -> None:
    """Refuse a reference that is not one of this store's own names, before anything is looked up."""
    try:
        blobs.name_of(req.init_image)
    except BlobError:
        raise InitImageError("init_image is not an image of this service's blob store: use one of its results") \
            from None


def open_png(data: bytes, size: tuple[int, int]) -> Image.Image:
    """The PNG in `data` as RGB, if its header declares exactly `size`; checked before decoding."""
    if len(data) > MAX_INIT_IMAGE_BYTES:
        raise InitImageError(f"init_image is {len(data)} bytes; at most {MAX_INIT_IMAGE_BYTES}")
    try:
        image = Image.open(io.BytesIO(data), formats=["PNG"])  # reads the header only
    except Image.DecompressionBombError:
        raise InitImageError(f"init_image declares an enormous size; at most {MAX_SIDE_PX}x{MAX_SIDE_PX}") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise InitImageError("init_image is not a PNG image") from None
    w, h = image.size
    if w > MAX_SIDE_PX or h > MAX_SIDE_PX or (w, h) != size:
        raise InitImageError(f"init_image is {w}x{h} pixels; this request needs {size[0]}x{size[1]}: "
                             "set width and height to match (twice its size with upscale=2)")
    try:
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        raise InitImageError("init_image is truncated or corrupt") from None


def read_init_image(blobs: BlobStore, req: GenerateRequest) -> Image.Image:
    """The request's init image, ready for the engine. Blocking (file or network I/O, PNG decoding): call it in
    a thread. Raises InitImageError with a message for the requester."""
    check_ref(blobs, req)
    try:
        data = blobs.get(req.init_image)
    except BlobError as exc:
        missing = "missing" in str(exc)
        log.warning("init image refused: %s", exc, extra=job_fields(req.request_id))
        raise InitImageError("init_image is no longer in the blob store: draw it again first" if missing
                             else "init_image does not match its sha256: refusing corrupt data") from None
    except OSError as exc:  # the store is unreachable (s3, a full disk): say so, the requester may retry
        log.warning("init image unreadable: %s", exc, extra=job_fields(req.request_id))
        raise InitImageError("init_image could not be read from the blob store just now; try again") from None
    return open_png(data, expected_size(req))
