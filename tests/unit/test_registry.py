"""The adapter registry: versions, resolution, team isolation, idempotent publishing, safetensors only."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import uuid

import numpy as np
import pytest
from safetensors.numpy import save

from schemas.messages import AdapterRef
from skillgen.adapters.recipe import LoraRecipe
from skillgen.adapters.registry import (
    AdapterNotFound,
    Registry,
    RegistryError,
    TrainedBy,
    TrainingRecord,
    adapter_key,
    check_safetensors,
)

pytestmark = pytest.mark.unit


def lora_weights(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return save({
        "unet.down_blocks.0.attentions.0.to_q.lora.down.weight": rng.standard_normal((8, 32), dtype=np.float32),
        "unet.down_blocks.0.attentions.0.to_q.lora.up.weight": rng.standard_normal((32, 8), dtype=np.float32),
    })


def record(request_id: str | None = None, user: str = "u1") -> TrainingRecord:
    return TrainingRecord(
        request_id=request_id or uuid.uuid4().hex,
        trained_by=TrainedBy(platform="discord", user_id=user, channel_id="c1"),
        trigger="zq",
        base_model="models/skill-icons",
        base_model_sha256="ab" * 32,
        recipe=LoraRecipe(),
        steps=500,
        resolution_px=64,
        dataset_sha256="cd" * 32,
        images=12,
        loss_curve=[(10, 0.2), (20, 0.1)],
        seconds=42.0,
    )


@pytest.fixture
def registry(tmp_path) -> Registry:
    return Registry((tmp_path / "adapters").as_uri())


def test_name_resolves_to_the_latest_version_and_name_at_vn_to_that_one(registry):
    first = registry.publish("g1", "team-style", lora_weights(1), record())
    second = registry.publish("g1", "team-style", lora_weights(2), record())
    assert (first.version, second.version) == (1, 2)

    key, version, path = registry.resolve("g1", AdapterRef.parse("team-style"))
    assert (key, version) == ("g1/team-style@v2", 2)
    assert open(path, "rb").read() == lora_weights(2)
    assert registry.resolve("g1", AdapterRef.parse("team-style@v1")) == (
        "g1/team-style@v1", 1, str(registry.root) + f"/g1/team-style/v1/{first.weights_sha256}.safetensors"
    )


def test_weights_are_content_addressed_and_metadata_describes_the_run(registry, tmp_path):
    meta = registry.publish("g1", "team-style", lora_weights(), record(user="alice"))
    folder = tmp_path / "adapters" / "g1" / "team-style" / "v1"
    assert sorted(p.name for p in folder.iterdir()) == sorted([f"{meta.weights_sha256}.safetensors", "metadata.json"])
    written = json.loads((folder / "metadata.json").read_text())
    assert written["key"] == adapter_key("g1", "team-style", 1)
    training = written["training"]
    assert training["recipe"]["unet_rank"] == 8 and training["recipe"]["text_targets"] == ["q_proj", "k_proj", "v_proj"]
    assert training["trained_by"]["user_id"] == "alice"
    for field in ("base_model", "base_model_sha256", "dataset_sha256", "steps", "loss_curve"):
        assert training[field]


def test_unknown_names_and_versions_are_reported_with_what_exists(registry):
    registry.publish("g1", "team-style", lora_weights(), record())
    with pytest.raises(AdapterNotFound, match="no adapter named 'other'; /skill-adapters"):
        registry.resolve("g1", AdapterRef.parse("other"))
    with pytest.raises(AdapterNotFound, match="'team-style' has no v7; it has v1"):
        registry.resolve("g1", AdapterRef.parse("team-style@v7"))


def test_another_team_can_neither_list_nor_resolve_an_adapter(registry):
    registry.publish("guild-a", "secret-style", lora_weights(), record())
    assert registry.adapters("guild-b") == {}
    with pytest.raises(AdapterNotFound, match="your team has no adapter named 'secret-style'"):
        registry.resolve("guild-b", AdapterRef.parse("secret-style"))
    with pytest.raises(AdapterNotFound):
        registry.resolve("guild-b", AdapterRef.parse("secret-style@v1"))
    assert list(registry.adapters("guild-a")) == ["secret-style"]


@pytest.mark.parametrize("team_id", ["..", "../guild-a", "a/b", "", "x" * 65])
def test_team_ids_cannot_reach_outside_their_folder(registry, team_id):
    with pytest.raises(RegistryError, match="cannot name an adapter folder"):
        registry.resolve(team_id, AdapterRef.parse("team-style"))


def test_a_redelivered_job_gets_its_version_back_instead_of_a_new_one(registry):
    rid = uuid.uuid4().hex
    first = registry.publish("g1", "team-style", lora_weights(1), record(rid))
    again = registry.publish("g1", "team-style", lora_weights(2), record(rid))
    assert again == first
    assert registry.versions("g1", "team-style") == [1]
    assert registry.find_request("g1", "team-style", rid) == first
    assert registry.find_request("g1", "team-style", "other") is None


def test_a_half_published_version_is_invisible_and_skipped(registry, tmp_path):
    (tmp_path / "adapters" / "g1" / "team-style" / "v1").mkdir(parents=True)  # a publisher died here
    assert registry.versions("g1", "team-style") == []
    meta = registry.publish("g1", "team-style", lora_weights(), record())
    assert meta.version == 2
    assert registry.resolve("g1", AdapterRef.parse("team-style")).version == 2


def test_only_safetensors_lora_weights_are_accepted(registry):
    with pytest.raises(RegistryError, match="not a safetensors file"):
        registry.publish("g1", "x", pickle.dumps({"w": [1.0]}), record())
    with pytest.raises(RegistryError, match="not a LoRA tensor"):
        registry.publish("g1", "x", save({"conv_in.weight": np.zeros(4, np.float32)}), record())
    truncated = lora_weights()[:-16]
    with pytest.raises(RegistryError, match="outside the file"):
        check_safetensors(truncated)
    assert registry.versions("g1", "x") == []


def test_tampered_weights_are_refused_on_resolve(registry, tmp_path):
    meta = registry.publish("g1", "team-style", lora_weights(), record())
    path = tmp_path / "adapters" / "g1" / "team-style" / "v1" / meta.weights_file
    path.write_bytes(lora_weights(seed=9))
    with pytest.raises(RegistryError, match="do not match their sha256"):
        registry.resolve("g1", AdapterRef.parse("team-style"))


def test_a_remote_registry_resolves_to_a_verified_local_copy(tmp_path):
    registry = Registry(f"memory://adapters-{uuid.uuid4().hex}", cache_dir=tmp_path / "cache")
    meta = registry.publish("T01", "slack-style", lora_weights(), record())
    resolved = registry.resolve("T01", AdapterRef.parse("slack-style"))
    assert resolved.path == str(tmp_path / "cache" / meta.weights_file)
    assert open(resolved.path, "rb").read() == lora_weights()


def test_the_registry_and_the_commands_import_no_torch():
    code = "import sys, skillgen.adapters.registry, bots.train_commands; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
