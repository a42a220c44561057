"""Pretraining throughput: tiles/s per SSL method, model-FLOP utilisation, and a plain-eager baseline.

For each method (DINO with 2 global + 8 local crops, MAE, VICReg) at the study's setting
(ViT-S/16 on 128 x 256 tiles by default) this times full optimizer steps of
`engine.train_step` in two configurations, in the same process, on the same batch:

* optimised: what `soundscape_ssl.pretrain.train` does on this device: bf16 autocast and TF32 on CUDA
  (`--precision bf16` also on a CPU, as `train`'s `precision: bf16`), fused AdamW, optionally
  torch.compile of the transformer blocks (`--compile`, on by default on CUDA);
* baseline ("plain eager timm"): the same timm ViT and method in fp32, eager, torch's default
  AdamW, TF32 off.

Model FLOPs per step are counted once with `torch.utils.flop_counter.FlopCounterMode` (matmuls,
convolutions and attention, forward + backward, teacher included) and turned into model-FLOP
utilisation (MFU) against a dense matmul ceiling measured in the same run, in the optimised
step's compute dtype (bf16 on CUDA, fp32 on CPU): the best of several measurements taken
before and between the methods. The data loader's tiles/s is measured on its own
(`--store-dir` for a real tile store; otherwise in-memory float16 tiles normalised like
`TileDataset`). Steps use one fixed batch already on the device, so loading is excluded there.

    python benchmarks/pretrain.py --device cpu --model vit_tiny --steps 3     # CPU smoke run
    python benchmarks/pretrain.py --device cuda                               # ViT-S/16, batch 64
    python benchmarks/pretrain.py --device cpu --model vit_tiny --depth 4 --methods vicreg \
        --batch-size 32 --precision bf16                                     # bf16 autocast on a CPU

bf16 on a CPU is fast only where the hardware computes it (`cpu_native_bf16` in the JSON):
prefixing the last line with `ONEDNN_MAX_CPU_ISA=AVX512_CORE` times oneDNN's emulated bf16 on the
same machine, as a CPU with AVX-512 but without its BF16 extension would run it.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--model", default="vit_small", help="vit_tiny, vit_small or vit_base")
    parser.add_argument("--depth", type=int, default=None, help="override the number of blocks")
    parser.add_argument("--methods", default="dino,mae,vicreg")
    parser.add_argument("--batch-size", type=int, default=None, help="tiles per step (default 64 on CUDA, 8 on CPU)")
    parser.add_argument("--n-mels", type=int, default=128)
    parser.add_argument("--n-frames", type=int, default=256)
    parser.add_argument("--dino-out-dim", type=int, default=65536)
    parser.add_argument("--local-crops", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; medians are reported")
    parser.add_argument("--warmup-steps", type=int, default=None, help="untimed steps first (default 1 CPU, 5 CUDA)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="the optimised configuration's compute: auto is bf16 autocast on CUDA and fp32 on "
                             "CPU, as in training; bf16 on a CPU runs autocast there (AMX/AVX512-BF16 kernels)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile in the optimised configuration (default: on for CUDA, off for CPU)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the plain-eager baseline")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch, OpenMP, MKL)")
    parser.add_argument("--store-dir", default=None, help="tile store for the data-loader measurement")
    parser.add_argument("--loader-workers", type=int, default=2)
    parser.add_argument("--loader-batches", type=int, default=20)
    parser.add_argument("--matmul-size", type=int, default=None,
                        help="ceiling matmul size (default 8192 CUDA, 2048 CPU)")
    return parser.parse_args(argv)


ARGS = parse_args()
for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[variable] = str(ARGS.threads)  # before torch is imported

import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from soundscape_ssl.core.stage import tf32_matmuls  # noqa: E402
from soundscape_ssl.pretrain.augment import Normalization  # noqa: E402
from soundscape_ssl.pretrain.engine import train_step  # noqa: E402
from soundscape_ssl.pretrain.train import (TrainConfig, build_method, compile_for_training,  # noqa: E402
                                            cpu_computes_bf16_natively, parameter_groups)

# CPU attention runs as a kernel FlopCounterMode has no formula for; count it like the GPU ones.
_CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda query, key, value, *args, out_shape=None, **kwargs: sdpa_flop_count(query, key, value),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad_out, query, key, value, *args, out_shape=None, **kwargs:
            sdpa_backward_flop_count(grad_out, query, key, value),
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_config(args: argparse.Namespace, method: str) -> TrainConfig:
    config = TrainConfig(method=method, store_dir="benchmark", out_dir="benchmark")
    config.model.arch = args.model
    config.model.depth = args.depth
    config.model.n_mels, config.model.n_frames = args.n_mels, args.n_frames
    config.dino.out_dim = args.dino_out_dim
    config.dino.local_crops = args.local_crops
    config.validate()
    return config


def optimised_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype | None:
    """The optimised configuration's autocast dtype: `--precision`, with auto as `train` resolves it."""
    if args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def build(args: argparse.Namespace, method_name: str, device: torch.device, optimised: bool, compile_blocks: bool):
    """(method, optimizer, autocast dtype) for the optimised or the baseline configuration."""
    torch.manual_seed(0)
    config = train_config(args, method_name)
    method = build_method(config, Normalization(-60.0, 12.0), total_steps=10_000, steps_per_epoch=1_000).to(device)
    if optimised:
        optimizer = torch.optim.AdamW(parameter_groups(method), lr=1e-4, fused=True)
        if compile_blocks:
            compile_for_training(method)
        autocast = optimised_dtype(args, device)
    else:
        optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-4)
        autocast = None
    method.train()
    return method, optimizer, autocast


