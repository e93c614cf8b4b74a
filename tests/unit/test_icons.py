import itertools
import random
import re

import numpy as np
import pytest
from PIL import Image

from bench.quality import background_is_light, dominant_color
from skillgen.tools.icons import (
    BACKGROUNDS,
    COLORS,
    SKILLS,
    IconDataset,
    IconSpec,
    draw_icon,
    icon_specs,
)

pytestmark = pytest.mark.unit

COMBOS = len(SKILLS) * len(COLORS) * len(BACKGROUNDS)


def test_a_dozen_skills_several_colours_two_backgrounds():
    assert len(SKILLS) == 12
    assert len(COLORS) >= 6
    assert BACKGROUNDS == ("light", "dark")


def test_same_seed_same_pixels_and_captions():
    a, b = IconDataset(20, seed=7), IconDataset(20, seed=7)
    for (img_a, cap_a), (img_b, cap_b) in zip(a, b):
        assert cap_a == cap_b
        assert img_a.tobytes() == img_b.tobytes()


def test_another_seed_another_dataset():
    a, b = IconDataset(20, seed=1), IconDataset(20, seed=2)
    assert [c for _, c in a] != [c for _, c in b]
    assert any(x.tobytes() != y.tobytes() for (x, _), (y, _) in zip(a, b))


def test_an_item_does_not_depend_on_the_dataset_size():
    small, large = IconDataset(5, seed=3), IconDataset(50, seed=3)
    assert small[4][0].tobytes() == large[4][0].tobytes()


def test_every_combination_once_per_round():
    specs = icon_specs(2 * COMBOS, seed=0)
    all_combos = {
        IconSpec(skill=s, color=c, background=b) for s, c, b in itertools.product(SKILLS, COLORS, BACKGROUNDS)
    }
    assert set(specs[:COMBOS]) == all_combos
    assert set(specs[COMBOS:]) == all_combos
    assert specs[:COMBOS] != specs[COMBOS:]  # each round in its own order


def test_captions_name_colour_skill_and_background():
    dataset = IconDataset(40, seed=0)
    pattern = re.compile(r"^an? (\w+) (.+) skill icon on a (light|dark) background$")
    for spec, (_, text) in zip(dataset.specs, dataset):
        m = pattern.match(text)
        assert m is not None, text
        assert m.groups() == (spec.color, spec.skill, spec.background)
    assert dataset[0][1] == dataset.specs[0].caption
    assert IconSpec(skill="book", color="orange", background="dark").caption.startswith("an orange book")


@pytest.mark.parametrize("size_px", [64, 128])
def test_sizes(size_px):
    image, _ = IconDataset(1, seed=0, size_px=size_px)[0]
    assert image.size == (size_px, size_px) and image.mode == "RGB"


def test_rejects_sizes_the_vae_cannot_take():
    with pytest.raises(ValueError, match="multiple of 8"):
        IconDataset(1, size_px=60)


def test_rejects_unknown_skill():
    with pytest.raises(ValueError, match="unknown icon"):
        draw_icon(IconSpec(skill="juggling", color="red", background="dark"), random.Random(0))


def test_scorer_reads_every_drawn_icon_right():
    dataset = IconDataset(COMBOS, seed=11)
    for spec, (image, _) in zip(dataset.specs, dataset):
        assert dominant_color(image) == spec.color, spec
        assert background_is_light(image) == (spec.background == "light"), spec


def test_scorer_on_plain_images():
    assert dominant_color(Image.new("RGB", (64, 64), (128, 128, 128))) is None
    assert dominant_color(Image.new("RGB", (64, 64), (20, 20, 200))) == "blue"
    assert background_is_light(Image.new("RGB", (64, 64), (240, 240, 240)))
    assert not background_is_light(Image.new("RGB", (64, 64), (30, 30, 30)))


def test_scorer_ignores_the_centre_for_background():
    arr = np.full((64, 64, 3), 235, dtype=np.uint8)
    arr[8:56, 8:56] = (10, 10, 10)  # a large dark icon on a light background
    assert background_is_light(Image.fromarray(arr))


def test_red_wraps_around_the_hue_circle():
    # Hue ~6 degrees is nearer red (355) across 0 than orange (25).
    assert dominant_color(Image.new("RGB", (64, 64), (220, 40, 20))) == "red"
