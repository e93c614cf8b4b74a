"""The trainer's inputs behind the trust boundary, in memory: bounded images (aspect ratio from the header, before
any pixel is decoded; every image downscaled at ingest), positions instead of the sender's names in every
message, captions through the prompt policy, training images through the image policy, uploads read back from
the blob store, and no chat token in the trainer's settings. Each `security` test is an attack that must fail."""

from __future__ import annotations

import io
import json
import struct
import time
import tracemalloc
import zipfile
import zlib

import pytest
from PIL import Image, ImageFile

from schemas.limits import IngestLimits
from schemas.messages import BlobRef, FineTuneRequest, Origin
from skillgen.runtime.blobstore import BlobStore
from skillgen.runtime.fetch import IngestError, check_url
from skillgen.safety import PromptPolicy
from skillgen.safety.decision import CHECK_FAILED
from skillgen.safety.errors import SafetyError
from tests.fakes.checkers import NUDITY, BlockAt
from trainer import screening
from trainer.errors import TrainerError
from trainer.ingest import collect, read_uploads
from trainer.settings import TrainerSettings

pytestmark = pytest.mark.unit

LIMITS = IngestLimits()
MENTION = "<!here>"
BLOCKED = "a nude zq figure"  # the default term lists refuse it (sexual)


def png(width: int = 16, height: int = 16, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (20, 90, 200)).save(buf, format="JPEG", quality=70)
    return buf.getvalue()


