"""Labelling clusters on the synthetic archive: how many tiles one naming decision labels, and how
often the propagated name is right.

The planted truth plays the expert: the `--largest` clusters of the run's main space are named by
their majority planted label (`analysis.labels.measure_labelling`), `soundscape-ssl label`'s code
propagates the names, and the propagated names are scored against each tile's planted labels:
precision_dominant counts a hit when the name is the tile's dominant planted label (the label
notebook 04 scores clusters against), precision_any when it is any label that counts in the tile
(a wren cluster's tile where a robin is louder still holds a wren); precision_by_confidence_quartile
gives precision_dominant in four equal-count bins of the tiles' confidence, least confident first. base_rate is the precision of
the same names given to random tiles; the JSON's ratio is precision_dominant / base_rate.
Everything is written under `--out`; the run folder is only read.

    python benchmarks/labelling.py --run runs/reference --out runs/labelling-reference

Without a finished run it fails with one line; `--skip-missing-run` (what `make bench` passes) prints
a JSON line saying it skipped, and why, instead.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

from soundscape_ssl.analysis.labels import measure_labelling
from soundscape_ssl.core.cli import CommandParser, run_command


def main(argv: list[str]) -> int:
    parser = CommandParser(prog="benchmarks/labelling.py", description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/reference",
                        help="a finished run on the synthetic archive (default: runs/reference, `make figures`)")
    parser.add_argument("--out", default=None,
                        help="folder for the names files, labels and precision.csv (default: runs/labelling-<run>)")
    parser.add_argument("--skip-missing-run", action="store_true",
                        help="no finished run at --run: print a JSON line saying so and exit 0 (make bench)")
    parser.add_argument("--archive", default=None, help="the synthetic archive (default: archive_dir of RUN/params.yaml)")
    parser.add_argument("--largest", type=int, default=20, help="clusters named (largest first)")
    parser.add_argument("--space", default=None, help="the clustering (default: the run's only one)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run)
    if not (run_dir / "params.yaml").is_file():
        reason = f"{run_dir} is not a finished run (no params.yaml): run `make figures` or `make demo` first"
        if args.skip_missing_run:
            print(json.dumps({"benchmark": "labelling", "skipped": reason}))
            return 0
        raise ValueError(reason)
    out_dir = Path(args.out) if args.out else Path("runs") / f"labelling-{run_dir.name}"
    archive = args.archive or yaml.safe_load((run_dir / "params.yaml").read_text())["archive_dir"]
    started = time.perf_counter()
    scores, by_confidence, summary = measure_labelling(run_dir, archive, out_dir, args.largest, args.space)
    print(scores.round(3).to_string(index=False))
    print(by_confidence.round(3).to_string(index=False))
    print(summary.line())
    overall = scores.set_index("name").loc["all"]
    print(json.dumps({
        "benchmark": "labelling", "run": str(run_dir), "space": summary.space, "named_clusters": summary.n_named_clusters,
        "n_tiles": summary.n_tiles, "tiles_labelled": int(overall["tiles_labelled"]),
        "tiles_per_decision": round(float(overall["tiles_per_decision"]), 1),
        "precision_dominant": round(float(overall["precision_dominant"]), 3),
        "precision_any": round(float(overall["precision_any"]), 3),
        "baseline": "base_rate (the same names on random tiles)", "base_rate": round(float(overall["base_rate"]), 3),
        "ratio": round(float(overall["precision_dominant"] / overall["base_rate"]), 2),
        "precision_by_confidence_quartile": [round(float(p), 3) for p in by_confidence["precision"]],
        "n_selections": summary.n_selections, "wall_s": round(time.perf_counter() - started, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(run_command("benchmarks/labelling.py", main))