def one_step(method, optimizer, tiles: torch.Tensor, step: int, autocast, generator) -> None:
    parameters = [p for p in method.parameters() if p.requires_grad]
    train_step(method, method, optimizer, tiles, step, learning_rate=1e-4, weight_decay=0.04,
               autocast_dtype=autocast, clip_grad_norm=3.0, parameters=parameters, generator=generator)


def time_steps(method, optimizer, tiles: torch.Tensor, autocast, args: argparse.Namespace,
               device: torch.device) -> list[float]:
    """Tiles/s of each timed repeat (after untimed warm-up steps)."""
    generator = torch.Generator(device=device).manual_seed(0)
    warmup = args.warmup_steps if args.warmup_steps is not None else (5 if device.type == "cuda" else 1)
    step = 0
    for _ in range(warmup):
        one_step(method, optimizer, tiles, step, autocast, generator)
        step += 1
    synchronize(device)
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            one_step(method, optimizer, tiles, step, autocast, generator)
            step += 1
        synchronize(device)
        rates.append(args.steps * tiles.shape[0] / (time.perf_counter() - start))
    return rates


def count_step_flops(method, optimizer, tiles: torch.Tensor, autocast, device: torch.device) -> int:
    generator = torch.Generator(device=device).manual_seed(0)
    with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS) as counter:
        one_step(method, optimizer, tiles, 0, autocast, generator)
    return counter.get_total_flops()


def matmul_ceiling(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    """Best FLOP/s of a square matmul (2 n^3 FLOPs) in `dtype` over repeats: the attainable dense ceiling.

    The best repeat, not the median: a ceiling is what the hardware can do, and interference
    from other processes only ever lowers a measurement.
    """
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    iterations = 20 if device.type == "cuda" else 3
    torch.matmul(a, b)
    synchronize(device)
    rates = []
    for _ in range(max(repeats, 5)):
        start = time.perf_counter()
        for _ in range(iterations):
            torch.matmul(a, b)
        synchronize(device)
        rates.append(iterations * 2 * size**3 / (time.perf_counter() - start))
    return max(rates)


class _InMemoryTiles(Dataset):
    """float16 dB tiles normalised to float32 per item, like TileDataset, without disk reads."""

    def __init__(self, n_tiles: int, n_mels: int, n_frames: int) -> None:
        self.tiles = (torch.randn(n_tiles, n_mels, n_frames) * 12 - 60).half()

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index: int) -> torch.Tensor:
        return ((self.tiles[index].float() + 60.0) / 12.0).unsqueeze(0)


