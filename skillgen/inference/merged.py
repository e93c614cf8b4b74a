"""LoRAs that fed weights cannot carry, applied by a merged export.

The ONNX graphs take only the attention projections' weights as inputs (export.py), so an adapter that changes
other modules (an LCM-LoRA changes convolutions, feed-forwards, proj_in/out and the time embedding) is fused into
a copy of the base model instead, with diffusers' own `fuse_lora`, and that copy is exported like any model
(`ensure_export`, same options: cached by content hash, rebuilt when stale or corrupt). The copy lives in the
cache directory, named by the base model's digest and the LoRA file's sha256; the parts the LoRA leaves alone are
hard links (or copies) of the base model's files, and a `merged.json` written last holds every file's sha256.

Memory: each merged adapter in use holds one more UNet (and text encoder, when the LoRA changes it) in memory,
so only `capacity` of them keep their sessions open; the VAE is always the base one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from skillgen.inference.errors import AdapterError, ExportError
from skillgen.inference.export import (
    MODEL_PARTS,
    ExportOptions,
    Manifest,
    ensure_export,
    model_digest,
)
from skillgen.inference.lora import LoraContents

log = logging.getLogger(__name__)

MERGED_MANIFEST = "merged.json"


def fixed_modules(contents: LoraContents, weight_inputs: dict[str, list[str]]) -> list[str]:
    """The modules `contents` changes that an export with these weight inputs cannot take as fed weights."""
    fixed = [f"{c}.{m}" for c, modules in sorted(contents.other.items()) for m in modules]
    for component, modules in sorted(contents.factors.items()):
        exposed = set(weight_inputs.get(component, ()))
        fixed += [f"{component}.{m}" for m in sorted(set(modules) - exposed)]
    return fixed


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _is_whole(out: Path) -> bool:
    try:
        files = json.loads((out / MERGED_MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return bool(files) and all((out / n).is_file() and _sha256(out / n) == d for n, d in files.items())


def merge_lora(model_dir: Path, weights: Path, components: Iterable[str], out: Path) -> bool:
    """Make `out` the model in `model_dir` with the LoRA `weights` fused into `components` ("unet",
    "text_encoder"); a whole one already there is reused. True when built."""
    if _is_whole(out):
        return False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_merged(model_dir, weights, sorted(components), tmp)
        files = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / MERGED_MANIFEST).write_text(json.dumps({"lora": weights.name, "files": files}, indent=2))
        if out.exists():
            shutil.rmtree(out)  # not whole: ours to replace
        try:
            tmp.rename(out)
        except OSError:
            if not _is_whole(out):  # another process finished first; keep theirs if whole
                raise
            return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def _write_merged(model_dir: Path, weights: Path, components: list[str], out: Path) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    try:
        with torch.no_grad():
            pipe = StableDiffusionPipeline.from_pretrained(
                str(model_dir), safety_checker=None, requires_safety_checker=False, use_safetensors=True
            )
            # use_safetensors=True: otherwise diffusers may fall back to unpickling a .bin lying beside the file.
            pipe.load_lora_weights(str(weights.parent), weight_name=weights.name, use_safetensors=True)
            pipe.fuse_lora(components=components)
            pipe.unload_lora_weights()  # the fused weights stay; the LoRA layers go
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise AdapterError(f"cannot merge the LoRA at {weights} into {model_dir}: {exc}") from exc
    for component in components:
        module = getattr(pipe, component)
        # diffusers models take safe_serialization; transformers 5 writes safetensors only and takes no such flag.
        kwargs = {"safe_serialization": True} if component == "unet" else {}
        module.save_pretrained(out / component, **kwargs)
    for part in MODEL_PARTS:
        if part not in components and (model_dir / part).exists():
            _link(model_dir / part, out / part)


def _link(src: Path, dst: Path) -> None:
    for path in [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file()):
        target = dst if path == src else dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:  # another file system, or no hard links there
            shutil.copy2(path, target)


@dataclass
class _Merged:
    weights: Path
    components: tuple[str, ...]
    model_dir: Path
    export_dir: Path
    manifest: Manifest | None = None  # checked at load; re-checked when its sessions are opened again later
    networks: dict[str, object] | None = None  # component -> network with its own base weights bound; None: closed


class MergedAdapters:
    """The adapters carried by merged exports; the sessions of the `capacity` most recently used stay open.

    open_networks(export_dir, manifest, components) -> {component: network} opens a merged export's sessions for
    the components the LoRA changes, their own base weights (attention projection inputs) bound.
    """

    def __init__(
        self,
        model_dir: Path,
        cache_dir: Path,
        export_name: str,
        options: ExportOptions,
        capacity: int,
        open_networks: Callable[[Path, Manifest, tuple[str, ...]], dict[str, object]],
    ):
        self.model_dir, self.cache_dir, self.export_name = model_dir, cache_dir, export_name
        self.options, self.capacity, self._open = options, capacity, open_networks
        self._base_digest: str | None = None
        self._merged: OrderedDict[str, _Merged] = OrderedDict()  # least recently used first

    def __contains__(self, key: str) -> bool:
        return key in self._merged

    @property
    def open_adapters(self) -> list[str]:
        """The merged adapters whose sessions are open, least recently used first."""
        return [k for k, m in self._merged.items() if m.networks is not None]

    def add(self, key: str, weights: Path, components: Iterable[str], fixed: list[str]) -> None:
        """Build (or find) the merged export for the LoRA `weights` under `key`; its sessions open on first use."""
        if self.capacity == 0:
            raise AdapterError(
                f"adapter {key!r} changes {len(fixed)} modules the ONNX export keeps fixed (e.g. {fixed[0]}), "
                "which needs a merged export, and this backend keeps none (max_merged_adapters=0); "
                "use the torch backend"
            )
        if self._base_digest is None:
            self._base_digest = model_digest(self.model_dir)
        lora_digest = _sha256(weights)
        name = f"{self._base_digest[:16]}-{lora_digest[:16]}"
        entry = _Merged(
            weights,
            tuple(sorted(components)),
            self.cache_dir / "merged" / name,
            self.cache_dir / f"{self.export_name}-lora-{lora_digest[:16]}",
        )
        entry.manifest = self._prepare(key, entry, reason=f"changes {len(fixed)} modules fed weights cannot carry")
        self._merged[key] = entry

    def _prepare(self, key: str, entry: _Merged, reason: str) -> Manifest:
        started = time.perf_counter()
        merged = merge_lora(self.model_dir, entry.weights, entry.components, entry.model_dir)
        try:
            manifest, exported = ensure_export(entry.model_dir, entry.export_dir, self.options)
        except ExportError as exc:
            raise AdapterError(f"cannot export adapter {key!r} merged into the model: {exc}") from exc
        if merged or exported:
            log.info(
                "onnx backend: merged export of adapter %s (%s) built in %.1fs at %s; each merged adapter in use "
                "holds one more %s in memory",
                key, reason, time.perf_counter() - started, entry.export_dir, " and ".join(entry.components),
            )
        return manifest

    def networks(self, key: str) -> dict[str, object]:
        """The open networks of `key`, opened now if closed; closes the least recently used others past capacity."""
        entry = self._merged[key]
        self._merged.move_to_end(key)
        if entry.networks is None:
            manifest = entry.manifest or self._prepare(key, entry, reason="opened again")
            entry.networks = self._open(entry.export_dir, manifest, entry.components)
            entry.manifest = None  # the next opening checks the files again
        for other in self.open_adapters[: -self.capacity]:
            if other != key:
                self._merged[other].networks = None
                log.info("onnx backend: merged adapter %s closed (%d stay open at most)", other, self.capacity)
        return entry.networks

    def discard(self, key: str) -> None:
        self._merged.pop(key, None)
