"""An img2img request's init image: only this blob store's own names are read, and the PNG's header is checked
before a pixel is decoded; each refusal is one line for the requester."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from consumer.init_image import InitImageError, open_png, read_init_image
from schemas.messages import BlobRef, GenerateRequest, Origin
from skillgen.runtime.blobstore import BlobStore

pytestmark = pytest.mark.unit

ORIGIN = Origin(platform="console", team_id="t1", channel_id="c", user_id="u")


def png(size=(64, 64), color=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def declared_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height (a decompression bomb's opening)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def request(ref: BlobRef, **kw) -> GenerateRequest:
    return GenerateRequest(origin=ORIGIN, prompt="a juggler's cascade", **{"width": 64, "height": 64, **kw},
                           init_image=ref)


def test_a_result_of_the_store_is_read_at_its_size_and_half_size_for_upscale(tmp_path):
    blobs = BlobStore(f"file://{tmp_path}")
    ref = blobs.put(png(), width=64, height=64)
    assert read_init_image(blobs, request(ref)).size == (64, 64)
    assert read_init_image(blobs, request(ref, width=128, height=128, upscale=2)).size == (64, 64)


@pytest.mark.security
def test_a_reference_outside_the_store_is_refused_before_reading(tmp_path):
    blobs = BlobStore(f"file://{tmp_path / 'ours'}")
    theirs = BlobStore(f"file://{tmp_path / 'theirs'}").put(png())
    with pytest.raises(InitImageError, match="not an image of this service's blob store"):
        read_init_image(blobs, request(theirs))


def test_a_missing_blob_is_refused_clearly(tmp_path):
    blobs = BlobStore(f"file://{tmp_path}")
    ref = blobs.put(png())
    (tmp_path / ref.url.rsplit("/", 2)[1] / ref.url.rsplit("/", 1)[1]).unlink()
    with pytest.raises(InitImageError, match="no longer in the blob store") as refused:
        read_init_image(blobs, request(ref))
    assert str(tmp_path) not in str(refused.value)  # the store's location is not the requester's business


@pytest.mark.security
@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (declared_png(100_000, 100_000), "enormous size|100000x100000 pixels"),
        (declared_png(1024, 1024), "1024x1024 pixels; this request needs 64x64"),
        (png((64, 128)), "64x128 pixels; this request needs 64x64"),
        (b"GIF89a" + b"\0" * 100, "not a PNG"),
        (png()[:-30], "truncated or corrupt"),
    ],
)
def test_a_png_is_checked_from_its_header_before_decoding(data, reason):
    with pytest.raises(InitImageError, match=reason) as refused:
        open_png(data, (64, 64))
    assert "\n" not in str(refused.value)
