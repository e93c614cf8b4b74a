"""`skillgen bench pipeline`: the torch reference against ONNX Runtime (fp32, fp16, int8), in one process.

The model is a mid-size Stable Diffusion built offline with random weights (UNet block_out_channels
(64, 128, 256, 256), cross-attention 256, SD's layout and 8x VAE): latency does not depend on weight values.
Every row generates the same seeds at the same size; PSNR compares its images with the torch row's (and, for the
quantized rows, with onnx fp32's). Rows run one after another; each engine is dropped before the next loads.

Optimum's ONNX Runtime Stable Diffusion pipeline is not a row: optimum-onnx (0.1.0, the only release) requires
transformers < 4.58, and our pin is transformers 5.23.0, so it cannot be installed beside our pins.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from skillgen.tools.tiny import SDShape, build_random

DEFAULT_JSON = Path("bench/results/pipeline.json")
OPTIMUM_NOTE = (
    "not run: optimum-onnx 0.1.0 (its only release) requires transformers<4.58; our pin is transformers==5.23.0"
)
PROMPT = "a violinist's bow hold, close-up"


class BenchRow(BaseModel):
    backend: str
    precision: str
    provider: str
    width: int
    height: int
    steps: int
    batch: int
    latency_ms_median: float
    images_per_s: float
    peak_mem_mb: float
    psnr_db_vs_torch: float | None
    psnr_db_vs_fp32: float | None
    speedup_vs_torch: float | None
    runs: int


class AdapterSwitch(BaseModel):
    backend: str
    first_use_ms: float  # read-and-fuse (onnx) or activate (torch) an adapter not used before
    cached_switch_ms: float  # back to an adapter used before
    base_exact_after_adapter: bool


class BenchReport(BaseModel):
    model: str
    machine: str
    quick: bool
    rows: list[BenchRow]
    adapter_switch: list[AdapterSwitch]
    export_seconds: dict[str, float]
    optimum: str
    notes: list[str]


# Mid-size: wide and deep enough that the networks, not the Python around them, take the time.
BENCH_SHAPE = SDShape(sample_px=256, text_width=256, text_layers=4, text_ff=1024, unet_channels=(64, 128, 256, 256),
                      unet_layers=2, unet_groups=32, vae_channels=(32, 64, 128, 128), vae_layers=2, vae_groups=32)


def build_bench_model(out: Path, seed: int = 0) -> Path:
    """A mid-size SD-architecture pipeline with random weights, saved in diffusers format."""
    return build_random(out, BENCH_SHAPE, seed)


def write_random_lora(
    model_dir: Path,
    out: Path,
    seed: int = 0,
    rank: int = 4,
    unet_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
    text_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj"),
) -> Path:
    """A LoRA with random (non-zero) up weights, trained by nobody, saved the way diffusers' trainers save one."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    text_encoder = CLIPTextModel.from_pretrained(model_dir / "text_encoder")
    layers = {}
    configs = {}
    for name, module, targets in (("unet", unet, unet_targets), ("text_encoder", text_encoder, text_targets)):
        if not targets:
            continue
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), init_lora_weights="gaussian")
        module.add_adapter(config)
        with torch.no_grad():
            for param_name, param in module.named_parameters():
                if "lora_B" in param_name:
                    param.normal_(0, 0.05)  # peft starts B at zero, which would make the adapter a no-op
        layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(module))
        configs[f"{name}_lora_adapter_metadata"] = config.to_dict()
    StableDiffusionPipeline.save_lora_weights(str(out), safe_serialization=True, **layers, **configs)
    return Path(out) / "pytorch_lora_weights.safetensors"


