"""ONNX Runtime backend: text encoder, UNet and VAE decoder and encoder exported once (cached), run by the best
provider.

Providers, in order when available: TensorRT EP (fp16, engine and timing caches beside the export, shape
profiles for the sizes in use) > CUDA EP (IO binding on torch's own stream, so latents never leave the device)
> CPU EP. A provider whose session cannot be created (TensorRT listed but its libraries missing) is skipped
with a warning, never silently replaced by eager PyTorch.

LoRA: the attention projections are graph inputs (see export.py), also where attention is fused into one
MultiHeadAttention node (it starts after the projections). An adapter's fused weights are made on first use and
kept in a bounded LRU; switching adapters rebinds inputs and never rebuilds a session or an engine. An adapter
that changes other modules (an LCM-LoRA's convolutions) runs on a merged export of its own (merged.py), whose UNet
and text encoder sessions take over while it is active; the VAE stays shared.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from skillgen.inference.errors import AdapterError, ModelLoadError, PipelineError
from skillgen.inference.export import (
    ExportOptions,
    Manifest,
    base_weights_path,
    ensure_export,
    resolve_model_dir,
)
from skillgen.inference.lora import FusedWeights, LoraFactors, read_lora, weights_file
from skillgen.inference.memory import SLICED, Geometry
from skillgen.inference.merged import MergedAdapters, fixed_modules
from skillgen.inference.providers import EP_NAMES, Provider, TrtProfile, provider_order

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "skillgen" / "onnx"


@dataclass
class OrtNetwork:
    """One session; LoRA-able weights are inputs, bound once per adapter switch and kept between runs."""

    session: object
    device: torch.device
    weight_names: list[str]

    def __post_init__(self):
        self.binding = self.session.io_binding()
        self._bound_weights: dict[str, object] | None = None

    def bind_weights(self, weights: dict[str, object]) -> None:
        if weights is self._bound_weights:
            return
        for name in self.weight_names:
            self.binding.bind_ortvalue_input(f"{name}.weight", weights[name])
        self._bound_weights = weights

    def run(self, inputs: dict[str, torch.Tensor], out_shape: Sequence[int]) -> torch.Tensor:
        from onnxruntime import OrtValue

        b = self.binding
        if self.device.type == "cuda":
            keep = []
            for name, t in inputs.items():
                t = t.contiguous()
                keep.append(t)
                b.bind_input(name, "cuda", _index(self.device), _np_dtype(t), list(t.shape), t.data_ptr())
            out = torch.empty(tuple(out_shape), dtype=torch.float32, device=self.device)
            b.bind_output("out", "cuda", _index(self.device), np.float32, list(out.shape), out.data_ptr())
            b.synchronize_inputs()
            self.session.run_with_iobinding(b)
            b.synchronize_outputs()
            return out
        # Not np.ascontiguousarray: it turns the 0-d timestep into shape [1].
        values = {name: OrtValue.ortvalue_from_numpy(t.cpu().contiguous().numpy()) for name, t in inputs.items()}
        for name, value in values.items():
            b.bind_ortvalue_input(name, value)
        b.bind_output("out")
        self.session.run_with_iobinding(b)
        return torch.from_numpy(b.copy_outputs_to_cpu()[0])


def _ort_errors() -> tuple[type[Exception], ...]:
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, RuntimeException

    return (Fail, RuntimeException)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _np_dtype(t: torch.Tensor):
    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}[t.dtype]


class OnnxBackend:
    name = "onnx"

    def __init__(
        self,
        model: str | Path,
        device: str = "auto",
        precision: str = "fp16",
        cache_dir: Path | None = None,
        provider: Provider = "auto",
        max_cached_adapters: int = 4,
        max_loaded_adapters: int = 8,
        trt_profile: TrtProfile | None = None,
        fused_attention: bool | None = None,
        max_merged_adapters: int = 1,
    ):
        """max_merged_adapters: adapters on a merged export (merged.py) whose sessions stay open, each one more UNet
        in memory; 0 refuses such adapters."""
        import onnxruntime as ort

        if max_loaded_adapters < 1:
            raise ValueError("max_loaded_adapters must be at least 1")
        if max_merged_adapters < 0:
            raise ValueError("max_merged_adapters must be 0 (none) or more")
        if precision not in ("fp32", "fp16", "int8"):
            raise PipelineError(f"unknown precision {precision!r}; choose fp32, fp16 or int8")
        self.model_dir = resolve_model_dir(model)
        self.model_id = str(model)
        self.precision = precision
        self._ort = ort
        cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.trt_profile = trt_profile or TrtProfile()
        self._fused_attention = fused_attention  # None: export.ExportOptions decides; TensorRT is always plain

        cfg = {p: json.loads((self.model_dir / p / n).read_text()) for p, n in _CONFIGS}
        self.scheduler_config = cfg["scheduler"]
        self.vae_scale_factor = 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)
        self.vae_scaling_factor = cfg["vae"].get("scaling_factor", 0.18215)
        self.latent_channels = cfg["unet"]["in_channels"]
        self.vae_latent_channels = cfg["vae"].get("latent_channels", 4)
        self.text_dim = cfg["text_encoder"]["hidden_size"]
        self.dtype = torch.float32  # graphs take and give fp32; fp16 lives inside them

        errors = []
        for choice in provider_order(device, provider):
            try:
                self._open(choice, cache_dir)
                break
            except (ModelLoadError, RuntimeError, *_ort_errors()) as exc:
                log.warning("onnx backend: %s provider unavailable (%s); trying the next", choice, exc)
                errors.append(f"{choice}: {exc}")
        else:
            raise ModelLoadError("no ONNX Runtime provider could run this model: " + "; ".join(errors))

        heads = cfg["unet"].get("num_attention_heads") or cfg["unet"]["attention_head_dim"]
        self.geometry = Geometry(
            attention_heads=max(heads) if isinstance(heads, list) else heads,
            vae_channels=cfg["vae"]["block_out_channels"][0],
            dtype_bytes=2 if precision == "fp16" and self.device.type == "cuda" else 4,
            # Counted as materialised even where attention is fused (CPU fp32/int8): ORT's CPU MultiHeadAttention
            # may still hold a score matrix, and the GPU graphs keep plain attention (see export.ExportOptions).
            materializes_attention=True,
        )
        from transformers import CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(self.model_dir / "tokenizer")
        # Adapters' low-rank factors, least recently used first; past max_loaded_adapters the least recently used
        # one that is not active is dropped (with its fused set). Fused sets have their own, smaller LRU.
        self.max_loaded_adapters = max_loaded_adapters
        self._adapters: OrderedDict[str, dict[str, dict[str, LoraFactors]]] = OrderedDict()
        self._fused = FusedWeights(max_cached_adapters)
        self._active: str | None = None
        self._savings = 0
        self._bind(self._base)
        self._routes = dict(self.networks)  # the networks that run now: a merged adapter's UNet and text encoder
        self._merged = MergedAdapters(
            self.model_dir, cache_dir, self.export_dir.name, self.manifest.options, max_merged_adapters,
            self._open_merged,
        )

    def _open(self, choice: str, cache_dir: Path) -> None:
        ort = self._ort
        if self.precision == "int8" and choice != "cpu":
            # Dynamic quantization makes MatMulInteger graphs, which only the CPU EP runs whole.
            raise ModelLoadError("int8 graphs run on the CPU provider only")
        # TensorRT builds its own fp16 engines from plain fp32 graphs.
        graph_precision = "fp32" if choice == "tensorrt" and self.precision == "fp16" else self.precision
        fused = False if choice == "tensorrt" else self._fused_attention
        options = ExportOptions(precision=graph_precision, target=choice, fused_attention=fused)
        usual = ExportOptions(precision=graph_precision, target=choice).fused_attention
        attention = "" if options.fused_attention == usual else "-attn-fused" if fused else "-attn-plain"
        out_dir = cache_dir / f"{options.target}-{options.precision}{attention}-{_short_model_name(self.model_dir)}"
        manifest, built = ensure_export(self.model_dir, out_dir, options)
        if built:
            log.info("onnx backend: exported %s to %s in %.1fs", self.model_dir, out_dir, manifest.seconds)
        self.export_dir, self.manifest = out_dir, manifest
        use_torch_cuda = choice != "cpu" and torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if use_torch_cuda else torch.device("cpu")
        self.provider = EP_NAMES[choice]
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        self._choice, self._session_options = choice, so
        self.networks = {c: self._network(c, out_dir, manifest) for c in manifest.weight_inputs}
        self._base = self._load_base(manifest, out_dir)

    def _network(self, component: str, out_dir: Path, manifest: Manifest) -> OrtNetwork:
        providers = self._providers(self._choice, component, out_dir)
        path = str(out_dir / f"{component}.onnx")
        session = self._ort.InferenceSession(path, self._session_options, providers=providers)
        if session.get_providers()[0] != self.provider:
            raise ModelLoadError(f"{self.provider} refused {component}")
        return OrtNetwork(session, self.device, manifest.weight_inputs[component])

    def _open_merged(self, out_dir: Path, manifest: Manifest, components: tuple[str, ...]) -> dict[str, OrtNetwork]:
        base = self._load_base(manifest, out_dir, components)
        networks = {c: self._network(c, out_dir, manifest) for c in components}
        for c, net in networks.items():
            net.bind_weights(base[c]["values"])
        return networks

    def _providers(self, choice: str, component: str, out_dir: Path) -> list:
        cpu = ("CPUExecutionProvider", {})
        if choice == "cpu":
            return [cpu]
        cuda_opts: dict[str, str] = {"device_id": str(_index(self.device)) if self.device.type == "cuda" else "0"}
        if self.device.type == "cuda":
            # Run on torch's stream: inputs written by torch are ready without a device-wide sync.
            cuda_opts["has_user_compute_stream"] = "1"
            cuda_opts["user_compute_stream"] = str(torch.cuda.current_stream(self.device).cuda_stream)
        cuda = ("CUDAExecutionProvider", cuda_opts)
        if choice == "cuda":
            return [cuda, cpu]
        cache = out_dir / "trt"
        cache.mkdir(exist_ok=True)
        shapes = self.trt_profile.shapes(component, self.latent_channels, self.text_dim, self.vae_scale_factor)
        trt_opts = {
            **cuda_opts,
            "trt_fp16_enable": self.precision == "fp16",
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache),
            "trt_profile_min_shapes": shapes["min"],
            "trt_profile_opt_shapes": shapes["opt"],
            "trt_profile_max_shapes": shapes["max"],
        }
        return [("TensorrtExecutionProvider", trt_opts), cuda, cpu]

    def _load_base(self, manifest: Manifest, out_dir: Path, components=None) -> dict[str, dict[str, object]]:
        from safetensors.numpy import load_file

        base = {}
        for component in components or manifest.weight_inputs:
            names = manifest.weight_inputs[component]
            arrays = load_file(base_weights_path(out_dir, component)) if names else {}
            base[component] = {"arrays": arrays, "values": self._to_ort(arrays)}
        return base

    def _to_ort(self, arrays: dict[str, np.ndarray]) -> dict[str, object]:
        kind, idx = ("cuda", _index(self.device)) if self.device.type == "cuda" else ("cpu", 0)
        return {n: self._ort.OrtValue.ortvalue_from_numpy(a, kind, idx) for n, a in arrays.items()}

    def _bind(self, weight_set: dict[str, dict[str, object]]) -> None:
        for component, net in self.networks.items():
            net.bind_weights(weight_set[component]["values"])

    # -- the four networks ------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        tok = self.tokenizer
        return tok(
            list(texts), padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to(self.device, torch.int64)
        return self._routes["text_encoder"].run({"input_ids": ids}, (ids.shape[0], ids.shape[1], self.text_dim))

    def unet(self, latents: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        if self.provider == EP_NAMES["tensorrt"]:
            f = self.vae_scale_factor
            self._check_profile(latents.shape[0], latents.shape[2] * f, latents.shape[3] * f)
        inputs = {
            "sample": latents.float(),
            "timestep": torch.as_tensor(t, device=latents.device).float().reshape(()),
            "encoder_hidden_states": text_emb.float(),
        }
        return self._routes["unet"].run(inputs, latents.shape)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        b, _, h, w = latents.shape
        f = self.vae_scale_factor
        return self.networks["vae_decoder"].run({"latent": latents.float()}, (b, 3, h * f, w * f))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        f = self.vae_scale_factor
        if self.provider == EP_NAMES["tensorrt"]:
            self._check_profile(b, h, w)
        return self.networks["vae_encoder"].run({"image": images.float()}, (b, self.vae_latent_channels, h // f, w // f))

    def _check_profile(self, batch: int, height_px: int, width_px: int) -> None:
        p = self.trt_profile
        sides = (height_px, width_px)
        if batch > 2 * p.max_batch or not all(p.min_side_px <= s <= p.max_side_px for s in sides):
            raise PipelineError(
                f"{sides[1]}x{sides[0]} at batch {batch} is outside this worker's TensorRT profile "
                f"({p.min_side_px}-{p.max_side_px} px, up to {p.max_batch} images)"
            )

    # -- memory ------------------------------------------------------------------------------------------------
    def set_memory_savings(self, level: int) -> None:
        # The graphs are fixed: attention cannot be sliced here; the engine decodes one image at a time from
        # level 1 on, and a batch that still does not fit is split by the engine.
        self._savings = level

    @property
    def slices_decode(self) -> bool:
        return self._savings >= SLICED

    # -- LoRA --------------------------------------------------------------------------------------------------
    def load_adapter(self, key: str, path: str | Path) -> None:
        """Read a diffusers-format LoRA (safetensors) under `key`; loading a key that is loaded is a no-op that
        marks it recently used. May drop the least recently used other adapter (see `loaded_adapters`). One that
        changes modules the export keeps fixed gets a merged export, built here when not cached (slow)."""
        if key in self._adapters:
            self._adapters.move_to_end(key)
            return
        contents = read_lora(path, self.model_dir)
        fixed = fixed_modules(contents, self.manifest.weight_inputs)
        if fixed:
            self._merged.add(key, weights_file(path), contents.components, fixed)
        self._adapters[key] = {} if fixed else contents.factors
        self._evict()

    @property
    def loaded_adapters(self) -> list[str]:
        """The adapters loaded now, least recently used first."""
        return list(self._adapters)

    def use_adapter(self, adapter: str | None) -> None:
        if adapter is not None:
            if adapter not in self._adapters:
                raise AdapterError(f"adapter {adapter!r} is not loaded")
            self._adapters.move_to_end(adapter)
        if adapter != self._active:
            routes = dict(self.networks)
            if adapter in self._merged:
                routes.update(self._merged.networks(adapter))
            plain = adapter is None or adapter in self._merged  # the base networks run with their own weights
            self._bind(self._base if plain else self._fused.get(adapter, self._fuse))
            self._routes, self._active = routes, adapter
        self._evict()  # the adapter active until now may be the one over capacity

    def unload_adapter(self, key: str) -> None:
        """Forget `key` (factors and fused set); unknown keys are ignored. Unloading the active adapter binds the
        base weights again."""
        if key not in self._adapters:
            return
        if key == self._active:
            self._bind(self._base)
            self._routes, self._active = dict(self.networks), None
        del self._adapters[key]
        self._fused.discard(key)
        self._merged.discard(key)

    def _evict(self) -> None:
        """Drop least recently used adapters until at most max_loaded_adapters remain, never the active one nor
        the most recently used one (the one just loaded or just put to use)."""
        while len(self._adapters) > self.max_loaded_adapters:
            victim = next((k for k in list(self._adapters)[:-1] if k != self._active), None)
            if victim is None:
                return
            self.unload_adapter(victim)
            log.info("onnx backend: adapter %s dropped (%d stay loaded at most)", victim, self.max_loaded_adapters)

    def _fuse(self, adapter: str) -> dict[str, dict[str, object]]:
        fused = {}
        for component, base in self._base.items():
            changed = {
                name: base["arrays"][name] + f.delta()
                for name, f in self._adapters[adapter].get(component, {}).items()
            }
            values = dict(base["values"])
            values.update(self._to_ort(changed))
            fused[component] = {"arrays": changed, "values": values}
        return fused


_CONFIGS = (
    ("scheduler", "scheduler_config.json"),
    ("vae", "config.json"),
    ("unet", "config.json"),
    ("text_encoder", "config.json"),
)


def _short_model_name(model_dir: Path) -> str:
    import hashlib

    return hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:12]
