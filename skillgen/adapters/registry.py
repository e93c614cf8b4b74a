"""The adapter registry: a team's LoRA adapters, versioned, as safetensors with a metadata JSON beside them.

    <root>/<team>/<name>/v<N>/<sha256>.safetensors   the weights, named by their content, checked on every read
    <root>/<team>/<name>/v<N>/metadata.json          AdapterMeta: base model, ranks, targets, data, loss, who

The root is any fsspec URL (file:// by default, s3:// in production). A version exists once its metadata.json
does (written last, by rename), so a reader never sees half an adapter. Every lookup is inside one team's
folder: another team can neither list nor resolve it. No torch here: the consumer and the bots import it.

The consumer resolves `--adapter name[@vN]` with `Registry(url).resolve(team_id, ref)`; the returned key names
team, adapter and version, so it is what the engine loads the adapter under and what result caches key on.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import struct
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import fsspec
from pydantic import BaseModel, Field

from schemas.messages import AdapterRef, BlobRef, Platform
from skillgen.adapters.recipe import LoraRecipe

DEFAULT_ADAPTER_URL = "file://./out/adapters"
TEAM_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
VERSION_RE = re.compile(r"^v([1-9][0-9]{0,5})$")
METADATA = "metadata.json"
MAX_HEADER_BYTES = 16 * 1024 * 1024


class RegistryError(RuntimeError):
    """Root of what the registry raises; the message is fit for the person who asked."""


class AdapterNotFound(RegistryError):
    pass


class TrainedBy(BaseModel):
    platform: Platform
    user_id: str
    channel_id: str


class TrainingRecord(BaseModel):
    """What the trainer knows about the run that made an adapter."""

    request_id: str
    trained_by: TrainedBy
    trigger: str
    base_model: str
    base_model_sha256: str
    recipe: LoraRecipe
    steps: int
    resolution_px: int
    dataset_sha256: str
    images: int
    loss_curve: list[tuple[int, float]] = Field(description="(step, mean loss over the steps since the last point)")
    seconds: float
    sample_grid: BlobRef | None = None
    # Set instead of sample_grid when the image check withheld a cell: its reason, written for the person who asked.
    sample_grid_withheld: str | None = None


class AdapterMeta(BaseModel):
    team_id: str
    name: str
    version: int
    key: str
    weights_file: str
    weights_sha256: str
    weights_bytes: int
    created_at: datetime
    training: TrainingRecord


class Resolved(NamedTuple):
    key: str
    version: int
    path: str

    @property
    def sha256(self) -> str:
        return Path(self.path).stem  # weights files are named by their content's hash


def adapter_key(team_id: str, name: str, version: int) -> str:
    """The engine's name for a loaded adapter and the cache keys' view of it: unique per team, name and version."""
    return f"{team_id}/{name}@v{version}"


def check_safetensors(data: bytes) -> dict:
    """The header of a safetensors LoRA file; RegistryError for anything else (pickles included)."""
    if len(data) < 8:
        raise RegistryError("adapter weights are not a safetensors file (too short)")
    (size,) = struct.unpack("<Q", data[:8])
    if size > min(MAX_HEADER_BYTES, len(data) - 8):
        raise RegistryError("adapter weights are not a safetensors file (bad header length)")
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RegistryError("adapter weights are not a safetensors file (header is not JSON)") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"} if isinstance(header, dict) else {}
    if not tensors:
        raise RegistryError("adapter weights hold no tensors")
    body = len(data) - 8 - size
    for name, info in tensors.items():
        start, end = (info.get("data_offsets") or (None, None)) if isinstance(info, dict) else (None, None)
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= body):
            raise RegistryError(f"adapter weights: tensor {name!r} lies outside the file")
        if "lora" not in name:
            raise RegistryError(f"adapter weights: {name!r} is not a LoRA tensor")
    return header


class Registry:
    def __init__(self, url: str, cache_dir: str | Path | None = None):
        if url.startswith("file://"):
            url = "file://" + os.path.abspath(url.removeprefix("file://"))
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.local = "file" in self.fs.protocol
        self.cache_dir = Path(cache_dir or Path(tempfile.gettempdir()) / "skillgen-adapters")
        self._verified: set[str] = set()

    # -- paths --------------------------------------------------------------------------------------------
    def _team(self, team_id: str) -> str:
        if not TEAM_ID_RE.fullmatch(team_id):
            raise RegistryError(f"team id {team_id!r} cannot name an adapter folder (letters, digits, '_', '-')")
        return posixpath.join(self.root, team_id)

    def _adapter(self, team_id: str, name: str) -> str:
        return posixpath.join(self._team(team_id), AdapterRef(name=name).name)

    # -- reading ------------------------------------------------------------------------------------------
    def versions(self, team_id: str, name: str) -> list[int]:
        """Published versions of one adapter, oldest first."""
        found = []
        for path in self.fs.glob(posixpath.join(self._adapter(team_id, name), "v*", METADATA)):
            m = VERSION_RE.fullmatch(posixpath.basename(posixpath.dirname(path)))
            if m:
                found.append(int(m.group(1)))
        return sorted(found)

    def meta(self, team_id: str, name: str, version: int) -> AdapterMeta:
        path = posixpath.join(self._adapter(team_id, name), f"v{version}", METADATA)
        try:
            with self.fs.open(path, "rb") as f:
                return AdapterMeta.model_validate_json(f.read())
        except FileNotFoundError:
            raise AdapterNotFound(f"adapter {name}@v{version} does not exist") from None

    def adapters(self, team_id: str) -> dict[str, list[AdapterMeta]]:
        """Every adapter of the team with its versions, oldest first; names sorted."""
        out: dict[str, list[AdapterMeta]] = {}
        for path in sorted(self.fs.glob(posixpath.join(self._team(team_id), "*", "v*", METADATA))):
            version_dir = posixpath.dirname(path)
            if VERSION_RE.fullmatch(posixpath.basename(version_dir)):
                with self.fs.open(path, "rb") as f:
                    meta = AdapterMeta.model_validate_json(f.read())
                out.setdefault(meta.name, []).append(meta)
        return {name: sorted(metas, key=lambda m: m.version) for name, metas in sorted(out.items())}

    def find_request(self, team_id: str, name: str, request_id: str) -> AdapterMeta | None:
        """The version a request already published: a redelivered job must not make a second one."""
        for version in reversed(self.versions(team_id, name)):
            meta = self.meta(team_id, name, version)
            if meta.training.request_id == request_id:
                return meta
        return None

    def resolve(self, team_id: str, ref: AdapterRef) -> Resolved:
        """(key, version, local path of the verified safetensors) for `name` (latest) or `name@vN`."""
        versions = self.versions(team_id, ref.name)
        if not versions:
            raise AdapterNotFound(f"your team has no adapter named {ref.name!r}; /skill-adapters lists yours")
        version = versions[-1] if ref.version is None else ref.version
        if version not in versions:
            have = ", ".join(f"v{v}" for v in versions)
            raise AdapterNotFound(f"adapter {ref.name!r} has no v{version}; it has {have}")
        meta = self.meta(team_id, ref.name, version)
        return Resolved(meta.key, version, self._local_weights(team_id, meta))

    def _local_weights(self, team_id: str, meta: AdapterMeta) -> str:
        remote = posixpath.join(self._adapter(team_id, meta.name), f"v{meta.version}", meta.weights_file)
        path = remote if self.local else str(self.cache_dir / meta.weights_file)
        if path in self._verified:
            return path
        if self.local:
            with self.fs.open(remote, "rb") as f:
                data = f.read()
        else:
            cached = Path(path)
            data = cached.read_bytes() if cached.exists() else self.fs.cat_file(remote)
        if hashlib.sha256(data).hexdigest() != meta.weights_sha256:
            raise RegistryError(f"adapter {meta.name}@v{meta.version}: weights do not match their sha256")
        if not self.local and not Path(path).exists():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            Path(tmp).write_bytes(data)
            os.replace(tmp, path)
        self._verified.add(path)
        return path

    # -- writing ------------------------------------------------------------------------------------------
    def publish(self, team_id: str, name: str, weights: bytes, training: TrainingRecord) -> AdapterMeta:
        """Store `weights` as the next version of `team_id`/`name`; a request that already published gets its
        version back unchanged."""
        check_safetensors(weights)
        existing = self.find_request(team_id, name, training.request_id)
        if existing is not None:
            return existing
        base = self._adapter(team_id, name)
        digest = hashlib.sha256(weights).hexdigest()
        while True:
            taken = [int(m.group(1)) for p in self.fs.glob(posixpath.join(base, "v*"))
                     if (m := VERSION_RE.fullmatch(posixpath.basename(p)))]
            version = max(taken, default=0) + 1
            folder = posixpath.join(base, f"v{version}")
            try:
                # On a local disk mkdir is the lock between two publishers; object stores have no folders.
                self.fs.makedirs(folder, exist_ok=False)
                break
            except FileExistsError:
                continue
        meta = AdapterMeta(
            team_id=team_id,
            name=name,
            version=version,
            key=adapter_key(team_id, name, version),
            weights_file=f"{digest}.safetensors",
            weights_sha256=digest,
            weights_bytes=len(weights),
            created_at=datetime.now(timezone.utc),
            training=training,
        )
        self._write(posixpath.join(folder, meta.weights_file), weights)
        self._write(posixpath.join(folder, METADATA), meta.model_dump_json(indent=2).encode())
        return meta

    def _write(self, path: str, data: bytes) -> None:
        tmp = f"{path}.tmp-{os.getpid()}"
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        self.fs.mv(tmp, path)
