"""SKILL_FAST_LORA: set, it is used as given; unset, the embedded model brings its own LCM-LoRA when it has one."""

from __future__ import annotations

import pytest

import consumer.settings as consumer_settings
from consumer.settings import ConsumerSettings

pytestmark = pytest.mark.unit


@pytest.fixture
def embedded(tmp_path, monkeypatch):
    """An embedded model directory and where its LCM-LoRA would be (not written yet)."""
    model, lora = tmp_path / "skill-icons", tmp_path / "skill-icons-lcm" / "pytorch_lora_weights.safetensors"
    model.mkdir()
    monkeypatch.setattr(consumer_settings, "EMBEDDED_MODEL_DIR", model)
    monkeypatch.setattr(consumer_settings, "EMBEDDED_FAST_LORA", lora)
    monkeypatch.delenv("SKILL_FAST_LORA", raising=False)
    return model, lora


def test_the_embedded_model_takes_its_lcm_lora_only_once_it_exists(embedded, tmp_path):
    model, lora = embedded
    assert ConsumerSettings(model=str(model)).fast_lora is None  # not distilled yet: turbo is refused
    lora.parent.mkdir()
    lora.write_bytes(b"x")
    assert ConsumerSettings(model=str(model)).fast_lora == lora
    assert ConsumerSettings(model=str(tmp_path / "other-model")).fast_lora is None  # another model: not its LoRA
    assert ConsumerSettings(model="runwayml/stable-diffusion-v1-5").fast_lora is None


def test_skill_fast_lora_overrides_the_default(embedded, tmp_path, monkeypatch):
    model, _ = embedded
    monkeypatch.setenv("SKILL_FAST_LORA", str(tmp_path / "mine.safetensors"))
    assert ConsumerSettings(model=str(model)).fast_lora == tmp_path / "mine.safetensors"
    assert ConsumerSettings(model="any/hub-id").fast_lora == tmp_path / "mine.safetensors"
