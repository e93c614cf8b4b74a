"""What makes two requests the same picture: the seed a request gets when it names none, the cache key,
the batch key, and the adapter a request resolves to."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from schemas.messages import MAX_SEED, AdapterRef, GenerateRequest
from skillgen.inference.errors import AdapterError

log = logging.getLogger("skillgen.consumer")

# Bump when the meaning of a cached value changes: old entries then simply stop matching.
# 2: values are signed envelopes (consumer/cache.py), keys carry the safety policy's fingerprint.
CACHE_KEY_VERSION = 2
_WEIGHT_SUFFIXES = (".safetensors", ".json", ".txt")
_CHUNK_BYTES = 8 * 1024 * 1024


def _digest(obj) -> bytes:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).digest()


def content(req: GenerateRequest) -> dict:
    """Every request field that decides the pixels, except the seed. An img2img request adds its init image (by
    sha256: the same bytes wherever they are stored), strength and upscale; a text-to-image request's content is
    what it was before img2img existed, so its seeds and cache keys did not change; the same for turbo."""
    body = {
        "prompt": req.prompt,
        "negative_prompt": req.negative_prompt,
        "width": req.width,
        "height": req.height,
        "steps": req.steps,
        "guidance": req.guidance,
        "scheduler": req.scheduler,
        "adapter": str(req.adapter) if req.adapter else None,
    }
    if req.init_image is not None:
        body.update(init_image=req.init_image.sha256, strength=req.strength, upscale=req.upscale)
    if req.turbo:  # (only when asked for: the keys of every other request stay what they were)
        body["turbo"] = True
    return body


def seed_of(req: GenerateRequest) -> int:
    """The request's seed, or one derived from its content so identical requests make identical pictures;
    a re-roll (reroll > 0) derives a different one."""
    if req.seed is not None:
        return req.seed
    return int.from_bytes(_digest({**content(req), "reroll": req.reroll})[:8], "big") % (MAX_SEED + 1)


def image_seeds(req: GenerateRequest) -> list[int]:
    base = seed_of(req)
    return [(base + i) % (MAX_SEED + 1) for i in range(req.num_images)]


# -- adapters ---------------------------------------------------------------------------------------------


class ResolvedAdapter(BaseModel):
    """A LoRA adapter pinned to one version: what the registry answers for `name[@vN]` in a team."""

    model_config = ConfigDict(frozen=True)

    name: str
    version: int = Field(ge=1)
    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @property
    def key(self) -> str:
        """The name the backend loads it under; a new version gets a new key, so batches never mix them."""
        return f"{self.name}-v{self.version}-{self.sha256[:12]}"


# (adapter named by the request, the requester's team id) -> the version to use. Raises AdapterError with a
# message for the requester. The trainer's adapter registry provides the real one.
AdapterResolver = Callable[[AdapterRef, str], ResolvedAdapter]


def no_registry(ref: AdapterRef, team_id: str) -> ResolvedAdapter:
    raise AdapterError(f"adapter {ref} cannot be used: adapter registry not configured on this consumer")


FAST_ADAPTER_NAME = "turbo"
_MAX_SAFETENSORS_HEADER_BYTES = 100 * 1024 * 1024


def fast_adapter(path: Path) -> ResolvedAdapter:
    """The adapter turbo requests resolve to: the fast LoRA at `path` (SKILL_FAST_LORA), checked to be a readable
    safetensors file and hashed once at start, so its weights enter every turbo cache key and batch key. Raises
    ValueError naming SKILL_FAST_LORA, so a consumer with a bad one does not start."""
    where = f"SKILL_FAST_LORA={path}"
    if path.suffix != ".safetensors":
        raise ValueError(f"{where}: the fast LoRA must be a .safetensors file (LoRA weights are never pickles)")
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = int.from_bytes(head, "little") if len(head) == 8 else 0
            header = f.read(size) if 0 < size <= _MAX_SAFETENSORS_HEADER_BYTES else b""
            try:
                ok = isinstance(json.loads(header), dict)
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"{where}: not a safetensors file (its header does not read)")
            h.update(head + header)
            while chunk := f.read(_CHUNK_BYTES):
                h.update(chunk)
    except OSError as exc:
        raise ValueError(f"{where}: cannot read the fast LoRA: {exc.strerror or exc}") from None
    return ResolvedAdapter(name=FAST_ADAPTER_NAME, version=1, path=str(path), sha256=h.hexdigest())


# -- keys -------------------------------------------------------------------------------------------------


def cache_key(req: GenerateRequest, model: str, adapter: ResolvedAdapter | None, policy: str) -> str:
    """Hash of everything that decides the pixels, and of the policy that let them be shown. `model` names the
    model and its weights (see `model_identity`); the adapter enters by version and weights hash, never by name
    alone; `policy` is the safety policy's fingerprint (skillgen.safety.fingerprint), so an image cached under
    one policy is a miss under another."""
    body = {
        "v": CACHE_KEY_VERSION,
        "model": model,
        "policy": policy,
        **content(req),
        "adapter": adapter.model_dump(include={"name", "version", "sha256"}) if adapter else None,
        "seeds": image_seeds(req),
    }
    return _digest(body).hex()


class BatchKey(NamedTuple):
    """Requests share a batch only when all of these match; `solo` gives a request a batch of its own."""

    width: int
    height: int
    steps: int
    guidance: float
    scheduler: str
    adapter: str | None = None
    solo: str | None = None
    # img2img: the strength every sample of the batch is redrawn at; None for text-to-image, so the two never mix.
    strength: float | None = None


def batch_key(req: GenerateRequest, adapter: ResolvedAdapter | None) -> BatchKey:
    return BatchKey(req.width, req.height, req.steps, req.guidance, req.scheduler, adapter.key if adapter else None,
                    strength=req.strength if req.init_image is not None else None)


# -- the model's identity ------------------------------------------------------------------------------------


def weights_sha256(model: str) -> str | None:
    """SHA-256 over the files a diffusers pipeline loads from `model` (a directory, or a hub id already in
    the local hub cache): model_index.json and each component folder's configs, vocabularies and
    safetensors. None when the files cannot be found."""
    root = Path(model)
    if not root.is_dir():
        try:
            from huggingface_hub import snapshot_download

            root = Path(snapshot_download(model, local_files_only=True))
        except Exception:  # noqa: BLE001 - any hub failure means: no local files to hash
            return None
    index = root / "model_index.json"
    if not index.is_file():
        return None
    components = [k for k, v in json.loads(index.read_text()).items() if isinstance(v, list) and v[0]]
    files = [index] + sorted(
        p
        for c in components
        if (root / c).is_dir()
        for p in (root / c).rglob("*")
        if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES) and not p.name.startswith(".")
    )
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(root)).encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(_CHUNK_BYTES):
                h.update(chunk)
    return h.hexdigest()


def model_identity(model: str, backend: str, precision: str) -> str:
    """What the cache key knows about the model: its id, its weights' hash, and the backend and precision,
    which move pixels too."""
    digest = weights_sha256(model)
    if digest is None:
        log.warning("cannot hash the weights of %s: cache keys use its name alone", model)
    return f"{model}|{digest or 'unhashed'}|{backend}|{precision}"


def registry_resolver(adapter_url: str) -> AdapterResolver:
    """Adapters from the team registry: `name` is the team's latest version, `name@vN` that one."""
    from skillgen.adapters.registry import Registry, RegistryError

    registry = Registry(adapter_url)

    def resolve(ref: AdapterRef, team_id: str) -> ResolvedAdapter:
        try:
            found = registry.resolve(team_id, ref)
        except RegistryError as exc:
            raise AdapterError(str(exc)) from None
        return ResolvedAdapter(name=ref.name, version=found.version, path=found.path, sha256=found.sha256)

    return resolve
