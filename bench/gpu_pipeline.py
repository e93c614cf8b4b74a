"""GPU benchmark: SD 1.5 architecture (random weights) at 512x512, 20 steps with guidance, batch 1/4/8/16, fp16:
torch eager (SDPA) vs torch.compile (the UNet, inductor) vs ONNX Runtime CUDA EP vs ONNX Runtime TensorRT EP, all
through the same Engine loop.

    python -m bench.gpu_pipeline --json bench/results/gpu_pipeline.json          # on a GPU machine, < 8 minutes
    python -m bench.gpu_pipeline --smoke                                         # CPU-sized path, tiny model

Prints latency, images/s, peak GPU memory and the share of the GPU's peak fp16 FLOP/s the work reached. The FLOPs
are counted, not assumed: torch's FlopCounterMode over one UNet forward and one VAE decode of the model under test
(SD 1.5 at 64x64 latents: about 0.8 TFLOP a UNet forward); an image costs 2 x steps UNet forwards (guidance) and one
decode. The text encoder is left out (under 1%), so the share is a slight lower bound. Setup (model build, ONNX export, TensorRT engine build) is
timed apart from the runs. A `--budget-s` guard skips the backends that would start after the budget is spent.
Needs torch with CUDA and onnxruntime-gpu (with TensorRT libraries for the TensorRT rows).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

# Dense fp16 tensor-core peaks (TFLOP/s) from the vendors' data sheets; --peak-tflops overrides.
PEAK_FP16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "T4": 65.0}


def build_sd15(out: Path, device: str) -> Path:
    """SD 1.5's text encoder (CLIP ViT-L/14 text), UNet and VAE configurations with random weights."""
    import torch
    from transformers import CLIPTokenizer

    from skillgen.tools.tiny import SD15, random_pipeline, write_clip_tokenizer

    torch.manual_seed(0)
    write_clip_tokenizer(out / "tokenizer")
    # Random init of 1.1 B parameters is minutes on a CPU, seconds on a GPU: create them there.
    pipe = random_pipeline(SD15, CLIPTokenizer.from_pretrained(out / "tokenizer"), device=device)
    pipe.to("cpu").save_pretrained(out, safe_serialization=True)
    return out


class PeakDeviceMemory:
    """Peak memory in use on the GPU (every allocator: torch's and ONNX Runtime's) while the block runs."""

    def __init__(self, device):
        self.device, self.peak = device, 0
        self._stop = threading.Event()

    def _used(self) -> int:
        import torch

        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._used())
            self._stop.wait(0.002)

    def __enter__(self):
        self.peak = self._used()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def peak_tflops(override: float | None) -> float | None:
    import torch

    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FP16_TFLOPS.items() if k in name), None)


