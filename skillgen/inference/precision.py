"""Reduced-precision passes over an exported fp32 graph: fp16 through ONNX Runtime's transformer optimizer, INT8
through dynamic quantization. Both rewrite `path` (graph plus one weights file) in place."""

from __future__ import annotations

from pathlib import Path

OPTIMIZER_MODEL_TYPES = {"text_encoder": "clip", "unet": "unet", "vae_decoder": "vae", "vae_encoder": "vae"}
GPU_ONLY_FUSIONS = (
    "enable_nhwc_conv",
    "enable_group_norm",
    "enable_skip_group_norm",
    "enable_bias_splitgelu",
    "enable_packed_qkv",
    "enable_packed_kv",
    "enable_bias_add",
)


def convert_fp16(path: Path, component: str, target: str) -> None:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    from skillgen.inference.export import save_onnx

    model_type = OPTIMIZER_MODEL_TYPES[component]
    options = FusionOptions(model_type)
    # ORT's attention fusions call int() on a one-element array, which numpy >= 2.4 rejects; the graph keeps
    # MatMul-Softmax-MatMul attention instead. (Working around that changes nothing for our UNet: tried, its
    # attention still does not fuse, neither with the weights as inputs nor as constants: see export.py.)
    options.enable_attention = False
    if target == "cpu":
        for name in GPU_ONLY_FUSIONS:
            setattr(options, name, False)
    optimized = optimize_model(
        str(path), model_type=model_type, opt_level=0, use_gpu=target != "cpu", optimization_options=options
    )
    # keep_io_types: callers feed and read fp32, and fp32 LoRA weights are cast inside the graph.
    optimized.convert_float_to_float16(keep_io_types=True)
    path.with_name(path.name + ".data").unlink(missing_ok=True)
    save_onnx(optimized.model, path)


def quantize_int8(path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from skillgen.inference.export import load_onnx, save_onnx

    tmp = path.with_name("int8-" + path.name)
    quantize_dynamic(
        str(path),
        str(tmp),
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gemm"],
        # Only products with a constant weight: attention scores and the LoRA-fed projections stay fp32.
        extra_options={"MatMulConstBOnly": True},
        use_external_data_format=True,
    )
    model = load_onnx(tmp)
    for p in (tmp, tmp.with_name(tmp.name + ".data"), path, path.with_name(path.name + ".data")):
        p.unlink(missing_ok=True)
    save_onnx(model, path)
