"""`skillgen bench pipeline`: plain diffusers against skillgen's torch engine and ONNX Runtime, side by side.

The model is a mid-size Stable Diffusion built offline with random weights (UNet block_out_channels
(64, 128, 256, 256), cross-attention 256, SD's layout and 8x VAE): latency does not depend on weight values.

Rows: diffusers' own StableDiffusionPipeline (the reference, DPMSolverMultistepScheduler like the engine), the
torch engine fp32, ONNX Runtime fp32, ONNX Runtime fp32 with a random LoRA, and ONNX Runtime fp32 with plain
(unfused) attention, the graphs before issue 18, all at batch 1 and the same seeds.
Every model is loaded up front in one process with the same thread count (torch.set_num_threads and ORT's
intra_op_num_threads = --threads). The timed runs are interleaved: round r runs every row once, in an order
rotated by r, so a slow minute of the machine lands on every row instead of on one. A contention check times a
fixed torch matmul loop before and after each run; a run whose calibration drifted more than --drift (15%) from
the run's first calibration is run again once, and its row is marked `contended` if the second one drifts too.
On a CPU these are ratios between backends; absolute latencies mean something only on the GPU
(bench/gpu_pipeline.py).

Optimum's ONNX Runtime Stable Diffusion pipeline is not a row: optimum-onnx (0.1.0, the only release) requires
transformers < 4.58, and our pin is transformers 5.23.0, so it cannot be installed beside our pins.
"""

from __future__ import annotations

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
    backend: str  # diffusers | torch | onnx
    precision: str
    provider: str
    adapter: str | None
    attention: str | None = None  # onnx rows: "fused" (one MultiHeadAttention node) or "plain"
    batch: int
    width: int
    height: int
    steps: int
    latency_ms_median: float
    latency_ms_min: float
    latencies_ms: list[float]  # the kept run of each round, in round order
    ratio_vs_diffusers: float | None  # diffusers' median / this row's median (> 1: faster than plain diffusers)
    ratio_vs_diffusers_min: float | None  # the same with minima (less sensitive to a busy machine)
    # CPU time of this process per call (every thread): on a shared machine far steadier than wall time, since a
    # run that waits for a core is not charged for the wait. The same work, not the same as latency.
    cpu_ms_median: float = 0.0
    ratio_vs_diffusers_cpu: float | None = None  # diffusers' median CPU time / this row's
    psnr_db_vs_torch: float | None  # vs the torch engine's images (with the same adapter); null on the torch row
    threads: int
    runs: int
    reruns: int  # runs repeated because the calibration drifted
    contended: bool  # a repeated run drifted again
    max_drift: float  # the largest calibration drift of a kept run, as a fraction of the first calibration


class BenchReport(BaseModel):
    model: str
    machine: str
    quick: bool
    threads: int
    rounds: int
    drift_limit: float
    calibration_ms_first: float
    calibration_ms: list[float]
    contended: bool  # any row contended
    rows: list[BenchRow]
    # onnx: median ms of use_adapter between the base and the (already fused) random LoRA, and its first fuse
    adapter_switch_ms: float | None = None
    adapter_first_fuse_ms: float | None = None
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
        # peft's key names, as trainer/lora.py writes them (diffusers' conversion loses layers for some targets)
        layers[f"{name}_lora_layers"] = get_peft_model_state_dict(module)
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


DRIFT_LIMIT = 0.15
LORA_NAME = "random-lora"


