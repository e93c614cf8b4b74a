"""Cache keys hash everything that decides the pixels and nothing else; batch keys group compatible requests."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from consumer.keys import (
    BatchKey,
    ResolvedAdapter,
    batch_key,
    cache_key,
    content,
    fast_adapter,
    image_seeds,
    model_identity,
    no_registry,
    seed_of,
    weights_sha256,
)
from schemas.messages import AdapterRef, BlobRef, GenerateRequest, Origin
from skillgen.inference import AdapterError

pytestmark = pytest.mark.unit

ORIGIN = Origin(platform="console", team_id="t1", channel_id="c", user_id="u")
MODEL = "models/x|abc|torch|fp16"
POLICY = "0123456789abcdef"
V1 = ResolvedAdapter(name="ink", version=1, path="/a/ink/v1", sha256="1" * 64)
V2 = ResolvedAdapter(name="ink", version=2, path="/a/ink/v2", sha256="2" * 64)


def req(**kw) -> GenerateRequest:
    fields = {"prompt": "a drummer's paradiddle", "width": 64, "height": 64, "steps": 4, **kw}
    return GenerateRequest(origin=ORIGIN, **fields)


def test_a_request_without_a_seed_gets_one_from_its_content():
    assert seed_of(req()) == seed_of(req())
    assert seed_of(req()) != seed_of(req(negative_prompt="blur"))
    assert seed_of(req(reroll=1)) != seed_of(req())
    assert seed_of(req(seed=7)) == 7
    assert image_seeds(req(seed=7, num_images=3)) == [7, 8, 9]


def test_identical_requests_share_a_cache_key_whoever_sends_them():
    other = Origin(platform="slack", team_id="T2", channel_id="D1", user_id="U2")
    a, b = req(), GenerateRequest(**{**req().model_dump(), "origin": other, "request_id": "other"})
    assert cache_key(a, MODEL, None, POLICY) == cache_key(b, MODEL, None, POLICY)


@pytest.mark.parametrize(
    "change",
    [
        {"prompt": "a violinist's bow hold"},
        {"negative_prompt": "blurry"},
        {"seed": 1},
        {"width": 128},
        {"height": 128},
        {"steps": 5},
        {"scheduler": "euler"},
        {"guidance": 3.0},
        {"num_images": 2},
        {"reroll": 1},
    ],
)
def test_every_field_that_decides_the_pixels_changes_the_cache_key(change):
    assert cache_key(req(**change), MODEL, None, POLICY) != cache_key(req(), MODEL, None, POLICY)


def test_model_weights_and_adapter_version_change_the_cache_key():
    base = cache_key(req(), MODEL, None, POLICY)
    assert cache_key(req(), "models/x|abd|torch|fp16", None, POLICY) != base
    assert cache_key(req(), "models/x|abc|onnx|fp16", None, POLICY) != base
    with_v1 = cache_key(req(adapter=AdapterRef(name="ink")), MODEL, V1, POLICY)
    with_v2 = cache_key(req(adapter=AdapterRef(name="ink")), MODEL, V2, POLICY)
    assert len({base, with_v1, with_v2}) == 3
    retrained = V1.model_copy(update={"sha256": "3" * 64})
    assert cache_key(req(adapter=AdapterRef(name="ink")), MODEL, retrained, POLICY) != with_v1


@pytest.mark.security
def test_the_same_request_under_another_safety_policy_is_another_key():
    # an image cached under a looser policy is never served under a stricter one
    assert cache_key(req(), MODEL, None, POLICY) != cache_key(req(), MODEL, None, "fedcba9876543210")


def test_batch_key_groups_by_shape_and_adapter_version_not_by_prompt_or_seed():
    assert batch_key(req(seed=1), None) == batch_key(req(prompt="juggling", seed=2), None)
    assert batch_key(req(), None) == BatchKey(64, 64, 4, 7.5, "dpmpp", None)
    differing = [req(width=128), req(steps=5), req(scheduler="euler"), req(guidance=2.0)]
    assert len({batch_key(r, None) for r in [req(), *differing]}) == 5
    assert batch_key(req(), V1) != batch_key(req(), V2) != batch_key(req(), None)
    assert V1.key != V2.key and "." not in V1.key  # torch module names cannot hold dots


def init(sha: str = "ab" * 32, **kw) -> BlobRef:
    return BlobRef(url=f"file:///blobs/{sha[:2]}/{sha}.png", sha256=sha, bytes=100, **kw)


def test_the_init_image_strength_and_upscale_change_the_cache_key_and_text_to_image_keys_do_not():
    keys = {
        cache_key(r, MODEL, None, POLICY)
        for r in [
            req(), req(init_image=init()), req(init_image=init("cd" * 32)), req(init_image=init(), strength=0.3),
            req(width=128, height=128), req(width=128, height=128, init_image=init(), upscale=2),
        ]
    }
    assert len(keys) == 6
    # The same bytes under another URL (another copy of the store) are the same picture.
    moved = init().model_copy(update={"url": f"s3://other/ab/{'ab' * 32}.png"})
    assert cache_key(req(init_image=moved), MODEL, None, POLICY) == cache_key(req(init_image=init()), MODEL, None, POLICY)
    # A text-to-image request hashes exactly what it hashed before img2img existed: cached pictures stay valid.
    assert set(content(req())) == {"prompt", "negative_prompt", "width", "height", "steps", "guidance", "scheduler",
                                   "adapter"}


def test_img2img_batches_by_strength_and_never_with_text_to_image():
    txt = batch_key(req(), None)
    assert txt.strength is None
    a, b = batch_key(req(init_image=init(), strength=0.5), None), batch_key(req(init_image=init("cd" * 32)), None)
    assert a.strength == 0.5 and b.strength == 0.6
    assert len({txt, a, b}) == 3
    # Different init images (and an upscale of a half-size one) at the same strength and output size share a batch.
    assert batch_key(req(init_image=init()), None) == b
    up = req(width=128, height=128, init_image=init(), upscale=2)
    assert batch_key(up, None) == batch_key(req(width=128, height=128, init_image=init("ef" * 32)), None)


def test_without_a_registry_an_adapter_fails_with_a_clear_message():
    with pytest.raises(AdapterError, match="adapter registry not configured"):
        no_registry(AdapterRef.parse("ink@v2"), "t1")


def test_weights_hash_covers_the_components_files(tmp_path):
    index = {"_class_name": "X", "unet": ["diffusers", "U"], "safety_checker": [None, None]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    (tmp_path / "unet").mkdir()
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"\x00" * 100)
    (tmp_path / "unet" / "config.json").write_text("{}")
    (tmp_path / "README.md").write_text("not a weight")
    first = weights_sha256(str(tmp_path))
    (tmp_path / "README.md").write_text("still not a weight")
    assert weights_sha256(str(tmp_path)) == first
    weights.write_bytes(b"\x00" * 99 + b"\x01")
    assert weights_sha256(str(tmp_path)) not in (None, first)
    assert weights_sha256(str(tmp_path / "missing")) is None
    identity = model_identity(str(tmp_path), "torch", "fp32")
    assert identity.endswith("|torch|fp32") and weights_sha256(str(tmp_path)) in identity


# -- turbo: the fast LoRA as an adapter ---------------------------------------------------------------------

TURBO = ResolvedAdapter(name="turbo", version=1, path="/models/lcm/pytorch_lora_weights.safetensors", sha256="7" * 64)


def test_a_turbo_request_has_its_own_cache_key_seed_and_batch_key():
    turbo, plain = req(turbo=True, steps=4, guidance=1.0), req(scheduler="lcm", steps=4, guidance=1.0)
    assert content(turbo) == {**content(plain), "turbo": True} and "turbo" not in content(plain)
    assert seed_of(turbo) != seed_of(plain)
    assert cache_key(turbo, MODEL, TURBO, POLICY) != cache_key(plain, MODEL, None, POLICY)
    # the fast LoRA enters by its weights' hash: another LoRA file, another picture
    retrained = TURBO.model_copy(update={"sha256": "8" * 64})
    assert cache_key(turbo, MODEL, retrained, POLICY) != cache_key(turbo, MODEL, TURBO, POLICY)
    assert batch_key(turbo, TURBO) == BatchKey(64, 64, 4, 1.0, "lcm", TURBO.key)
    assert batch_key(turbo, TURBO) != batch_key(plain, None)


@pytest.mark.parametrize(
    ("changes", "adapter", "key"),
    [  # computed before turbo existed: every other request keeps its cache key (and so its seed)
        ({}, None, "1a8401d2947510cde55213327f2ab230d4819e44f7cb810e8af28e0261e08885"),
        ({"adapter": AdapterRef(name="ink")}, V1, "f2baecf707ca0e6c90d54bea6be8808698c5d2536690c7bc62a1f4a3049e066e"),
        ({"init_image": init()}, None, "d1e618ac7acd9d78caca22f54c4f45244edd642f434a8a006ab5cbb467e251e4"),
        ({"num_images": 3}, None, "d3e9d3b779be16d958afca5f16078ac6a8b75a6af88c6eb9be44cc3c9c85d33d"),
    ],
)
def test_requests_without_turbo_keep_the_cache_keys_they_had(changes, adapter, key):
    assert cache_key(req(**changes), MODEL, adapter, POLICY) == key


def test_the_fast_lora_becomes_the_turbo_adapter_hashed_once(tmp_path):
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({"unet.down.lora_A.weight": np.ones((4, 8), np.float32)}, str(path))
    adapter = fast_adapter(path)
    assert adapter == ResolvedAdapter(name="turbo", version=1, path=str(path),
                                      sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    assert adapter.key.startswith("turbo-v1-")


def test_a_fast_lora_that_is_not_a_readable_safetensors_file_stops_the_start(tmp_path):
    with pytest.raises(ValueError, match=r"SKILL_FAST_LORA=.*lora\.bin: the fast LoRA must be a \.safetensors file"):
        fast_adapter(tmp_path / "lora.bin")
    with pytest.raises(ValueError, match="SKILL_FAST_LORA=.*: cannot read the fast LoRA: No such file"):
        fast_adapter(tmp_path / "missing.safetensors")
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(ValueError, match="cannot read the fast LoRA"):
        fast_adapter(tmp_path / "dir.safetensors")
    pickle_in_disguise = tmp_path / "w.safetensors"
    pickle_in_disguise.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    with pytest.raises(ValueError, match="not a safetensors file"):
        fast_adapter(pickle_in_disguise)
