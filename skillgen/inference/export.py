"""Export a diffusers Stable Diffusion to ONNX (text encoder, UNet, VAE decoder and encoder), cached by a content
hash.

Batch and spatial axes are dynamic. The weights of the attention projections (`lora_targets`) are graph inputs
rather than initializers, so a LoRA adapter is applied by feeding fused weights: switching adapters never
rebuilds a session or a TensorRT engine, and the base weights are never modified. A LoRA that changes other
modules (an LCM-LoRA's convolutions) is fused into a copy of the model, exported here like any model (merged.py).

An export directory holds one precision for one kind of execution provider and a `manifest.json` written last,
with the hash key of the model and the options and a sha256 of every file. A directory whose key differs
(stale) or whose files do not match their digests (corrupt, truncated) is rebuilt, never used.

What is hand-written and why:
- the weights-as-inputs wrapper: the TorchScript exporter cannot trace `torch.func.functional_call`, so each
  target Linear reads its weight from a forward argument instead;
- the UNet is traced at a latent size that is not a multiple of its upsampling factor, which makes diffusers
  pass explicit upsample sizes: the graph then serves every size, not only multiples of 64 pixels;
- fused attention (attention.py, CPU fp32 and int8 exports): each attention after its Q/K/V projections becomes
  one com.microsoft MultiHeadAttention node, so the weights stay inputs and LoRA switching is unchanged.
FP16 uses ONNX Runtime's transformer optimizer (`optimize_model(...).convert_float_to_float16`), INT8 uses
`onnxruntime.quantization.quantize_dynamic` (precision.py).

Measured for issue 18 (bench model of `skillgen bench pipeline`, UNet at 256x256, CFG batch 2, one thread, CPU
time of the calling thread, variants interleaved in one process on a 2-core AMD EPYC shared with other work):
projection weights as constants instead of inputs: 1.00x (no gain: fed weights cost nothing here); ONNX Runtime's
transformer optimizer on the constant graph: 0.96-0.97x, and it fused 0 of 32 attentions (its UNet patterns do not
match our torch 2.13 export, at opt_level 0 or 1, even with its numpy>=2.4 int() bug patched); its LoRA-aware
fusion emits packed QKV/KV MultiHeadAttention, which the CPU provider refuses ("not implemented for CPU");
low-rank branches x*A*B beside constant weights (rank 16, zero): 0.96x unfused, 1.06x with our attention fusion;
our attention fusion with the weights still inputs: 1.07-1.15x (the VAE decoder: 1.0x, one attention). Whole
pipeline, 10 steps, process CPU time, 5 interleaved rounds: fused 1.57x plain diffusers, the same with a LoRA
1.58x, plain attention 1.46x. Hence this design: fused attention, weights as inputs, adapters as fed merged
weights (any rank, no per-step cost).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from skillgen.inference.errors import ExportError, ModelLoadError
from skillgen.inference.precision import convert_fp16, quantize_int8

# Bump when the graphs written here change meaning, so older exports become stale. 2: the VAE encoder (img2img).
# 3: fused attention (MultiHeadAttention) in CPU fp32/int8 graphs.
EXPORT_FORMAT = 3
COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
LORA_COMPONENTS = ("text_encoder", "unet")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")
MODEL_PARTS = ("model_index.json", "scheduler", "tokenizer", "text_encoder", "unet", "vae")
MANIFEST = "manifest.json"
class ExportOptions(BaseModel):
    """What an export is for; every field is part of the cache key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    # Fused kernels differ by provider: the CPU EP lacks the CUDA contrib ops, TensorRT wants plain ONNX.
    target: Literal["cpu", "cuda", "tensorrt"] = "cpu"
    opset: int = 17
    lora_targets: tuple[str, ...] = LORA_TARGETS
    # Attention as one MultiHeadAttention node (attention.py). None: on where measured, the CPU provider at fp32
    # and int8; off for fp16 (ORT's optimizer and fp16 converter run there) and the GPU providers (not measured;
    # TensorRT cannot run com.microsoft operators at all).
    fused_attention: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _resolve_fused_attention(cls, data):
        if isinstance(data, dict) and data.get("fused_attention") is None:
            precision, target = data.get("precision", "fp32"), data.get("target", "cpu")
            data = {**data, "fused_attention": target == "cpu" and precision in ("fp32", "int8")}
        return data

    @model_validator(mode="after")
    def _check_fused_attention(self):
        if self.fused_attention and self.target == "tensorrt":
            raise ValueError("TensorRT cannot run fused attention (a com.microsoft operator); export it plain")
        return self


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: int
    key: str
    options: ExportOptions
    files: dict[str, str]  # file name -> sha256
    weight_inputs: dict[str, list[str]]  # component -> modules whose weight is a graph input
    fused_attention: dict[str, int] = {}  # component -> MultiHeadAttention nodes made by attention.py
    seconds: float