def calibrate(repeats: int = 5, size: int = 256, loops: int = 24) -> float:
    """Milliseconds for a fixed torch matmul loop (median of `repeats`), on the pinned thread count: a yardstick
    of how much CPU this process is getting right now."""
    import torch

    a = torch.randn(size, size, generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x = a
        for _ in range(loops):
            x = torch.tanh(x @ a)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


class _PinnedOrtThreads:
    """While loading: every ONNX Runtime session gets intra_op_num_threads = threads (the backend does not set it;
    ORT's default is one thread per core)."""

    def __init__(self, threads: int):
        self.threads = threads

    def __enter__(self):
        import onnxruntime as ort

        self._ort, self._orig = ort, ort.SessionOptions
        orig, threads = self._orig, self.threads

        def pinned(*args, **kwargs):
            so = orig(*args, **kwargs)
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            return so

        ort.SessionOptions = pinned
        return self

    def __exit__(self, *exc):
        self._ort.SessionOptions = self._orig


def _ort_threads(engine) -> set[int]:
    return {
        net.session.get_session_options().intra_op_num_threads
        for net in engine.backend.networks.values()
        if hasattr(net, "session")
    }


class _Row:
    """One row: how to run it once, and what it measured."""

    def __init__(self, backend, precision, provider, adapter, fn, attention=None):
        self.backend, self.precision, self.provider, self.adapter, self.fn = backend, precision, provider, adapter, fn
        self.attention = attention
        self.latencies: list[float] = []
        self.cpu: list[float] = []
        self.cpu_last = 0.0
        self.reruns = 0
        self.contended = False
        self.max_drift = 0.0
        self.images = None


def _adapter_switch_ms(backend, switches: int = 10) -> tuple[float, float]:
    """(median ms of one cached switch base <-> adapter, ms of the adapter's first use, which fuses its weights)."""
    backend.use_adapter(None)
    start = time.perf_counter()
    backend.use_adapter(LORA_NAME)
    first = (time.perf_counter() - start) * 1000
    times = []
    for i in range(switches):
        start = time.perf_counter()
        backend.use_adapter(None if i % 2 == 0 else LORA_NAME)
        times.append((time.perf_counter() - start) * 1000)
    backend.use_adapter(None)
    return round(statistics.median(times), 2), round(first, 1)


def _label(row: _Row) -> str:
    return f"{row.backend}/{row.adapter or 'base'}" + (f"/{row.attention}" if row.attention else "")


def _plain_diffusers(model: Path):
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from skillgen.inference.engine import SCHEDULER_CLASSES

    pipe = StableDiffusionPipeline.from_pretrained(
        model, safety_checker=None, feature_extractor=None, requires_safety_checker=False, dtype=torch.float32
    )
    _, extra = SCHEDULER_CLASSES["dpmpp"]
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_bench(
    quick: bool,
    workdir: Path,
    model: Path | None = None,
    size: int = 256,
    steps: int | None = None,
    rounds: int | None = None,
    threads: int = 1,
    drift_limit: float = DRIFT_LIMIT,
    log=print,
) -> BenchReport:
    """Every row, interleaved over `rounds`; `model` defaults to a freshly built mid-size model."""
    import torch

    from skillgen.inference import load_engine
    from skillgen.inference.engine import BatchSpec, Sample

    steps = steps or (4 if quick else 10)
    rounds = max(3, rounds or (3 if quick else 5))
    torch.set_num_threads(threads)
    model_desc = (
        f"the model at {model}" if model else
        "mid-size SD (UNet (64,128,256,256), cross-attention 256, CLIP 4x256, VAE (32,64,128,128)), random"
    )
    model = model or build_bench_model(workdir / "model")
    lora = write_random_lora(model, workdir / "lora")
    sample = Sample(PROMPT, seed=1000)
    lora_spec = BatchSpec(width=size, height=size, steps=steps, adapter=LORA_NAME)

    pipe = _plain_diffusers(model)
    torch_engine = load_engine(model, "torch", "cpu", "fp32")
    with _PinnedOrtThreads(threads):
        onnx_engine = load_engine(model, "onnx", "cpu", "fp32", cache_dir=workdir / "onnx")
        plain_engine = load_engine(model, "onnx", "cpu", "fp32", cache_dir=workdir / "onnx", fused_attention=False)
    for engine in (onnx_engine, plain_engine):
        pinned = _ort_threads(engine)
        if pinned and pinned != {threads}:
            raise RuntimeError(f"ONNX Runtime sessions run {pinned} intra-op threads, not {threads}")
    attention = "fused" if onnx_engine.backend.manifest.options.fused_attention else "plain"
    onnx_engine.backend.load_adapter(LORA_NAME, lora)
    onnx_provider = onnx_engine.backend.provider

    def diffusers_once(s: int = steps):
        generator = torch.Generator("cpu").manual_seed(sample.seed)
        return pipe(
            sample.prompt, negative_prompt=sample.negative_prompt, num_inference_steps=s, guidance_scale=7.5,
            height=size, width=size, generator=generator,
        ).images

    rows = [
        _Row("diffusers", "fp32", "torch eager (StableDiffusionPipeline)", None, diffusers_once),
        _Row("torch", "fp32", "torch eager (SDPA)", None,
             lambda s=steps: torch_engine.generate(BatchSpec(width=size, height=size, steps=s), [sample])),
        _Row("onnx", "fp32", onnx_provider, None,
             lambda s=steps: onnx_engine.generate(BatchSpec(width=size, height=size, steps=s), [sample]), attention),
        _Row("onnx", "fp32", onnx_provider, LORA_NAME,
             lambda s=steps: onnx_engine.generate(
                 BatchSpec(width=size, height=size, steps=s, adapter=LORA_NAME), [sample]), attention),
        _Row("onnx", "fp32", plain_engine.backend.provider, None,
             lambda s=steps: plain_engine.generate(BatchSpec(width=size, height=size, steps=s), [sample]), "plain"),
    ]
    switch_ms, first_fuse_ms = _adapter_switch_ms(onnx_engine.backend)
    # Warm-up: every row once, untimed (first-call allocations, the adapter's fuse), a calibration after each.
    # The run's first calibration is the best of those, so that one busy moment does not become the yardstick.
    warmup = []
    for row in rows:
        row.fn(2)
        warmup.append(calibrate())
    first = min(warmup)
    calibrations = [round(x, 2) for x in warmup]
    log(f"threads {threads}, {rounds} rounds, {steps} steps, {size}x{size}; calibration {first:.1f} ms")

    def measure(row: _Row) -> tuple[float, float, list]:
        before = calibrate()
        cpu_start, start = time.process_time(), time.perf_counter()
        images = row.fn()
        ms = (time.perf_counter() - start) * 1000
        row.cpu_last = (time.process_time() - cpu_start) * 1000
        after = calibrate()
        calibrations.extend((round(before, 2), round(after, 2)))
        return ms, max(abs(before / first - 1), abs(after / first - 1)), images

    for r in range(rounds):
        order = rows[r % len(rows):] + rows[: r % len(rows)]
        for row in order:
            ms, drift, images = measure(row)
            if drift > drift_limit:
                row.reruns += 1
                log(f"  round {r}: {_label(row)} calibration drifted {drift:+.0%}; again")
                ms, drift, images = measure(row)
                if drift > drift_limit:
                    row.contended = True
            row.max_drift = max(row.max_drift, drift)
            row.latencies.append(ms)
            row.cpu.append(row.cpu_last)
            row.images = images
        log(f"  round {r}: " + ", ".join(f"{_label(x)} {x.latencies[-1]:.0f} ms" for x in rows))

    # References for PSNR, untimed: the torch engine's images, base and with the same adapter.
    torch_ref = rows[1].images
    torch_engine.backend.load_adapter(LORA_NAME, lora)
    torch_lora_ref = torch_engine.generate(lora_spec, [sample])
    diffusers_median = statistics.median(rows[0].latencies)
    diffusers_cpu = statistics.median(rows[0].cpu)
    diffusers_min = min(rows[0].latencies)
    out = []
    for row in rows:
        median = statistics.median(row.latencies)
        if row.backend == "torch":
            psnr = None
        else:
            psnr = mean_psnr(row.images, torch_lora_ref if row.adapter else torch_ref)
        out.append(
            BenchRow(
                backend=row.backend, precision=row.precision, provider=row.provider, adapter=row.adapter,
                attention=row.attention, batch=1,
                width=size, height=size, steps=steps, latency_ms_median=round(median, 1),
                latency_ms_min=round(min(row.latencies), 1), latencies_ms=[round(x, 1) for x in row.latencies],
                ratio_vs_diffusers=round(diffusers_median / median, 2),
                ratio_vs_diffusers_min=round(diffusers_min / min(row.latencies), 2), psnr_db_vs_torch=psnr,
                cpu_ms_median=round(statistics.median(row.cpu), 1),
                ratio_vs_diffusers_cpu=round(diffusers_cpu / statistics.median(row.cpu), 2),
                threads=threads,
                runs=len(row.latencies), reruns=row.reruns, contended=row.contended,
                max_drift=round(row.max_drift, 3),
            )
        )
    return BenchReport(
        model=model_desc,
        machine=f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, {platform.python_version()}",
        quick=quick,
        threads=threads,
        rounds=rounds,
        drift_limit=drift_limit,
        calibration_ms_first=round(first, 2),
        calibration_ms=calibrations,
        contended=any(r.contended for r in out),
        rows=out,
        adapter_switch_ms=switch_ms,
        adapter_first_fuse_ms=first_fuse_ms,
        optimum=OPTIMUM_NOTE,
        notes=[
            "CPU, guidance 7.5 (the UNet runs at twice the batch), DPM-Solver++ (2nd order), batch 1, one seed.",
            (
                "All rows loaded in one process; round r runs every row once in an order rotated by r; "
                "latency is one whole call (text encoder, UNet steps, VAE decode)."
            ),
            "torch.set_num_threads and ONNX Runtime's intra_op_num_threads are both pinned to `threads`.",
            (
                "x diff cpu: the ratio of process CPU time (every thread) per call, steadier than wall time on a "
                "shared machine; it counts work, not waiting."
            ),
            (
                "Contention check: a fixed torch matmul loop timed before and after every run; a run whose loop "
                "drifted more than drift_limit from calibration_ms_first (the best of one calibration after each "
                "warm-up row) is run again once; `contended` if it drifted again."
            ),
            "On a CPU only the ratios mean something; absolute times come from a GPU (bench/gpu_pipeline.py).",
            (
                "PSNR 100.0 stands for identical images; the adapter row is compared with the torch engine on the "
                "same adapter."
            ),
            (
                "attn: fused = attention as one com.microsoft MultiHeadAttention node after the Q/K/V projections "
                "(the CPU default since issue 18); plain = the MatMul-Softmax-MatMul graph from before."
            ),
        ],
    )


_HEADER = (
    f"{'backend':9s} {'prec':5s} {'adapter':11s} {'attn':5s} {'size':>7s} {'ms median':>10s} {'ms min':>9s} "
    f"{'x diff med':>10s} {'x diff min':>10s} {'x diff cpu':>10s} "
    f"{'PSNR/torch':>10s} {'threads':>7s} {'runs':>4s} {'reruns':>6s} {'contended':>9s}"
)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _format_row(r: BenchRow) -> str:
    return (
        f"{r.backend:9s} {r.precision:5s} {r.adapter or '-':11s} {r.attention or '-':5s} {f'{r.width}x{r.height}':>7s} "
        f"{r.latency_ms_median:10.1f} {r.latency_ms_min:9.1f} {_fmt(r.ratio_vs_diffusers, '10.2f'):>10s} "
        f"{_fmt(r.ratio_vs_diffusers_min, '10.2f'):>10s} {_fmt(r.ratio_vs_diffusers_cpu, '10.2f'):>10s} "
        f"{_fmt(r.psnr_db_vs_torch, '10.1f'):>10s} {r.threads:7d} {r.runs:4d} {r.reruns:6d} "
        f"{str(r.contended).lower():>9s}"
    )


def format_report(report: BenchReport) -> str:
    lines = [
        f"{report.model}; {report.machine}",
        (
            f"{report.rows[0].steps} steps, batch 1, {report.rounds} interleaved rounds, threads {report.threads}, "
            f"quick={report.quick}"
        ),
        "",
        _HEADER,
        *(_format_row(r) for r in report.rows),
        "",
        (
            f"onnx adapter switch (cached fused weights): {_fmt(report.adapter_switch_ms, '.2f')} ms median; "
            f"first use (fuse): {_fmt(report.adapter_first_fuse_ms, '.1f')} ms"
        ),
        (
            f"calibration: first {report.calibration_ms_first:.1f} ms, range "
            f"{min(report.calibration_ms):.1f}-{max(report.calibration_ms):.1f} ms, drift limit "
            f"{report.drift_limit:.0%}; machine contended: {str(report.contended).lower()}"
        ),
        "On this CPU only the ratios mean something; absolute times come from a GPU (bench/gpu_pipeline.py).",
        f"optimum: {report.optimum}",
    ]
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="4 steps, 3 rounds (default: 10 steps, 5 rounds)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_JSON,
        help=f"where to write the JSON report (default {DEFAULT_JSON}; the table goes next to it as .txt)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads (default 1)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds, at least 3")
    parser.add_argument("--steps", type=int, help="denoising steps per image")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--drift", type=float, default=DRIFT_LIMIT, help="calibration drift limit (default 0.15)")
    parser.add_argument("--model", type=Path, help="a diffusers model directory (default: build the mid-size one)")


def run(args) -> int:
    import sys

    def log(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    with tempfile.TemporaryDirectory(prefix="skillgen-bench-") as tmp:
        report = run_bench(
            args.quick, Path(tmp), model=args.model, size=args.size, steps=args.steps, rounds=args.rounds,
            threads=args.threads, drift_limit=args.drift, log=log,
        )
    data = json.dumps(report.model_dump(mode="json"), indent=2) + "\n"
    table = format_report(report)
    if args.json:
        print(data, end="")
    else:
        print()
        print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(data)
    args.out.with_suffix(".txt").write_text(table + "\n")
    log(f"results written to {args.out} and {args.out.with_suffix('.txt')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
