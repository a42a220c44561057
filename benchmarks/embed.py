"""Tiles embedded per second, end to end from a tile store, against the model alone.

Measured in the same process, medians over repeats, each kind after one untimed warm-up:

- ``model_only`` (the baseline): `soundscape_ssl.analysis.embed.TileEmbedder` on one batch of tiles that
  already sits on the device (normalisation, backbone, pooling), synchronised; the ceiling.
- ``end_to_end``: `soundscape_ssl.analysis.embed.embed_store` on the store: checkpoint load and sha256,
  reader processes, pinned copies, forward, background chunk writes, final assembly and
  config.json. Reported as `tiles_per_s` (tiles / wall time of the call) and
  `streaming_tiles_per_s` (after the first batch, i.e. without start-up and compilation).
  `ratio_*_vs_model_only` says how close the pipeline comes to keeping the model busy.

The store: a small synthetic store (`--base-tiles`, 32 kHz 16-bit WAVs tiled by
`soundscape_ssl.tiles.tiling`) whose shards are hard-linked `--copies` times into a larger store and
finalised. The copies share the page cache, so this measures reading from memory (as on a
node whose RAM holds the store, the common case after tiling), not from cold disk. Or pass
`--store` to use an existing store.

    python benchmarks/embed.py                                  # CPU, a tiny model
    python benchmarks/embed.py --device cuda --arch vit_small --depth 0 --embed-dim 0 \\
        --base-tiles 4096 --copies 50 --batch-size 512 --num-workers 6 [--compile]

The issue's target: 30,000 tiles/s end to end on one H100 with ViT-S/16 on 128 x 256 tiles
(the model alone measured 30k/s eager, 41k/s compiled). The last line printed is one JSON object.
"""

from __future__ import annotations

import os

# CPU threads fixed before numpy / torch load (reader processes inherit this).
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from soundscape_ssl.pretrain.checkpoint import build_checkpoint, load_backbone, save_checkpoint  # noqa: E402
from soundscape_ssl.analysis.embed import EmbedConfig, TileEmbedder, embed_store, resolve_compute  # noqa: E402
from soundscape_ssl.pretrain.models import BackboneConfig, build_backbone  # noqa: E402
from soundscape_ssl.core.provenance import package_versions  # noqa: E402
from soundscape_ssl.tiles.spectrogram import SpectrogramConfig  # noqa: E402
from soundscape_ssl.tiles.store import (PLAN_FILE, TileStore, shard_path, unit_index_path,  # noqa: E402
                                  unit_skipped_path)
from soundscape_ssl.tiles.tiling import TilingConfig, finalize_store, stage_plan, tile_archive  # noqa: E402
from soundscape_ssl.core.stage import StageRun  # noqa: E402

logging.getLogger("soundscape_ssl").setLevel(logging.WARNING)

TARGET_TILES_PER_S = 30000.0   # one H100, ViT-S/16, 128 x 256 tiles (the issue)
FILE_S = 60.0


def synth_recording(seconds: float, sample_rate_hz: int, seed: int) -> np.ndarray:
    """Noise floor with chirps: tiles that differ (the model's cost does not depend on content)."""
    rng = np.random.default_rng(seed)
    n = round(seconds * sample_rate_hz)
    signal = 0.01 * rng.standard_normal(n)
    t = np.arange(round(0.3 * sample_rate_hz)) / sample_rate_hz
    for start in rng.uniform(0, seconds - 0.5, size=max(1, int(seconds / 2))):
        i0 = round(start * sample_rate_hz)
        f0 = rng.uniform(2000, 7000)
        signal[i0:i0 + len(t)] += 0.2 * np.sin(2 * np.pi * (f0 * t + 4000 * t * t)) * np.hanning(len(t))
    return np.clip(signal, -1, 1).astype(np.float32)


