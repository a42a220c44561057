"""Every command fails alike: one line `soundscape-ssl COMMAND: error: ...` on stderr, exit 2 for a
bad command line or config, 1 for a failure, no traceback unless --verbose (core/cli.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from soundscape_ssl.core.cli import UsageError, describe_error, run_command
from soundscape_ssl.core.config import ConfigError, config_from_options
from soundscape_ssl.pipeline import cli
from soundscape_ssl.pretrain import train
from soundscape_ssl.tiles import tiling
from soundscape_ssl.tiles.spectrogram import SpectrogramConfig
from soundscape_ssl.tiles.tiling import TilingConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    """A WAV, a CSV, a folder and a labelled set of six short recordings (two labels)."""
    rng = np.random.default_rng(0)
    labelled = tmp_path / "labelled"
    labelled.mkdir()
    rows = ["path,label"]
    for index in range(6):
        sf.write(labelled / f"rec{index}.wav", (0.1 * rng.standard_normal(16000 * 6)).astype("float32"), 16000)
        rows.append(f"rec{index}.wav,{'ab'[index % 2]}")
    (labelled / "labels.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "folder").mkdir()
    return {"wav": labelled / "rec0.wav", "csv": labelled / "labels.csv", "labelled": labelled,
            "folder": tmp_path / "folder", "out": tmp_path / "out"}


def _fails(argv: list[str], capsys, code: int) -> str:
    """Run `soundscape-ssl ARGV`; assert the exit code and one error line without a traceback."""
    assert cli.main(argv) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1, err
    command = argv[0] if argv and argv[0] in (*cli.OWN_COMMANDS, *cli.PASSTHROUGH_COMMANDS) else ""
    assert lines[0].startswith(f"soundscape-ssl{' ' + command if command else ''}: error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize("argv, code, expected", [
    ([], 2, "the following arguments are required: command"),
    (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    (["run", "--profile", "nope", "--repo-root", str(REPO)], 1, "profile 'nope' not found"),
    (["run", "--only", "09", "--repo-root", str(REPO)], 2, "--only ['09'] names no notebook"),
    (["synth-archive", "{out}", "--days", "x"], 2, "argument --days: expected int, got 'x'"),
    (["synth-archive", "{out}", "--days", "0"], 2, "days must be >= 1, got 0"),
    (["synth-archive", "{out}", "--rain-day-probability"], 2, "argument --rain-day-probability: expected one"),
    (["inventory", "{folder}/missing"], 1, "is not a directory"),
    (["tile", "--out", "{out}"], 2, "--inventory is required unless --finalize-only"),
    (["tile", "--inventory", "{folder}/missing", "--out", "{out}"], 1,
     "inventory {folder}/missing: no such file or folder"),
    (["tile", "--inventory", "{wav}", "--out", "{out}"], 1, "is not a readable Parquet table"),
    (["tile", "--inventory", "{csv}", "--out", "{out}", "--tile-s", "3.3333"], 2,
     "SpectrogramConfig options: tile_s=3.3333 s must be a positive whole number of samples"),
    (["embed", "--audio", "{wav}", "--out", "{out}/e.npy"], 2, "the following arguments are required: --checkpoint"),
    (["embed", "--audio", "{wav}", "--checkpoint", "{wav}", "--out", "{out}/e.npy", "--pooling", "max"], 2,
     "pooling must be one of"),
    (["embed", "--audio", "{wav}", "--checkpoint", "{wav}", "--out", "{out}/e.npy"], 1,
     "rec0.wav is not a soundscape-ssl checkpoint: it is a WAV audio file"),
    (["validate", "--labels", "{csv}", "--audio-dir", "{folder}", "--out", "{out}", "--n-folds", "x"], 2,
     "argument --n-folds: expected int, got 'x'"),
    (["report", "{folder}"], 1, "{folder} is not a run folder: it has no manifest.json"),
    (["report", "{folder}", "--central-tiles", "0"], 2, "need central_tiles >= 1"),
    (["report", "{folder}", "--clips.audio-format", "mp3"], 2, "audio_format must be one of ['flac', 'ogg']"),
    (["figures", "{folder}"], 1, "{folder} is not a run folder"),
])
def test_every_subcommand_turns_bad_input_into_one_line(argv, code, expected, files, capsys) -> None:
    def real(token: str) -> str:
        for name in ("wav", "csv", "folder", "out"):
            token = token.replace("{" + name + "}", str(files[name]))
        return token

    line = _fails([real(token) for token in argv], capsys, code)
    assert real(expected) in line


def test_validate_refuses_a_missing_checkpoint_before_any_work(files, capsys) -> None:
    """issue 17.4: it logged a warning, scored log-mel alone and exited 0."""
    missing = files["folder"] / "pretrain" / "dino" / "checkpoint.pth"
    line = _fails(["validate", "--labels", str(files["csv"]), "--audio-dir", str(files["labelled"]),
                   "--checkpoint", str(missing), "--out", str(files["out"]), "--include-birdnet", "false",
                   "--n-bootstrap", "10", "--n-folds", "2"], capsys, 1)
    assert line == f"soundscape-ssl validate: error: checkpoint {missing}: no such file"
    assert not files["out"].exists()  # nothing was scored or written


def test_verbose_shows_the_traceback_before_or_after_the_subcommand(files, capsys) -> None:
    missing = str(files["folder"] / "missing")
    for argv in (["-v", "inventory", missing], ["inventory", missing, "--verbose"],
                 ["--verbose", "tile", "--inventory", missing, "--out", str(files["out"])],
                 ["tile", "--inventory", missing, "--out", str(files["out"]), "-v"]):
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err
        assert err.rstrip().splitlines()[-1].startswith(f"soundscape-ssl {argv[1] if argv[0].startswith('-') else argv[0]}: error: ")


def test_help_still_exits_zero(capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli.main(["tile", "--help"])
    assert stopped.value.code == 0
    assert "--tile-s" in capsys.readouterr().out


def test_python_m_entry_points_share_the_one_line_errors(tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(REPO / "lib"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    for module, argv, code, expected in [
        ("soundscape_ssl.tiles.tiling", ["--inventory", str(tmp_path / "none"), "--out", str(tmp_path / "s")], 1,
         "soundscape-ssl tile: error: inventory"),
        ("soundscape_ssl.pretrain.train", ["--store-dir", "s", "--out-dir", "o", "--epochs", "many"], 2,
         "python -m soundscape_ssl.pretrain.train: error: argument --epochs: expected int, got 'many'"),
    ]:
        completed = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True,
                                   env=env, timeout=300)
        assert completed.returncode == code, completed.stderr
        assert "Traceback" not in completed.stderr
        assert completed.stderr.strip().splitlines()[-1].startswith(expected), completed.stderr


def test_training_keeps_its_documented_exit_codes(tmp_path: Path, capsys) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"store_dir": str(tmp_path / "no_store"), "out_dir": str(tmp_path / "o"),
                                      "dino": {"out_dimm": 8}}))
    assert train.main(["--config", str(config)]) == train.EXIT_CONFIG_ERROR
    assert "unknown key 'out_dimm'" in capsys.readouterr().err
    config.write_text(yaml.safe_dump({"store_dir": str(tmp_path / "no_store"), "out_dir": str(tmp_path / "o")}))
    assert train.main(["--config", str(config)]) == train.EXIT_CONFIG_ERROR  # a missing tile store
    err = capsys.readouterr().err
    assert "no_store" in err and "Traceback" not in err


def test_run_command_maps_exceptions_to_codes_and_lines(capsys) -> None:
    def failing(error: BaseException):
        def main(argv: list[str]) -> int:
            raise error
        return main

    assert run_command("prog", failing(UsageError("bad flag")), []) == 2
    assert run_command("prog", failing(ConfigError(["one", "two"])), []) == 2
    assert run_command("prog", failing(FileNotFoundError("x: no such file")), []) == 1
    assert run_command("prog", failing(RuntimeError("CUDA out of memory.\nTried to allocate")), []) == 1
    assert run_command("prog", failing(KeyboardInterrupt()), []) == 130
    assert run_command("prog", failing(ValueError("v")), [], exit_codes={ValueError: 7}) == 7
    assert run_command("prog", lambda argv: None, []) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["prog: error: bad flag", "prog: error: one; two", "prog: error: x: no such file",
                     "prog: error: RuntimeError: CUDA out of memory.; Tried to allocate", "prog: interrupted",
                     "prog: error: v"]
    assert describe_error(TypeError("bug")) == ("TypeError: bug (unexpected: rerun with --verbose for the "
                                                "traceback)")


def test_tiling_command_arguments_give_back_the_same_configs(tmp_path: Path) -> None:
    """What notebook 02 hands torchrun: parsed by the tile command, the very same configs."""
    config = SpectrogramConfig(tile_s=2.0, tile_hop_s=1.0, mel_norm=None, f_min_hz=100.0)
    cut = TilingConfig(unit_max_tiles=9)
    arguments = tiling.command_arguments(tmp_path / "files.parquet", tmp_path / "store", config, cut, device="cuda")
    args = tiling.build_parser().parse_args(arguments)
    assert config_from_options(SpectrogramConfig, args) == config
    assert config_from_options(TilingConfig, args) == cut
    assert (args.inventory, args.out, args.device, args.no_progress) == \
        (tmp_path / "files.parquet", tmp_path / "store", "cuda", True)
