"""The `soundscape-ssl` command: one subcommand per stage; each delegates to its module.

Stage modules are imported inside their handlers, so torch and the other heavy dependencies
load only when a stage that needs them runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger("soundscape_ssl")


def add_dataclass_options(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """One `--field-name` option per dataclass field, typed from the annotation.

    Booleans take an explicit value (`--flag true|false`): `type=bool` would read "false" as True.
    """
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        hint = hints[field.name]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        option = "--" + field.name.replace("_", "-")
        origin = typing.get_origin(hint)
        if hint is bool:
            parser.add_argument(option, type=_parse_bool, default=default, metavar="{true,false}",
                                help=f"(default: {default})")
        elif origin is tuple:
            item_type = typing.get_args(hint)[0]
            parser.add_argument(option, type=item_type, nargs="+", default=default,
                                help=f"(default: {' '.join(map(str, default))})")
        else:
            parser.add_argument(option, type=hint if hint in (int, float, str) else str, default=default,
                                help=f"(default: {default})")


def dataclass_from_args(config_cls: type, args: argparse.Namespace) -> Any:
    values = {}
    for field in dataclasses.fields(config_cls):
        value = getattr(args, field.name)
        values[field.name] = tuple(value) if isinstance(value, list) else value
    return config_cls(**values)


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _cmd_synth_archive(args: argparse.Namespace) -> int:
    from ..recordings.synth import SynthConfig, generate_archive

    out_dir = generate_archive(Path(args.out), dataclass_from_args(SynthConfig, args))
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
    from .runner import NotebookFailed, run_pipeline

    try:
        run_dir = run_pipeline(profile=args.profile, run_id=args.run_id, only=args.only,
                               start_from=args.start_from,
                               repo_root=Path(args.repo_root) if args.repo_root else None)
    except NotebookFailed as error:
        print(f"soundscape-ssl run: {error}", file=sys.stderr)
        return 1
    print(run_dir)
    return 0


def _run_module_main(module: str, argv: list[str]) -> int:
    """Subcommands whose module has its own argparse `main` (also run as `python -m`, e.g. under torchrun)."""
    import importlib

    from .runner import configure_logging

    configure_logging()
    return int(importlib.import_module(module).main(argv) or 0)


# subcommand -> module whose `main(argv)` takes the remaining arguments unchanged
PASSTHROUGH_COMMANDS = {"tile": "soundscape_ssl.tiles.tiling", "embed": "soundscape_ssl.analysis.embed",
                        "validate": "soundscape_ssl.analysis.validate"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="soundscape-ssl", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

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

    add_dataclass_options(synth, SynthConfig)
    synth.set_defaults(handler=_cmd_synth_archive)

    inventory = commands.add_parser("inventory", help="inventory a folder tree of recordings (headers only)")
    inventory.add_argument("archive", help="root folder of the recordings")
    inventory.add_argument("--sites-csv", default=None, help="recorder, habitat, lat, lon (default: ARCHIVE/sites.csv)")
    inventory.add_argument("--out", default=None, help="folder for files.parquet, quarantine.parquet, config.json")
    inventory.set_defaults(handler=_cmd_inventory)

    # Listed for --help only: main() hands their arguments to the module's own parser.
    commands.add_parser("tile", help="tile an inventory into a log-mel tile store "
                                     "(options: soundscape-ssl tile --help; also python -m soundscape_ssl.tiles.tiling)")
    commands.add_parser("embed", help="embed a tile store or any audio files with a checkpoint's backbone "
                                      "(options: soundscape-ssl embed --help; also python -m soundscape_ssl.analysis.embed)")
    commands.add_parser("validate", help="score output spaces on labelled recordings "
                                         "(options: soundscape-ssl validate --help; also python -m soundscape_ssl.analysis.validate)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH_COMMANDS:
        return _run_module_main(PASSTHROUGH_COMMANDS[argv[0]], argv[1:])
    args = build_parser().parse_args(argv)
    from .runner import configure_logging

    configure_logging(args.verbose)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