def build_base_store(work: Path, n_tiles: int, config: SpectrogramConfig, device: str) -> Path:
    """A store of about `n_tiles` tiles from synthetic WAVs at the model rate (no resampling)."""
    archive, store = work / "archive", work / "base_store"
    tiles_per_file = int(FILE_S // config.tile_hop_s)
    rows = []
    for k in range(max(1, -(-n_tiles // tiles_per_file))):
        relpath = f"BENCH01/BENCH01_20210524_{k // 60:02d}{k % 60:02d}00.wav"
        path = archive / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, synth_recording(FILE_S, config.sample_rate_hz, k), config.sample_rate_hz,
                 subtype="PCM_16")
        rows.append(dict(recorder="BENCH01", habitat="canopy", path=str(path), relpath=relpath,
                         start_time=pd.Timestamp("2021-05-24") + pd.Timedelta(minutes=k),
                         sample_rate_hz=config.sample_rate_hz,
                         frames=round(FILE_S * config.sample_rate_hz)))
    tile_archive(pd.DataFrame(rows), store, config=config, tiling=TilingConfig(),
                 rank=0, world_size=1, device=device, show_progress=False)
    return store


def replicate_store(base: Path, target: Path, copies: int) -> Path:
    """`copies` x the base store's units (shards hard-linked, unit tables renumbered), finalised.

    The units are committed through the stage runner, so the copy has its done markers."""
    plan = json.loads((base / PLAN_FILE).read_text())
    n_units = int(plan["n_units"])
    plan.update(n_units=n_units * copies, n_files=plan["n_files"] * copies,
                n_tiles_planned=plan["n_tiles_planned"] * copies, audio_s=plan["audio_s"] * copies,
                fingerprint=f"{plan['fingerprint']}-x{copies}")
    with StageRun(target, stage_plan(plan), rank=0, world_size=1) as run:
        for new_unit in run.todo:
            unit = new_unit % n_units
            with run.unit(new_unit) as out:
                os.link(shard_path(base, unit), out.output(shard_path(target, new_unit)))
                index = pq.read_table(unit_index_path(base, unit))
                shard = index.schema.get_field_index("shard")
                index = index.set_column(shard, "shard",
                                         pa.array(np.full(index.num_rows, new_unit, np.int32)))
                skipped = pq.read_table(unit_skipped_path(base, unit))
                column = skipped.schema.get_field_index("unit")
                skipped = skipped.set_column(column, "unit",
                                             pa.array(np.full(skipped.num_rows, new_unit, np.int32)))
                pq.write_table(skipped, out.output(unit_skipped_path(target, new_unit)))
                pq.write_table(index, out.output(unit_index_path(target, new_unit)))
    finalize_store(target)
    return target


def make_checkpoint(path: Path, store: TileStore, args: argparse.Namespace) -> Path:
    backbone = BackboneConfig(arch=args.arch, n_mels=store.config.n_mels,
                              n_frames=store.config.n_frames, embed_dim=args.embed_dim or None,
                              depth=args.depth or None, num_heads=args.num_heads or None)
    torch.manual_seed(0)
    model = build_backbone(backbone)
    return save_checkpoint(path, build_checkpoint(
        method="mae", step=0, epoch=0, world_size=1, backbone_config=backbone, method_config={},
        train_config={}, spectrogram_config=store.config, normalization=store.normalization,
        model_state={}, backbone_state=model.state_dict(), optimizer_state={}))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_only(checkpoint: Path, store: TileStore, config: EmbedConfig, batches: int,
               repeats: int) -> dict[str, object]:
    """Tiles/s of the forward path alone, on one device-resident batch of real tiles."""
    device, precision = resolve_compute(config)
    model, metadata = load_backbone(checkpoint)
    config = config.for_checkpoint(metadata)             # pooling "checkpoint": the method's own
    embedder = TileEmbedder(model, device, precision, config.poolings, metadata["normalization"],
                            config.compile)
    n = min(config.batch_size, len(store))
    tiles = torch.from_numpy(store.read_range(0, n)).to(device)
    for _ in range(3):                                   # warm-up (and compilation)
        embedder(tiles)
    synchronize(device)
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(batches):
            embedder(tiles)
        synchronize(device)
        rates.append(batches * n / (time.perf_counter() - started))
    return {"batch_tiles": n, "batches_per_run": batches, "runs_tiles_per_s": [round(r, 1) for r in rates],
            "median_tiles_per_s": round(statistics.median(rates), 1),
            "parameters": sum(p.numel() for p in model.parameters())}


def end_to_end(store_dir: Path, checkpoint: Path, out_root: Path, config: EmbedConfig,
               repeats: int) -> dict[str, object]:
    runs = []
    for run in range(repeats + 1):                       # run 0: warm-up, not recorded
        out_dir = out_root / f"run{run}"
        summary = embed_store(store_dir, checkpoint, out_dir, config, rank=0, world_size=1,
                              show_progress=False)
        shutil.rmtree(out_dir, ignore_errors=True)
        if run:
            runs.append(summary)
    n = runs[0].n_tiles

    def median(values: list[float]) -> float:
        return round(statistics.median(values), 4)

    streaming = [(s.tiles_embedded - s.first_batch_tiles) / max(s.embed_s - s.first_batch_s, 1e-9)
                 for s in runs]
    return {"n_tiles": n,
            "runs_wall_s": [round(s.wall_s, 4) for s in runs],
            "median_wall_s": median([s.wall_s for s in runs]),
            "median_setup_s": median([s.setup_s for s in runs]),
            "median_first_batch_s": median([s.first_batch_s for s in runs]),
            "median_embed_s": median([s.embed_s for s in runs]),
            "median_assemble_s": median([s.assemble_s for s in runs]),
            "tiles_per_s": round(n / statistics.median([s.wall_s for s in runs]), 1),
            "streaming_tiles_per_s": round(statistics.median(streaming), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--store", type=Path, default=None, help="an existing tile store")
    parser.add_argument("--base-tiles", type=int, default=240, help="tiles of the synthetic base store")
    parser.add_argument("--copies", type=int, default=8, help="hard-linked copies of the base store")
    parser.add_argument("--arch", default="vit_tiny", help="vit_tiny / vit_small / vit_base")
    parser.add_argument("--depth", type=int, default=2, help="0: the architecture's")
    parser.add_argument("--embed-dim", type=int, default=64, help="0: the architecture's")
    parser.add_argument("--num-heads", type=int, default=2, help="0: the architecture's")
    parser.add_argument("--batch-size", type=int, default=EmbedConfig.batch_size)
    parser.add_argument("--chunk-tiles", type=int, default=EmbedConfig.chunk_tiles)
    parser.add_argument("--num-workers", type=int, default=2, help="tile-reading processes")
    parser.add_argument("--precision", default="auto", help="auto, bf16 or fp32")
    parser.add_argument("--pooling", default=EmbedConfig.pooling)
    parser.add_argument("--compile", action="store_true", help="torch.compile the forward pass")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each kind")
    parser.add_argument("--model-batches", type=int, default=20, help="batches per model-only run")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary folder")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    torch.set_num_threads(args.threads)

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="embed_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    build_started = time.perf_counter()
    if args.store is None:
        base = build_base_store(work, args.base_tiles, SpectrogramConfig(), args.device)
        store_dir = replicate_store(base, work / "store", args.copies) if args.copies > 1 else base
        store_source = (f"synthetic: {len(TileStore(base))} tiles hard-linked x{args.copies} "
                        "(read from the page cache)")
    else:
        store_dir, store_source = args.store, str(args.store)
    store = TileStore(store_dir)
    build_s = time.perf_counter() - build_started
    checkpoint = make_checkpoint(work / "checkpoint.pth", store, args)
    config = EmbedConfig(pooling=args.pooling, batch_size=args.batch_size,
                         chunk_tiles=args.chunk_tiles, device=args.device, precision=args.precision,
                         num_workers=args.num_workers, compile=args.compile)
    device, precision = resolve_compute(config)

    baseline = model_only(checkpoint, store, config, args.model_batches, args.repeats)
    pipeline = end_to_end(store_dir, checkpoint, work / "out", config, args.repeats)
    model_rate = float(baseline["median_tiles_per_s"])
    print(f"model only  {model_rate:>10.1f} tiles/s\nend to end  {pipeline['tiles_per_s']:>10.1f} "
          f"tiles/s ({pipeline['streaming_tiles_per_s']:.1f} streaming)", file=sys.stderr)
    is_target_setting = (device.type == "cuda" and args.arch == "vit_small" and not args.depth
                         and not args.embed_dim and store.tile_shape == (128, 256))
    result: dict[str, object] = {
        "benchmark": "embed",
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "precision": precision,
        "threads": torch.get_num_threads(),
        "store": store_source,
        "store_build_s": round(build_s, 2),
        "tile_shape": list(store.tile_shape),
        "model": {"arch": args.arch, "depth": args.depth or None, "embed_dim": args.embed_dim or None,
                  "num_heads": args.num_heads or None, "parameters": baseline.pop("parameters")},
        "config": dataclasses.asdict(config),
        "baseline_model_only": baseline,
        "end_to_end": pipeline,
        "ratio_end_to_end_vs_model_only": round(pipeline["tiles_per_s"] / model_rate, 3),
        "ratio_streaming_vs_model_only": round(pipeline["streaming_tiles_per_s"] / model_rate, 3),
        "target_tiles_per_s": TARGET_TILES_PER_S,
        # The target is defined for ViT-S/16 on 128 x 256 tiles on a GPU only.
        "target_met": (pipeline["tiles_per_s"] >= TARGET_TILES_PER_S) if is_target_setting else None,
        "versions": package_versions(("torch", "timm", "numpy")),
        "machine": {"python": platform.python_version(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count()},
    }
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