def count_gflop(engine, size: int) -> tuple[float, float]:
    """GFLOP of one UNet forward (one sample) and of one VAE decode (one image), counted by torch's
    FlopCounterMode on a torch engine's own modules at `size` pixels."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    backend = engine.backend
    side = size // backend.vae_scale_factor
    dtype = next(backend.pipe.unet.parameters()).dtype
    latents = torch.randn(1, backend.latent_channels, side, side, device=backend.device, dtype=dtype)
    text = torch.randn(1, 77, backend.pipe.unet.config.cross_attention_dim, device=backend.device, dtype=dtype)
    with torch.no_grad():
        with FlopCounterMode(display=False) as unet:
            backend.unet(latents, torch.tensor([500], device=backend.device), text)
        with FlopCounterMode(display=False) as vae:
            backend.decode(latents)
    return unet.get_total_flops() / 1e9, vae.get_total_flops() / 1e9


def compile_unet(engine, smoke: bool):
    """The torch engine with its UNet through torch.compile: inductor on the GPU; on the CPU (--smoke) the "eager"
    backend, which traces the same graph with TorchDynamo but skips code generation, so the smoke run checks that
    the UNet compiles without minutes of C++ builds."""
    import torch

    pipe = engine.backend.pipe
    pipe.unet = torch.compile(pipe.unet, backend="eager" if smoke else "inductor", dynamic=False)
    return engine


def run_rows(engine, label, size, batches, steps, runs, device, peak, reference, rows, gflop: tuple[float, float]):
    import torch

    from bench.pipeline import mean_psnr
    from skillgen.inference.engine import BatchSpec, Sample

    for batch in batches:
        samples = [Sample("a cellist's vibrato, close-up", seed=100 + i) for i in range(batch)]
        engine.generate(BatchSpec(width=size, height=size, steps=2), samples)  # warm-up (and TensorRT build)
        latencies = []
        if device.type == "cuda":
            torch.cuda.synchronize()
            mem = PeakDeviceMemory(device)
        else:
            from bench.pipeline import PeakRss

            mem = PeakRss()
        with mem:
            for _ in range(runs):
                start = time.perf_counter()
                images = engine.generate(BatchSpec(width=size, height=size, steps=steps), samples)
                latencies.append(time.perf_counter() - start)
        median = statistics.median(latencies)
        unet_gflop, vae_gflop = gflop
        per_image = 2 * steps * unet_gflop + vae_gflop  # guidance: two UNet forwards a step
        tflops = per_image * batch / median / 1000
        share = None if peak is None else tflops / peak
        ref = reference.setdefault(batch, images)
        rows.append(
            {
                "backend": label, "width": size, "height": size, "steps": steps, "batch": batch,
                "latency_ms_median": round(median * 1000, 1), "images_per_s": round(batch / median, 3),
                "peak_mem_mb": round(mem.peak / 2**20, 1), "gflop_per_image": round(per_image, 3),
                "tflops": round(tflops, 4), "share_of_peak": None if share is None else round(share, 4),
                "psnr_db_vs_torch": mean_psnr(images, ref),
            }
        )
        print(format_row(rows[-1]), flush=True)


def format_row(r: dict) -> str:
    share = "-" if r["share_of_peak"] is None else f"{100 * r['share_of_peak']:.1f}%"
    tflops = f"{r['tflops']:.3g}"
    return (
        f"{r['backend']:14s} {r['batch']:5d} {r['latency_ms_median']:10.1f} {r['images_per_s']:8.2f} "
        f"{r['peak_mem_mb']:9.0f} {tflops:>8s} {share:>7s} {r['psnr_db_vs_torch']:7.1f}"
    )


HEADER = (
    f"{'backend':14s} {'batch':>5s} {'ms/batch':>10s} {'img/s':>8s} {'peakMB':>9s} {'TFLOP/s':>8s} {'%peak':>7s} "
    f"{'PSNR':>7s}"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script, not the GPU")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--budget-s", type=float, default=450.0, help="skip backends that would start after this")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense fp16 peak, when not in the built-in table")
    parser.add_argument("--workdir", type=Path, help="keep the model and exports here (default: a temp dir)")
    args = parser.parse_args(argv)

    import torch

    from skillgen.inference import load_engine
    from skillgen.inference.onnx_backend import TrtProfile

    started = time.perf_counter()
    if args.smoke:
        device, precision, size, steps, batches, runs = torch.device("cpu"), "fp32", 64, 2, (1, 2), 1
        backends = [("torch", {}), ("torch-compile", {}), ("onnx-cpu", {"provider": "cpu"})]
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --smoke for the CPU-sized path", file=sys.stderr)
            return 2
        device, precision, size, steps, batches, runs = torch.device("cuda", 0), "fp16", 512, 20, (1, 4, 8, 16), 2
        backends = [("torch", {}), ("onnx-cuda", {"provider": "cuda"}), ("onnx-tensorrt", {"provider": "tensorrt"}),
                    ("torch-compile", {})]  # last: inductor's compile per batch size is the slowest setup
    peak = None if args.smoke else peak_tflops(args.peak_tflops)

    with tempfile.TemporaryDirectory(prefix="skillgen-gpu-bench-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        if args.smoke:
            from skillgen.tools.tiny import build_tiny

            model = build_tiny(work / "model")
        else:
            model = build_sd15(work / "model", "cuda")
        setup = {"build_model_s": round(time.perf_counter() - t0, 1)}
        print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; peak fp16 {peak} TFLOP/s")
        print(HEADER, flush=True)
        rows: list[dict] = []
        skipped: dict[str, str] = {}
        if args.smoke:  # the GPU rows, named with the reason they do not run here
            for label in ("onnx-cuda", "onnx-tensorrt"):
                skipped[label] = "--smoke runs on the CPU; this row needs a CUDA GPU and onnxruntime-gpu"
                print(f"{label}: skipped ({skipped[label]})", flush=True)
        reference: dict = {}
        gflop: tuple[float, float] | None = None
        for label, kwargs in backends:
            if time.perf_counter() - started > args.budget_s:
                skipped[label] = f"budget of {args.budget_s:.0f}s spent"
                continue
            t0 = time.perf_counter()
            try:
                if label.startswith("torch"):
                    engine = load_engine(model, "torch", device.type, precision)
                    if gflop is None:
                        gflop = count_gflop(engine, size)
                        setup["gflop_unet_forward"], setup["gflop_vae_decode"] = (round(g, 3) for g in gflop)
                    if label == "torch-compile":
                        engine = compile_unet(engine, args.smoke)
                else:
                    profile = TrtProfile(min_side_px=size, opt_side_px=size, max_side_px=size, max_batch=max(batches))
                    engine = load_engine(
                        model, "onnx", device.type, precision, cache_dir=work / "onnx", trt_profile=profile, **kwargs
                    )
            except Exception as exc:  # noqa: BLE001 -- a missing provider or library is a result to report
                skipped[label] = f"{type(exc).__name__}: {exc}"
                print(f"{label}: skipped ({skipped[label][:200]})", flush=True)
                continue
            setup[f"{label}_load_s"] = round(time.perf_counter() - t0, 1)
            run_rows(engine, label, size, batches, steps, runs, device, peak, reference, rows, gflop)
            del engine
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    result = {"rows": rows, "setup_s": setup, "skipped": skipped, "total_s": round(time.perf_counter() - started, 1)}
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