def resize_bomb(width: int = 262144, height: int = 64) -> bytes:
    """A real, decodable 1-bit PNG of width x height pixels in a few KB: zlib squeezes its zero rows to nothing,
    while decoding it as RGB would take width * height * 3 bytes (48 MiB here, gigabytes once resized)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\x00" + bytes((width + 7) // 8)  # filter byte, then the packed bits
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(row * height, 9))
            + chunk(b"IEND", b""))


def make_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


@pytest.fixture
def decoded(monkeypatch) -> list[tuple[int, int]]:
    """The size of every image whose pixels get decoded, in order."""
    sizes: list[tuple[int, int]] = []
    load = ImageFile.ImageFile.load

    def spy(self, *a, **kw):
        sizes.append(self.size)
        return load(self, *a, **kw)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return sizes


# ------------------------------------------------------------------------------------------- bounded images


@pytest.mark.security
@pytest.mark.parametrize("size", [(262144, 64), (64, 262144)], ids=["wide", "tall"])
def test_a_resize_bomb_is_refused_from_its_header_without_decoding(decoded, size):
    bomb = resize_bomb(*size)
    assert len(bomb) < 16 * 1024 and size[0] * size[1] <= LIMITS.max_pixels  # the pixel limit alone lets it in
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(IngestError) as err:
            collect([("a.png", png()), ("wide.png", bomb)], "zq", None, LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(err.value) == (f"image 2 is {size[0]}x{size[1]} pixels: its long side may be at most 4 times its "
                              "short side")
    assert peak < 50 * 1024 * 1024 and time.monotonic() - t0 < 2
    # tracemalloc sees Python's allocations only; Pillow allocates pixels in C, so the spy is what proves that the
    # bomb's pixels were never decoded: only the innocent image was.
    assert set(decoded) == {(16, 16)}


@pytest.mark.security
def test_the_aspect_ratio_limit_is_a_setting_and_4_to_1_passes():
    (ok,) = collect([("a.png", png(64, 16))], "zq", None, LIMITS)
    assert ok.image.size == (64, 16)
    with pytest.raises(IngestError, match="image 1 is 64x16 pixels: its long side may be at most 2 times"):
        collect([("a.png", png(64, 16))], "zq", None, IngestLimits(max_aspect_ratio=2))


@pytest.mark.security
@pytest.mark.parametrize("encode", [lambda: png(3000, 2000), lambda: jpeg(3000, 2000)], ids=["png", "jpeg"])
def test_every_image_is_downscaled_to_the_long_side_limit(encode):
    (example,) = collect([("big.png", encode())], "zq", None, LIMITS)
    assert max(example.image.size) <= 1024 and example.image.size[0] == 1024
    assert abs(example.image.size[0] / example.image.size[1] - 1.5) < 0.01 and example.image.mode == "RGB"
    (small,) = collect([("big.png", encode())], "zq", None, IngestLimits(max_side_px=256))
    assert small.image.size == (256, 171)


def test_an_image_within_the_limit_keeps_its_size():
    (example,) = collect([("a.png", png(300, 200))], "zq", None, LIMITS)
    assert example.image.size == (300, 200)


# ------------------------------------------------------------------------------- positions, never names


@pytest.mark.security
@pytest.mark.parametrize(
    ("members", "says"),
    [
        ({f"{MENTION}.png": b"<html>login</html>"}, "image 1 is not a PNG, JPEG or WebP image"),
        ({"a.png": png(), f"../{MENTION}.png": png()}, "entry 2 of file 1 climbs out of the zip with '..'"),
        ({f"{MENTION}.zip": b"x"}, "entry 1 of file 1 is an archive inside the zip"),
        ({"a.png": png(), "captions.jsonl": json.dumps({"file_name": f"{MENTION}.png", "text": "x"}).encode()},
         "line 1 of the captions file names a file that is not in the zip"),
        ({"a.png": png(), "captions.jsonl": b"", f"{MENTION}/captions.csv": b""}, "file 1 has two captions files"),
    ],
    ids=["not-an-image", "dotdot", "nested-archive", "captions-name", "two-captions-files"],
)
def test_a_zip_member_named_to_ping_a_channel_is_named_by_position(members, says):
    with pytest.raises(IngestError) as err:
        collect([("set.zip", make_zip(members))], "zq", None, LIMITS)
    assert says in str(err.value) and MENTION not in str(err.value) and "here" not in str(err.value)


@pytest.mark.security
def test_a_url_is_refused_by_its_host_never_its_file_name():
    with pytest.raises(IngestError) as err:
        check_url(f"https://evil.example/{MENTION}.png", LIMITS)
    assert str(err.value).startswith("evil.example: downloads only come from") and MENTION not in str(err.value)


# ------------------------------------------------------------------------------------ captions and images


@pytest.fixture(scope="module")
def prompts() -> PromptPolicy:
    return PromptPolicy()


@pytest.mark.security
def test_a_blocked_caption_in_a_zips_captions_file_is_refused_by_position(prompts):
    captions = "\n".join(json.dumps({"file_name": n, "text": t}) for n, t in
                         [("a.png", "a zq drum"), (f"{MENTION}.png", BLOCKED)])
    archive = make_zip({"a.png": png(), f"{MENTION}.png": png(color=(1, 2, 3)), "captions.jsonl": captions.encode()})
    examples = collect([("set.zip", archive)], "zq", None, LIMITS)
    with pytest.raises(IngestError) as err:
        screening.check_captions(prompts, None, examples)
    assert str(err.value).startswith("the caption of image 2 is refused: Your prompt was blocked")
    assert BLOCKED not in str(err.value) and MENTION not in str(err.value)


@pytest.mark.security
def test_a_blocked_request_caption_and_a_blocked_trigger_are_refused(prompts):
    with pytest.raises(IngestError, match="^the caption is refused: "):
        screening.check_captions(prompts, BLOCKED)
    examples = collect([("a.png", png())], "nude", None, LIMITS)  # the template caption carries the trigger
    with pytest.raises(IngestError, match="^the caption of image 1 is refused: "):
        screening.check_captions(prompts, None, examples)
    screening.check_captions(prompts, "a zq drum", collect([("a.png", png())], "zq", "a drum", LIMITS))


class SizesSeen(BlockAt):
    def check(self, images):
        self.sizes = [image.size for image in images]
        return super().check(images)


@pytest.mark.security
def test_one_training_image_the_image_policy_blocks_fails_naming_its_position():
    examples = collect([(f"{MENTION}.png", png(color=(i, 0, 0))) for i in range(3)], "zq", None, LIMITS)
    checker = SizesSeen(blocked=[1])
    with pytest.raises(IngestError) as err:
        screening.check_images(checker, examples)
    assert str(err.value) == f"image 2 is refused by the image check: {NUDITY}" and checker.calls == [3]
    with pytest.raises(TrainerError, match="the image check could not run on image 1, so nothing was trained"):
        screening.check_images(BlockAt(blocked=[2], failed=[0]), examples)  # a failed check wins
    screening.check_images(BlockAt(), examples)


@pytest.mark.security
def test_a_checker_that_answers_for_fewer_images_vouches_for_none():
    class Short(BlockAt):
        def check(self, images):
            return super().check(images)[:-1]

    examples = collect([("a.png", png()), ("b.png", png())], "zq", None, LIMITS)
    with pytest.raises(SafetyError):
        screening.check_images(Short(), examples)
    withheld = screening.screen_cells([e.image for e in examples], Short())
    assert withheld.category == CHECK_FAILED and withheld.reason == screening.GRID_UNCHECKED


def test_the_sample_prompt_is_fixed_and_neutral_and_checked(prompts, tmp_path):
    assert screening.sample_prompt("zq") == screening.SAMPLE_PROMPT.format(trigger="zq") == \
        "a zq picture, simple background"
    assert screening.prompt_refused(prompts, screening.sample_prompt("zq")) is None
    terms = tmp_path / "backgrounds.txt"
    terms.write_text("simple background\n")
    refused = screening.prompt_refused(PromptPolicy(extra_terms=[terms]), screening.sample_prompt("zq"))
    assert refused.reason.startswith("the sample prompt was refused: Your prompt was blocked")


# ------------------------------------------------------------------------------------------- uploads


def blob(store: BlobStore, data: bytes) -> BlobRef:
    return store.put(data, "application/octet-stream")


@pytest.mark.security
def test_uploads_are_read_back_from_the_blob_store_with_their_sha256_checked(tmp_path):
    store = BlobStore((tmp_path / "blobs").as_uri())
    refs = [blob(store, png()), blob(store, png(color=(1, 2, 3)))]
    assert [d for _, d in read_uploads(refs, LIMITS, store)] == [png(), png(color=(1, 2, 3))]
    forged = refs[1].model_copy(update={"sha256": refs[0].sha256})  # a name that is not its content's
    elsewhere = refs[0].model_copy(update={"url": "file:///etc/passwd"})
    for bad in (forged, elsewhere):
        with pytest.raises(IngestError, match="^file 2 cannot be read back from the blob store"):
            read_uploads([refs[0], bad], LIMITS, store)
    with pytest.raises(IngestError, match="file 1 is 600 bytes; the limit is 500"):
        read_uploads([blob(store, b"x" * 600)], IngestLimits(max_file_bytes=500), store)
    with pytest.raises(IngestError, match="add up to more than"):
        read_uploads(refs, IngestLimits(max_total_bytes=len(png()) + 1), store)


def test_a_request_carries_urls_or_uploads_and_the_trainer_holds_no_chat_token(tmp_path):
    origin = Origin(platform="slack", team_id="T01", channel_id="C1", user_id="U1")
    ref = blob(BlobStore((tmp_path / "blobs").as_uri()), png())
    assert FineTuneRequest(origin=origin, adapter="a", images=[ref]).image_urls == []
    with pytest.raises(ValueError, match="give at least one image URL or uploaded image"):
        FineTuneRequest(origin=origin, adapter="a")
    assert not [f for f in TrainerSettings.model_fields if "token" in f or "slack" in f]
