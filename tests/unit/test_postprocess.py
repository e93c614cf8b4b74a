"""The one post-processing step: every image is checked before anything is stored, one blocked image withholds
the whole request, and a check that could not run wins over a block."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from skillgen.runtime.blobstore import BlobStore
from skillgen.safety import Decision, SafetyError
from skillgen.safety.decision import CHECK_FAILED
from skillgen.safety.postprocess import release, screen, verdict
from tests.fakes.checkers import NUDITY, UNCHECKED, BlockAt

pytestmark = pytest.mark.unit

ALLOWED = Decision(allowed=True)
BLOCKED = Decision(allowed=False, category="sexual", reason=NUDITY)
FAILED = Decision(allowed=False, category=CHECK_FAILED, reason=UNCHECKED)


def colours(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (8 + i, 8), (40 * i, 200 - 40 * i, 90)) for i in range(n)]


@pytest.fixture
def blobs(tmp_path) -> BlobStore:
    return BlobStore((tmp_path / "blobs").as_uri())


def stored_files(blobs: BlobStore) -> list[Path]:
    return [p for p in Path(blobs.url.removeprefix("file://")).rglob("*") if p.is_file()]


def test_verdict_allows_only_when_every_image_is_allowed():
    assert verdict([ALLOWED, ALLOWED]) is None
    assert verdict([]) is None
    assert verdict([ALLOWED, BLOCKED, ALLOWED]) == BLOCKED


def test_a_failed_check_wins_over_a_block_whatever_the_order():
    assert verdict([BLOCKED, ALLOWED, FAILED]) == FAILED
    assert verdict([FAILED, BLOCKED]) == FAILED


def test_release_stores_one_ref_per_image_in_order_with_its_seed(blobs):
    images = colours(3)
    refs = release(images, [7, None, 9], BlockAt(), blobs)
    assert [r.seed for r in refs] == [7, None, 9]
    assert [(r.width, r.height) for r in refs] == [(8, 8), (9, 8), (10, 8)]
    for ref, image in zip(refs, images):
        assert Image.open(io.BytesIO(blobs.get(ref))).getpixel((0, 0)) == image.getpixel((0, 0))


def test_one_blocked_image_withholds_the_request_and_nothing_is_stored(blobs):
    checker = BlockAt(blocked=[1])
    outcome = release(colours(3), [1, 2, 3], checker, blobs)
    assert isinstance(outcome, Decision) and outcome.reason == NUDITY and outcome.category == "sexual"
    assert checker.calls == [3]  # every image was checked, in one call
    assert stored_files(blobs) == []


def test_a_check_that_could_not_run_withholds_as_check_failed(blobs):
    outcome = release(colours(3), [1, 2, 3], BlockAt(blocked=[0], failed=[2]), blobs)
    assert isinstance(outcome, Decision) and outcome.category == CHECK_FAILED and outcome.reason == UNCHECKED
    assert stored_files(blobs) == []


class Forgetful:
    """A checker that answers for the first image only."""

    def check(self, images):
        return [ALLOWED]


def test_an_image_without_a_decision_is_never_released(blobs):
    with pytest.raises(SafetyError, match="answered 1 decisions for 2 images"):
        release(colours(2), [1, 2], Forgetful(), blobs)
    assert stored_files(blobs) == []
    with pytest.raises(SafetyError, match="one decision per image"):
        screen(colours(2), Forgetful())


def test_images_and_seeds_must_pair_up(blobs):
    with pytest.raises(ValueError, match="2 images but 1 seeds"):
        release(colours(2), [1], BlockAt(), blobs)