def resolve_model_dir(model: str | Path) -> Path:
    path = Path(model)
    if path.is_dir():
        return path
    from diffusers import StableDiffusionPipeline

    try:
        return Path(StableDiffusionPipeline.download(str(model)))
    except Exception as exc:  # the hub client raises many kinds; all mean "no such model here"
        raise ModelLoadError(f"cannot find a diffusers Stable Diffusion at {model}: {exc}") from exc


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def model_digest(model_dir: Path) -> str:
    """sha256 over the names and contents of every file the export reads."""
    h = hashlib.sha256()
    for part in MODEL_PARTS:
        root = model_dir / part
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for p in files:
            if p.exists():
                h.update(str(p.relative_to(model_dir)).encode() + b"\0" + _sha256(p).encode())
    return h.hexdigest()


def export_key(model_dir: Path, options: ExportOptions) -> str:
    import onnxruntime
    import torch

    blob = json.dumps(
        {
            "format": EXPORT_FORMAT,
            "model": model_digest(model_dir),
            "options": options.model_dump(mode="json"),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def read_valid_manifest(out_dir: Path, key: str) -> Manifest | None:
    """The manifest of a complete, current export in `out_dir`, or None when it is missing, stale or corrupt."""
    try:
        manifest = Manifest.model_validate_json((out_dir / MANIFEST).read_text())
    except (OSError, ValidationError, ValueError):
        return None
    if manifest.format != EXPORT_FORMAT or manifest.key != key:
        return None
    for name, digest in manifest.files.items():
        path = out_dir / name
        if not path.is_file() or _sha256(path) != digest:
            return None
    return manifest


def ensure_export(
    model: str | Path, out_dir: Path, options: ExportOptions, progress: bool = False
) -> tuple[Manifest, bool]:
    """Return the manifest of a valid export of `model` in `out_dir`, building it when needed; True if built."""
    model_dir = resolve_model_dir(model)
    key = export_key(model_dir, options)
    out_dir = Path(out_dir)
    manifest = read_valid_manifest(out_dir, key)
    if manifest is not None:
        return manifest, False
    if out_dir.exists() and not _holds_only_export_files(out_dir):
        raise ExportError(f"{out_dir} holds files that are not an ONNX export: choose an empty or new directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        manifest = build_export(model_dir, tmp, options, key, progress=progress)
        if out_dir.exists():
            shutil.rmtree(out_dir)  # stale or corrupt, and only export files: ours to replace
        try:
            tmp.rename(out_dir)
        except OSError:
            # Another process finished the same export first; use theirs if it is whole.
            theirs = read_valid_manifest(out_dir, key)
            if theirs is None:
                raise
            return theirs, False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest, True


def _holds_only_export_files(out_dir: Path) -> bool:
    """True when everything in `out_dir` is a name an export writes: safe to replace, even without a manifest."""
    ours = {MANIFEST, "trt"} | {
        f"{c}{suffix}" for c in COMPONENTS for suffix in (".onnx", ".onnx.data", ".weights.safetensors")
    }
    return all(p.name in ours for p in out_dir.iterdir())


def build_export(model_dir: Path, out: Path, options: ExportOptions, key: str, progress: bool = False) -> Manifest:
    from tqdm import tqdm

    started = time.perf_counter()
    steps = [(c, "export") for c in COMPONENTS]
    if options.precision == "fp16":
        steps += [(c, "fp16") for c in COMPONENTS]
    elif options.precision == "int8":
        steps.append(("unet", "int8"))
    weight_inputs: dict[str, list[str]] = {}
    fused: dict[str, int] = {}
    with tqdm(total=len(steps), desc="onnx export", unit="step", disable=not progress) as bar:
        for component, stage in steps:
            bar.set_postfix_str(f"{stage} {component}")
            path = out / f"{component}.onnx"
            if stage == "export":
                weight_inputs[component], fused[component] = export_component(model_dir, component, path, options)
            elif stage == "fp16":
                convert_fp16(path, component, options.target)
            else:
                quantize_int8(path)
            bar.update()
    files = {p.name: _sha256(p) for p in sorted(out.iterdir()) if p.is_file()}
    manifest = Manifest(
        format=EXPORT_FORMAT,
        key=key,
        options=options,
        files=files,
        weight_inputs=weight_inputs,
        fused_attention=fused,
        seconds=round(time.perf_counter() - started, 2),
    )
    (out / MANIFEST).write_text(manifest.model_dump_json(indent=2))
    return manifest


def export_component(model_dir: Path, component: str, path: Path, options: ExportOptions) -> tuple[list[str], int]:
    """Trace one network to `path` in fp32; returns the modules whose weight became a graph input and how many
    attentions were fused."""
    import torch

    module, call, example, names, dynamic_axes = _traceable(model_dir, component)
    targets = options.lora_targets if component in LORA_COMPONENTS else ()
    linears = {
        name: m
        for name, m in module.named_modules()
        if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)
    }
    wrapper = _weights_as_inputs(module, call, linears)
    weights = tuple(m.weight.detach() for m in linears.values())
    input_names = names + [f"{n}.weight" for n in linears]
    raw = path.parent / f".raw-{component}"
    raw.mkdir()
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # The tracer flags every Python branch on a shape. Those in diffusers' UNet and VAE and in CLIP's
            # attention are fixed for a given model (channel asserts, causal-mask choice at 77 tokens, the
            # upsample-size branch chosen on purpose above), and the legacy-exporter notice is known.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            # The VAE encoder's mean is a strided slice of its moments, which the tracer does not constant-fold.
            warnings.filterwarnings("ignore", "Constant folding - Only steps=1", UserWarning)
            torch.onnx.export(
                wrapper,
                (*example, *weights),
                str(raw / "model.onnx"),
                dynamo=False,  # the dynamo exporter needs onnxscript, which our pins do not carry
                opset_version=options.opset,
                input_names=input_names,
                output_names=["out"],
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
        model = load_onnx(raw / "model.onnx")
        fused = 0
        if options.fused_attention:
            from skillgen.inference.attention import fuse_attention

            fused = fuse_attention(model)
        save_onnx(model, path)
    finally:
        shutil.rmtree(raw, ignore_errors=True)
    if linears:
        from safetensors.torch import save_file

        save_file({n: w.contiguous() for n, w in zip(linears, weights)}, base_weights_path(path.parent, component))
    return list(linears), fused


def base_weights_path(root: Path, component: str) -> Path:
    """The base values of a network's weight inputs (fed whenever no adapter is active)."""
    return root / f"{component}.weights.safetensors"


def _traceable(model_dir: Path, component: str):
    """(module, call(module, *inputs), example inputs, input names, dynamic axes) for one network."""
    import torch

    if component == "text_encoder":
        from transformers import CLIPTextModel

        te = CLIPTextModel.from_pretrained(model_dir / "text_encoder", use_safetensors=True).eval()
        ids = torch.zeros((2, te.config.max_position_embeddings), dtype=torch.int64)
        return (
            te,
            lambda m, input_ids: m(input_ids, return_dict=False)[0],
            (ids,),
            ["input_ids"],
            {"input_ids": {0: "batch"}, "out": {0: "batch"}},
        )
    if component == "unet":
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(model_dir / "unet", use_safetensors=True).eval()
        # Not a multiple of the upsampling factor: diffusers then threads explicit upsample sizes through the
        # graph, so the traced graph is right for every latent size.
        side = 2 ** (len(unet.config.block_out_channels) - 1) * 2 + 1
        sample = torch.randn(2, unet.config.in_channels, side, side)
        emb = torch.randn(2, 77, unet.config.cross_attention_dim)
        return (
            unet,
            lambda m, s, t, e: m(s, t, encoder_hidden_states=e, return_dict=False)[0],
            (sample, torch.tensor(999.0), emb),
            ["sample", "timestep", "encoder_hidden_states"],
            {
                "sample": {0: "batch", 2: "height", 3: "width"},
                "encoder_hidden_states": {0: "batch"},
                "out": {0: "batch", 2: "height", 3: "width"},
            },
        )
    if component == "vae_decoder":
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(model_dir / "vae", use_safetensors=True).eval()
        latent = torch.randn(1, vae.config.latent_channels, 8, 8)
        return (
            vae,
            lambda m, z: m.decode(z, return_dict=False)[0],
            (latent,),
            ["latent"],
            {"latent": {0: "batch", 2: "height", 3: "width"}, "out": {0: "batch", 2: "height", 3: "width"}},
        )
    if component == "vae_encoder":
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(model_dir / "vae", use_safetensors=True).eval()
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        image = torch.randn(1, 3, 8 * f, 8 * f)
        return (
            vae,
            # The latent distribution's mean: deterministic; the engine adds each sample's own noise.
            lambda m, x: m.encode(x, return_dict=False)[0].mode(),
            (image,),
            ["image"],
            {"image": {0: "batch", 2: "height", 3: "width"}, "out": {0: "batch", 2: "height", 3: "width"}},
        )
    raise ExportError(f"unknown component {component!r}")


def _weights_as_inputs(module, call, linears: dict):
    """A module computing `call(module, *inputs)` with the weights of `linears` taken from trailing arguments."""
    import torch
    import torch.nn.functional as F

    class WeightsAsInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self, *args):
            n = len(args) - len(linears)
            for lin, w in zip(linears.values(), args[n:]):
                lin.weight_input = w
            return call(self.inner, *args[:n])

    for lin in linears.values():
        lin.forward = lambda x, lin=lin: F.linear(x, lin.weight_input, lin.bias)
    return WeightsAsInputs()


def load_onnx(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=True)


def save_onnx(model, path: Path) -> None:
    """One graph file plus one weights file: protobuf caps a single file at 2 GB, and SD 1.5's UNet is larger."""
    import onnx

    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
        size_threshold=1024,
    )


# -- CLI: skillgen export onnx -----------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="diffusers Stable Diffusion directory or hub id")
    parser.add_argument("--out", type=Path, required=True, help="directory for this export (reused when current)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--fp16", action="store_true", help="fp16 weights and compute (ORT transformer optimizer)")
    group.add_argument("--int8", action="store_true", help="dynamic INT8 quantization of the UNet's MatMuls")
    parser.add_argument(
        "--target",
        choices=["cpu", "cuda", "tensorrt"],
        default="cpu",
        help="execution provider the graphs are fused for (default cpu; tensorrt exports plain fp32 graphs)",
    )


def run(args) -> int:
    precision = "fp16" if args.fp16 else "int8" if args.int8 else "fp32"
    options = ExportOptions(precision=precision, target=args.target)
    started = time.perf_counter()
    manifest, built = ensure_export(args.model, args.out, options, progress=True)
    verb = "built" if built else "already current"
    print(f"{args.out}: {verb} ({precision}, {args.target}) in {time.perf_counter() - started:.1f}s")
    for name in manifest.files:
        print(f"  {name:28s} {(args.out / name).stat().st_size / 2**20:9.1f} MiB")
    return 0