def psnr_db(a, b) -> float:
    """PSNR of two 8-bit images; 100.0 stands for identical."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return 100.0 if mse == 0 else min(100.0, 10 * np.log10(255.0**2 / mse))


def mean_psnr(images, reference) -> float:
    return round(statistics.fmean(psnr_db(a, b) for a, b in zip(images, reference)), 2)


class PeakRss:
    """Peak resident memory of this process while the block runs, sampled every few milliseconds."""

    def __init__(self, interval_s: float = 0.005):
        import psutil

        self._proc = psutil.Process()
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _time_rows(engine, label, precision, provider, sizes, batches, steps, runs, reference, fp32, images_out):
    from skillgen.inference.engine import BatchSpec, Sample

    rows = []
    for width, height in sizes:
        for batch in batches:
            spec = BatchSpec(width=width, height=height, steps=steps)
            samples = [Sample(PROMPT, seed=1000 + i) for i in range(batch)]
            engine.generate(BatchSpec(width=width, height=height, steps=2), samples)  # warm-up: every shape once
            latencies = []
            with PeakRss() as mem:
                for _ in range(runs):
                    start = time.perf_counter()
                    images = engine.generate(spec, samples)
                    latencies.append((time.perf_counter() - start) * 1000)
            key = (width, height, batch)
            images_out[key] = images
            median = statistics.median(latencies)
            ref, ref_fp32 = reference.get(key), fp32.get(key)
            rows.append(
                BenchRow(
                    backend=label,
                    precision=precision,
                    provider=provider,
                    width=width,
                    height=height,
                    steps=steps,
                    batch=batch,
                    latency_ms_median=round(median, 1),
                    images_per_s=round(batch * 1000 / median, 3),
                    peak_mem_mb=round(mem.peak / 2**20, 1),
                    psnr_db_vs_torch=None if ref is None else mean_psnr(images, ref[0]),
                    psnr_db_vs_fp32=None if ref_fp32 is None else mean_psnr(images, ref_fp32),
                    speedup_vs_torch=None if ref is None else round(ref[1] / median, 2),
                    runs=runs,
                )
            )
            if label == "torch":
                reference[key] = (images, median)
            print(_format_row(rows[-1]), flush=True)
    return rows


def _switch_cost(engine, lora: Path, label: str) -> AdapterSwitch:
    from skillgen.inference.engine import BatchSpec, Sample

    spec = BatchSpec(width=64, height=64, steps=2)
    sample = [Sample(PROMPT, seed=7)]
    base = engine.generate(spec, sample)
    engine.backend.load_adapter("bench", lora)
    start = time.perf_counter()
    engine.backend.use_adapter("bench")
    first = (time.perf_counter() - start) * 1000
    engine.backend.use_adapter(None)
    start = time.perf_counter()
    engine.backend.use_adapter("bench")
    cached = (time.perf_counter() - start) * 1000
    engine.generate(BatchSpec(width=64, height=64, steps=2, adapter="bench"), sample)
    again = engine.generate(spec, sample)
    return AdapterSwitch(
        backend=label,
        first_use_ms=round(first, 2),
        cached_switch_ms=round(cached, 3),
        base_exact_after_adapter=np.array_equal(np.asarray(base[0]), np.asarray(again[0])),
    )


def run_bench(
    quick: bool,
    workdir: Path,
    model: Path | None = None,
    sizes: tuple[tuple[int, int], ...] = ((256, 256),),
    batches: tuple[int, ...] = (1, 4),
    steps: int = 20,
) -> BenchReport:
    """Every row of the benchmark; `model` defaults to a freshly built mid-size model."""
    from skillgen.inference import load_engine

    model = model or build_bench_model(workdir / "model")
    lora = write_random_lora(model, workdir / "lora")
    cache = workdir / "onnx"
    runs = 1 if quick else 3
    reference: dict = {}
    fp32: dict = {}
    rows: list[BenchRow] = []
    switches: list[AdapterSwitch] = []
    exports: dict[str, float] = {}
    for backend, precision in (("torch", "fp32"), ("onnx", "fp32"), ("onnx", "fp16"), ("onnx", "int8")):
        start = time.perf_counter()
        engine = load_engine(model, backend, "cpu", precision, cache_dir=cache)
        if backend == "onnx":
            exports[precision] = round(time.perf_counter() - start, 1)
        provider = getattr(engine.backend, "provider", "torch eager (SDPA)")
        images: dict = {}
        # --quick times the reduced precisions at the first batch size only: the backend comparison stays whole.
        row_batches = batches[:1] if quick and precision != "fp32" else batches
        rows += _time_rows(
            engine, backend, precision, provider, sizes, row_batches, steps, runs, reference,
            fp32 if backend == "onnx" and precision != "fp32" else {}, images,
        )
        if backend == "onnx" and precision == "fp32":
            fp32.update(images)
        if precision == "fp32":
            switches.append(_switch_cost(engine, lora, backend))
        del engine
        gc.collect()
    return BenchReport(
        model="mid-size SD (UNet (64,128,256,256), cross-attention 256, CLIP 4x256, VAE (32,64,128,128)), random",
        machine=f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, {platform.python_version()}",
        quick=quick,
        rows=rows,
        adapter_switch=switches,
        export_seconds=exports,
        optimum=OPTIMUM_NOTE,
        notes=[
            "CPU, guidance 7.5 (the UNet runs at twice the batch), DPM-Solver++; latency is a whole generate() call.",
            "peak_mem_mb is the process's peak RSS during the timed runs (all loaded models included).",
            "PSNR 100.0 stands for identical images.",
        ],
    )


_HEADER = (
    f"{'backend':8s} {'prec':5s} {'size':>9s} {'batch':>5s} {'ms/batch':>10s} {'img/s':>7s} "
    f"{'peakMB':>8s} {'PSNR/torch':>10s} {'PSNR/fp32':>9s} {'speedup':>7s}"
)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _format_row(r: BenchRow) -> str:
    return (
        f"{r.backend:8s} {r.precision:5s} {f'{r.width}x{r.height}':>9s} {r.batch:5d} {r.latency_ms_median:10.1f} "
        f"{r.images_per_s:7.3f} {r.peak_mem_mb:8.0f} {_fmt(r.psnr_db_vs_torch, '10.1f'):>10s} "
        f"{_fmt(r.psnr_db_vs_fp32, '9.1f'):>9s} {_fmt(r.speedup_vs_torch, '7.2f'):>7s}"
    )


def format_report(report: BenchReport, with_rows: bool = True) -> str:
    lines = [_HEADER] + [_format_row(r) for r in report.rows] + [""] if with_rows else []
    for s in report.adapter_switch:
        lines.append(
            f"adapter switch ({s.backend}): first use {s.first_use_ms:.1f} ms, cached {s.cached_switch_ms:.3f} ms, "
            f"base exact after adapter: {s.base_exact_after_adapter}"
        )
    lines.append(f"onnx export seconds: {report.export_seconds}")
    lines.append(f"optimum: {report.optimum}")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument(
        "--quick", action="store_true", help="one timed run per row instead of three; fp16/int8 at batch 1 only"
    )
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"where to write the rows (default {DEFAULT_JSON})"
    )


def run(args) -> int:
    print(_HEADER, flush=True)
    with tempfile.TemporaryDirectory(prefix="skillgen-bench-") as tmp:
        report = run_bench(args.quick, Path(tmp))
    print()
    print(format_report(report, with_rows=False))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report.model_dump(mode="json"), indent=2) + "\n")
    print(f"results written to {args.json}")
    return 0
