"""The image policy reads the images of one check in one ONNX Runtime run (issue 18), which may not change a
decision. Each image's network output in a batch must equal its output alone, bit for
bit, and equal what NudeNet's own NudeDetector (its own session, ONNX Runtime's default options) reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from skillgen.safety import Decision, ImagePolicy
from skillgen.safety.image import _NudeNet

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def _disc(width: int, height: int, box: tuple[float, float, float, float], tone: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(image).ellipse(box, fill=tone)
    return image


def _pictures() -> list[Image.Image]:
    """A fixed set with and without detections: skin-toned discs (NudeNet finds BUTTOCKS_EXPOSED in most, at
    scores from 0.25 to 0.61, two a hair either side of the default 0.6), noise, flat colours, odd shapes, and
    the embedded model's own 64x64 samples."""
    rng = np.random.default_rng(18)
    pictures = [
        _disc(256, 256, (48, 48, 208, 208), (224, 172, 105)),
        _disc(64, 64, (12, 12, 52, 52), (224, 172, 105)),
        _disc(512, 512, (96, 96, 416, 416), (224, 172, 105)),
        _disc(300, 300, (21, 8, 300, 286), (235, 166, 116)),  # 0.598: just under the default threshold
        _disc(128, 128, (7, -5, 127, 120), (230, 150, 91)),  # 0.602: just over it
        _disc(128, 97, (31, 2, 122, 93), (226, 177, 116)),  # 0.608
        _disc(64, 64, (1, 2, 64, 64), (232, 181, 120)),  # 0.254
        _disc(256, 64, (131, -2, 190, 61), (229, 159, 97)),  # 0.253
        _disc(97, 300, (10, 100, 90, 180), (224, 172, 105)),
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (37, 100, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)),
        Image.new("RGB", (64, 64), "black"),
        Image.new("RGB", (64, 64), (224, 172, 105)),
        Image.new("RGB", (640, 64), (128, 128, 128)),
    ]
    samples = Image.open(REPO / "models/skill-icons/samples.png").convert("RGB")
    pictures += [samples.crop((x, y, x + 64, y + 64)) for x, y in [(0, 0), (192, 64), (448, 128), (704, 320)]]
    return pictures


@pytest.fixture(scope="module")
def detector() -> _NudeNet:
    return _NudeNet("cpu")


def test_a_batch_gives_each_image_its_own_output_bit_for_bit(detector: _NudeNet) -> None:
    prepared = [detector.prepare(np.asarray(p)) for p in _pictures()]
    assert len(prepared) > _NudeNet.BATCH + 1
    alone = [detector.infer([p]) for p in prepared]
    for start in range(0, len(prepared), _NudeNet.BATCH):
        batch = prepared[start : start + _NudeNet.BATCH]
        together = detector.infer(batch)
        assert together.shape[0] == len(batch)
        for row, single in enumerate(alone[start : start + len(batch)]):
            np.testing.assert_array_equal(together[row : row + 1], single)


def test_batched_detections_equal_nudedetectors_own(detector: _NudeNet) -> None:
    from nudenet import NudeDetector

    pictures = [np.asarray(p) for p in _pictures()]
    reference = NudeDetector()
    theirs = [reference.detect(p) for p in pictures]
    prepared = [detector.prepare(p) for p in pictures[: _NudeNet.BATCH]]
    output = detector.infer(prepared)
    ours = [detector.detections(output, row, p) for row, p in enumerate(prepared)]
    ours += [detector.detect(p) for p in pictures[_NudeNet.BATCH :]]
    assert ours == theirs
    scores = [d["score"] for found in theirs for d in found if d["class"] == "BUTTOCKS_EXPOSED"]
    assert len(scores) >= 7 and min(scores) < 0.3 and 0.59 < sorted(scores)[-3] < 0.6 < sorted(scores)[-2]


def _verdict(decision: Decision) -> tuple:
    """A decision without its ref, which is drawn anew for every refusal."""
    return decision.allowed, decision.category, decision.detail, decision.layer


@pytest.mark.parametrize("threshold", [0.3, 0.6])
def test_checking_many_images_at_once_decides_as_one_at_a_time(threshold: float) -> None:
    policy = ImagePolicy(nsfw_threshold=threshold)
    pictures = _pictures()
    together = policy.check(pictures)
    alone = [policy.check([p])[0] for p in pictures]
    assert [_verdict(d) for d in together] == [_verdict(d) for d in alone]
    assert any(not d.allowed for d in together) and any(d.allowed for d in together)


def test_more_images_than_a_batch_go_through_in_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = ImagePolicy()
    sizes: list[int] = []
    infer = _NudeNet.infer

    def spy(self: _NudeNet, prepared: list) -> np.ndarray:
        sizes.append(len(prepared))
        return infer(self, prepared)

    monkeypatch.setattr(_NudeNet, "infer", spy)
    pictures = (_pictures() * 2)[: 2 * _NudeNet.BATCH + 3]
    decisions = policy.check(pictures)
    assert sizes == [_NudeNet.BATCH, _NudeNet.BATCH, 3]
    assert len(decisions) == len(pictures)


def test_an_unreadable_image_fails_alone_and_a_failed_run_fails_its_batch_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    policy = ImagePolicy(nsfw_threshold=0.3)
    disc, plain = _pictures()[0], Image.new("RGB", (64, 64), "black")
    decisions = policy.check([plain, Image.new("RGB", (0, 0)), disc])
    assert [(d.allowed, d.category) for d in decisions] == [(True, None), (False, "check_failed"), (False, "sexual")]

    infer, runs = _NudeNet.infer, []

    def second_run_fails(self: _NudeNet, prepared: list) -> np.ndarray:
        runs.append(len(prepared))
        if len(runs) == 2:
            raise RuntimeError("CUDA error: out of memory")
        return infer(self, prepared)

    monkeypatch.setattr(_NudeNet, "infer", second_run_fails)
    decisions = policy.check([plain] * _NudeNet.BATCH + [plain, disc])
    assert decisions[: _NudeNet.BATCH] == [Decision(allowed=True)] * _NudeNet.BATCH
    assert [(d.category, d.detail) for d in decisions[_NudeNet.BATCH :]] == [
        ("check_failed", "RuntimeError: CUDA error: out of memory")
    ] * 2
