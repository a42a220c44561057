"""The `soundscape-ssl` command: one subcommand per stage; each delegates to its module.

Stage modules are imported inside their handlers, so torch and the other heavy dependencies
load only when a stage that needs them runs. Every subcommand fails the same way, through
`core.cli.run_command`: one line `soundscape-ssl COMMAND: error: ...` on stderr, exit 2 for a bad
command line or config and 1 for a failure, the traceback only with `--verbose` (accepted before
or after the subcommand's name).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from ..core.cli import VERBOSE_FLAGS, CommandParser, run_command
from ..core.config import add_config_options, config_from_options

log = logging.getLogger("soundscape_ssl")


def _cmd_synth_archive(args: argparse.Namespace) -> int:
    from ..recordings.synth import SynthConfig, generate_archive

    out_dir = generate_archive(Path(args.out), config_from_options(SynthConfig, args))
    print(out_dir)
    return 0


def _cmd_inventory(args: argparse.Namespace) -> int:
    from ..recordings.archive import scan_archive

    inventory = scan_archive(Path(args.archive), sites_csv=Path(args.sites_csv) if args.sites_csv else None)
    if args.out:
        inventory.save(Path(args.out))
    files, quarantine = inventory.files, inventory.quarantine
    print(f"{len(files)} files, {files['duration_s'].sum() / 3600:.2f} h, "
          f"{files['recorder'].nunique()} recorders; {len(quarantine)} quarantined")
    if len(quarantine):
        print(quarantine.groupby("reason").size().to_string())
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .runner import run_pipeline

    run_dir = run_pipeline(profile=args.profile, run_id=args.run_id, only=args.only, start_from=args.start_from,
                           repo_root=Path(args.repo_root) if args.repo_root else None)
    print(run_dir)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from ..report.site import ReportConfig, build_report

    summary = build_report(Path(args.run_dir), config_from_options(ReportConfig, args))
    print(f"{summary.index} ({summary.n_clusters} clusters, {summary.n_clips} clips, "
          f"{summary.n_bytes / 1e6:.1f} MB, {summary.wall_s:.1f} s)")
    return 0


def _cmd_figures(args: argparse.Namespace) -> int:
    from ..report.published import publish_figures
    from .runner import find_repo_root

    readme = publish_figures(Path(args.run_dir), Path(args.out), repo_root=find_repo_root())
    print(readme)
    return 0


def _cmd_label(args: argparse.Namespace) -> int:
    from ..analysis.labels import label_run

    summary = label_run(Path(args.run), Path(args.names), space=args.space,
                        out_dir=Path(args.out) if args.out else None)
    print(summary.line())
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from ..analysis.search import SearchConfig, default_out_dir, require_run, search_run, write_result
    from ..report.search_page import write_search_page
    from ..report.site import find_main_space

    run_dir = require_run(Path(args.run))
    space = args.space or find_main_space(run_dir)
    if not space:
        raise ValueError(f"{run_dir} has no clustering to take the main space from: name one with --space")
    config = SearchConfig(k=args.k, chunk_rows=args.chunk_rows, device=args.device, index=args.index,
                          nprobe=args.nprobe, band_hz=tuple(args.band_hz) if args.band_hz else None,
                          call_s=tuple(args.call_s) if args.call_s else None, shortlist=args.shortlist)
    result = search_run(run_dir, Path(args.query), space, args.offset_s, config)
    out_dir = default_out_dir(run_dir, args.query, space, config.band_hz, config.call_s)
    csv_path = write_result(result, Path(args.out) if args.out else out_dir / "hits.csv")
    print(csv_path)
    if not args.no_page:
        print(write_search_page(run_dir, result.table, result.record(), out_dir, threads=args.threads))
    return 0


# subcommand -> module whose `main(argv)` takes the remaining arguments unchanged (it is also run
# as `python -m`, e.g. under torchrun, and fails the same way: `core.cli.run_command`)
PASSTHROUGH_COMMANDS = {"tile": "soundscape_ssl.tiles.tiling", "embed": "soundscape_ssl.analysis.embed",
                        "validate": "soundscape_ssl.analysis.validate",
                        "indices": "soundscape_ssl.analysis.indices"}
# subcommands whose parser is built here
OWN_COMMANDS = ("run", "synth-archive", "inventory", "report", "figures", "label", "search")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="soundscape-ssl", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)  # subparsers are CommandParsers too

    run = commands.add_parser("run", help="execute the numbered notebooks with papermill into runs/<run_id>/")
    run.add_argument("--profile", default="demo", help="a name in configs/ or a path to a YAML profile")
    run.add_argument("--run-id", default=None, help="run folder name (default: <profile>-<timestamp>)")
    run.add_argument("--only", nargs="+", default=None, metavar="NN", help="run only these notebooks (01 03 ...)")
    run.add_argument("--from", dest="start_from", default=None, metavar="NN", help="start at this notebook")
    run.add_argument("--repo-root", default=None, help="folder holding notebooks/ and configs/")
    run.set_defaults(handler=_cmd_run)

    synth = commands.add_parser("synth-archive", help="generate the deterministic synthetic recorder archive")
    synth.add_argument("out", help="output folder")
    from ..recordings.synth import SynthConfig

    add_config_options(synth, SynthConfig)
    synth.set_defaults(handler=_cmd_synth_archive)

    inventory = commands.add_parser("inventory", help="inventory a folder tree of recordings (headers only)")
    inventory.add_argument("archive", help="root folder of the recordings")
    inventory.add_argument("--sites-csv", default=None, help="recorder, habitat, lat, lon (default: ARCHIVE/sites.csv)")
    inventory.add_argument("--out", default=None, help="folder for files.parquet, quarantine.parquet, config.json")
    inventory.set_defaults(handler=_cmd_inventory)

    report = commands.add_parser("report", help="write RUN_DIR/report/: a static site of the run (every figure "
                                                "and score table, a page per cluster with its tiles' audio)")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (runs/<run_id>)")
    from ..report.site import ReportConfig

    add_config_options(report, ReportConfig)
    report.set_defaults(handler=_cmd_report)

    figures = commands.add_parser("figures", help="copy a run's published figures into a folder with a README "
                                                  "table (`make figures`)")
    figures.add_argument("run_dir", metavar="RUN_DIR", help="the reference run (runs/reference)")
    figures.add_argument("--out", default="figures", help="the published folder (default: figures)")
    figures.set_defaults(handler=_cmd_figures)

    label = commands.add_parser("label", help="propagate an expert's cluster names (cluster_names.csv) to every "
                                              "tile: RUN_DIR/labels/tiles.parquet and one Raven selection table "
                                              "per recording")
    label.add_argument("--run", required=True, metavar="RUN_DIR", help="a run folder (runs/<run_id>)")
    label.add_argument("--names", required=True, metavar="CSV",
                       help="the filled-in cluster_names.csv (notebook 04 writes it beside the clustering)")
    label.add_argument("--space", default=None, help="the clustering to label (default: the run's only one)")
    label.add_argument("--out", default=None, help="output folder (default: RUN_DIR/labels)")
    label.set_defaults(handler=_cmd_label)

    search = commands.add_parser("search", help="the tiles of a run nearest a query clip (search by example): "
                                                "CSV and a page with audio under RUN_DIR/search/")
    search.add_argument("--run", required=True, metavar="RUN_DIR", help="a run folder (runs/<run_id>)")
    search.add_argument("--query", required=True, metavar="CLIP", help="an audio file holding the call")
    search.add_argument("--offset-s", type=float, default=0.0,
                        help="start of the query's tile-long span in the clip, s (default 0)")
    search.add_argument("-k", "--k", type=int, default=50, help="tiles returned (default 50)")
    search.add_argument("--space", default="", help="e.g. vicreg_band or logmel_stats (default: the run's "
                                                    "clustered main space)")
    search.add_argument("--out", default="", help="CSV of the hits (default RUN_DIR/search/<query>-<space>/hits.csv)")
    search.add_argument("--no-page", action="store_true", help="write the CSV only, no page with audio")
    search.add_argument("--chunk-rows", type=int, default=65_536, help="rows scored at once (bounds memory)")
    search.add_argument("--index", default="exact", choices=("exact", "ivf"),
                        help="exact: brute force (default); ivf: a faiss index built once per space and kept "
                             "(approximate; many queries over millions of tiles; needs faiss-cpu)")
    search.add_argument("--nprobe", type=int, default=16, help="ivf: index lists searched (more: slower, exacter)")
    search.add_argument("--band-hz", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="compare only this frequency band, as a Raven box's Low and High Freq (needs "
                             "logmel_stats or a *_band space; exact search)")
    search.add_argument("--call-s", type=float, nargs=2, default=None, metavar=("START", "END"),
                        help="the call's time in the query tile, s from --offset-s, as a Raven box's Begin and "
                             "End Time: the --shortlist nearest tiles are re-ranked by their window of the "
                             "call's length nearest the call (needs logmel_stats, a *_band or a *_mean space)")
    search.add_argument("--shortlist", type=int, default=500,
                        help="with --call-s: tiles of the pooled search re-ranked (default 500)")
    search.add_argument("--device", default="cpu", help="where the query is embedded: cpu, cuda or auto")
    search.add_argument("--threads", type=int, default=2, help="threads cutting the hits' clips")
    search.set_defaults(handler=_cmd_search)

    # Listed for --help only: main() hands their arguments to the module's own parser.
    commands.add_parser("tile", help="tile an inventory into a log-mel tile store "
                                     "(options: soundscape-ssl tile --help; also python -m soundscape_ssl.tiles.tiling)")
    commands.add_parser("embed", help="embed a tile store or any audio files with a checkpoint's backbone "
                                      "(options: soundscape-ssl embed --help; also python -m soundscape_ssl.analysis.embed)")
    commands.add_parser("indices", help="acoustic indices (scikit-maad) of every tile of a tile store "
                                        "(options: soundscape-ssl indices --help; also python -m soundscape_ssl.analysis.indices)")
    commands.add_parser("validate", help="score output spaces on labelled recordings "
                                         "(options: soundscape-ssl validate --help; also python -m soundscape_ssl.analysis.validate)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`soundscape-ssl [-v] COMMAND ...`: the exit code; any error is one line on stderr,
    `soundscape-ssl COMMAND: error: ...` (exit 2 for a bad command line, 1 for a failure)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    position = next((i for i, token in enumerate(argv) if token not in VERBOSE_FLAGS), None)
    command = argv[position] if position is not None else None
    if command in PASSTHROUGH_COMMANDS:
        import importlib

        module = importlib.import_module(PASSTHROUGH_COMMANDS[command])
        return module.main(argv[:position] + argv[position + 1:])
    prog = "soundscape-ssl" + (f" {command}" if command in OWN_COMMANDS else "")
    return run_command(prog, _main, argv)


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