def loader_throughput(args: argparse.Namespace, batch_size: int, device: torch.device) -> dict:
    if args.store_dir:
        from soundscape_ssl.tiles.store import TileDataset

        dataset, source = TileDataset(args.store_dir, normalize=True), f"TileDataset({args.store_dir})"
    else:
        n_tiles = batch_size * (args.loader_batches + 2)
        dataset, source = _InMemoryTiles(n_tiles, args.n_mels, args.n_frames), "in-memory float16 tiles"
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                        num_workers=args.loader_workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(0))
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    start, n_tiles = time.perf_counter(), 0
    for _, batch in zip(range(args.loader_batches), iterator):
        batch = batch.to(device, non_blocking=True)
        n_tiles += batch.shape[0]
    synchronize(device)
    return {"source": source, "workers": args.loader_workers, "batch_size": batch_size,
            "tiles_per_s": n_tiles / (time.perf_counter() - start)}


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available; use --device cpu")
    batch_size = args.batch_size or (64 if device.type == "cuda" else 8)
    compile_blocks = args.compile if args.compile is not None else device.type == "cuda"
    ceiling_dtype = optimised_dtype(args, device) or torch.float32
    matmul_size = args.matmul_size or (8192 if device.type == "cuda" else 2048)
    ceilings = [matmul_ceiling(device, ceiling_dtype, matmul_size, args.repeats)]
    tiles = torch.randn(batch_size, 1, args.n_mels, args.n_frames, generator=torch.Generator().manual_seed(0))
    tiles = tiles.to(device)

    results: dict[str, dict] = {}
    for method_name in args.methods.split(","):
        method, optimizer, autocast = build(args, method_name, device, optimised=False, compile_blocks=False)
        flops_per_step = count_step_flops(method, optimizer, tiles, None, device)
        entry: dict = {"flops_per_tile": flops_per_step / batch_size}
        if not args.no_baseline:
            with tf32_matmuls(False):
                rates = time_steps(method, optimizer, tiles, autocast, args, device)
            entry["baseline_tiles_per_s"] = statistics.median(rates)
            entry["baseline_repeats_tiles_per_s"] = rates
        del method, optimizer
        method, optimizer, autocast = build(args, method_name, device, optimised=True, compile_blocks=compile_blocks)
        with tf32_matmuls(True):   # as `train` sets them for its run (CUDA only; no effect on a CPU)
            rates = time_steps(method, optimizer, tiles, autocast, args, device)
        entry["tiles_per_s"] = statistics.median(rates)
        entry["repeats_tiles_per_s"] = rates
        if "baseline_tiles_per_s" in entry:
            entry["speedup_vs_baseline"] = entry["tiles_per_s"] / entry["baseline_tiles_per_s"]
        if device.type == "cuda":
            entry["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        results[method_name] = entry
        del method, optimizer
        print(f"{method_name}: {json.dumps(entry)}", file=sys.stderr)
        # Measured again between methods: on a shared machine one measurement can catch a busy moment.
        ceilings.append(matmul_ceiling(device, ceiling_dtype, matmul_size, args.repeats))

    ceiling = max(ceilings)
    for entry in results.values():
        entry["mfu"] = entry["tiles_per_s"] * entry["flops_per_tile"] / ceiling
        if "baseline_tiles_per_s" in entry:
            entry["baseline_mfu"] = entry["baseline_tiles_per_s"] * entry["flops_per_tile"] / ceiling

    return {
        "benchmark": "pretrain",
        "baseline": "same timm ViT and method in fp32, eager, torch-default AdamW, TF32 off",
        "optimised": ("bf16 autocast" if optimised_dtype(args, device) else "fp32")
                     + (" + TF32" if device.type == "cuda" else "") + " + fused AdamW"
                     + (" + torch.compile(blocks)" if compile_blocks else ""),
        "precision": "bf16" if optimised_dtype(args, device) else "fp32",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),  # PASSIVE matters a lot on shared CPUs
        # bf16 speed on a CPU hinges on hardware bf16; ONEDNN_MAX_CPU_ISA=AVX512_CORE measures the
        # emulated path on the same machine (cpuid still reports the hardware)
        "cpu_native_bf16": cpu_computes_bf16_natively() if device.type == "cpu" else None,
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "model": args.model, "depth": args.depth, "batch_size": batch_size,
        "tile_shape": [args.n_mels, args.n_frames],
        "dino_crops": {"global": 2, "local": args.local_crops, "out_dim": args.dino_out_dim},
        "steps": args.steps, "repeats": args.repeats,
        "ceiling": {"dtype": str(ceiling_dtype).replace("torch.", ""), "matmul_size": matmul_size,
                    "tflops": ceiling / 1e12, "measurements_tflops": [c / 1e12 for c in ceilings]},
        "loader": loader_throughput(args, batch_size, device),
        "methods": results,
        "torch": torch.__version__,
    }


if __name__ == "__main__":
    print(json.dumps(main(ARGS)))
