"""Hostile inputs: a checkpoint that carries a pickle payload, files that are not checkpoints, and
profiles that try to become code. Each is refused with one line, and the payload never runs."""

from __future__ import annotations

import pickle
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
import yaml

from soundscape_ssl.analysis import embed, validate
from soundscape_ssl.core.config import ConfigError
from soundscape_ssl.pipeline import cli
from soundscape_ssl.pipeline import runner
from soundscape_ssl.pretrain import train
from soundscape_ssl.pretrain.checkpoint import (CHECKPOINT_FORMAT, CheckpointError, load_backbone,
                                                load_checkpoint, save_untrained_copy)
from soundscape_ssl.tiles.spectrogram import SpectrogramConfig
from soundscape_ssl.tiles.tiling import tile_archive

SPECTROGRAM = SpectrogramConfig(sample_rate_hz=16000, tile_s=1.0, tile_hop_s=1.0, n_fft=512, hop_length=250,
                                n_mels=32, f_min_hz=50.0, f_max_hz=8000.0)


class _Payload:
    """Unpickling this calls open(marker, "w"): the file appears if anything ever unpickles it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture()
def marker(tmp_path: Path) -> Path:
    return tmp_path / "PAYLOAD_RAN"


@pytest.fixture(params=["torch_zip", "pickle_protocol_2", "pickle_protocol_4"])
def hostile(request, tmp_path: Path, marker: Path) -> Path:
    """A checkpoint-looking file whose payload would create `marker`: in torch's zip format (with
    our format tag, so only the unpickler can tell), or as a plain pickle."""
    path = tmp_path / "hostile" / "checkpoint.pth"
    path.parent.mkdir()
    content = {"format": CHECKPOINT_FORMAT, "method": "dino", "backbone": _Payload(marker)}
    if request.param == "torch_zip":
        torch.save(content, path)
    else:
        path.write_bytes(pickle.dumps(content, protocol=int(request.param[-1])))
    assert not marker.exists()
    return path


def _refused(message: str, path: Path) -> None:
    assert f"{path} is not a soundscape-ssl checkpoint (refused to unpickle: " in message
    assert "weights_only" not in message and "trusted" not in message  # no advice to lower the guard


def _one_error_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and "weights_only" not in err
    assert lines[-1].startswith(f"{command}: error: "), err
    assert not [line for line in lines if "error" in line.lower() and line != lines[-1]], err
    return lines[-1]


# -- checkpoints --------------------------------------------------------------------------------


def test_library_entries_refuse_a_hostile_checkpoint(hostile: Path, marker: Path, tmp_path: Path) -> None:
    for load in (load_checkpoint, load_backbone, lambda p: save_untrained_copy(p, tmp_path / "control.pth")):
        with pytest.raises(CheckpointError) as caught:
            load(hostile)
        _refused(str(caught.value), hostile)
    assert not marker.exists() and not (tmp_path / "control.pth").exists()


def test_embed_audio_refuses_a_hostile_checkpoint(hostile: Path, marker: Path, tmp_path: Path, capsys) -> None:
    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros(16000 * 2, dtype="float32"), 16000)
    out = tmp_path / "out" / "e.npy"
    assert cli.main(["embed", "--audio", str(wav), "--checkpoint", str(hostile), "--out", str(out)]) == 1
    _refused(_one_error_line(capsys.readouterr().err, "soundscape-ssl embed"), hostile)
    assert not marker.exists() and not out.parent.exists()


def test_embed_store_refuses_a_hostile_checkpoint(hostile: Path, marker: Path, tmp_path: Path, capsys) -> None:
    store = _tiny_store(tmp_path)
    out = tmp_path / "embeddings"
    assert embed.main(["--store", str(store), "--checkpoint", str(hostile), "--out", str(out)]) == 1
    _refused(_one_error_line(capsys.readouterr().err, "soundscape-ssl embed"), hostile)
    assert not marker.exists() and not out.exists()


def test_validate_refuses_a_hostile_checkpoint_before_any_work(hostile: Path, marker: Path, tmp_path: Path,
                                                               capsys) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\na.wav,x\nb.wav,y\n")
    out = tmp_path / "scores"
    assert validate.main(["--labels", str(labels), "--audio-dir", str(tmp_path), "--checkpoint", str(hostile),
                          "--out", str(out)]) == 1
    _refused(_one_error_line(capsys.readouterr().err, "soundscape-ssl validate"), hostile)
    assert not marker.exists() and not out.exists()


def test_training_refuses_to_resume_from_a_hostile_checkpoint(hostile: Path, marker: Path, tmp_path: Path,
                                                              capsys, monkeypatch) -> None:
    """A run resumes from out_dir/checkpoint.pth: a planted one is refused, the run stops with 2."""
    (tmp_path / "tiny_data.py").write_text(
        "import torch\nfrom soundscape_ssl.pretrain.train import TrainData\n"
        "def tiles(store_dir):\n    return TrainData(torch.zeros(16, 1, 32, 64), None, None)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "method": "mae", "store_dir": "unused", "out_dir": str(hostile.parent), "dataset_factory": "tiny_data:tiles",
        "device": "cpu", "num_workers": 0, "batch_size_per_gpu": 4, "epochs": 1,
        "model": {"arch": "vit_tiny", "depth": 1, "embed_dim": 32, "num_heads": 2, "n_mels": 32, "n_frames": 64},
        "mae": {"decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2}}))
    before = hostile.read_bytes()
    assert train.main(["--config", str(config)]) == train.EXIT_CONFIG_ERROR
    _refused(_one_error_line(capsys.readouterr().err, "python -m soundscape_ssl.pretrain.train"), hostile)
    assert not marker.exists()
    assert hostile.read_bytes() == before  # not overwritten by a fresh run either


def _tiny_store(tmp_path: Path) -> Path:
    wav = tmp_path / "archive" / "R1_20210524_050000.wav"
    wav.parent.mkdir()
    sf.write(wav, (0.1 * np.random.default_rng(0).standard_normal(16000 * 3)).astype("float32"), 16000)
    files = pd.DataFrame([dict(recorder="R1", habitat="canopy", path=str(wav), relpath=wav.name,
                               start_time=pd.Timestamp("2021-05-24 05:00:00"), sample_rate_hz=16000,
                               frames=16000 * 3, duration_s=3.0, channels=1)])
    store = tmp_path / "store"
    tile_archive(files, store, config=SPECTROGRAM, rank=0, world_size=1, show_progress=False)
    return store


@pytest.mark.parametrize("kind, expected", [
    ("wav", "is not a soundscape-ssl checkpoint: it is a WAV audio file"),
    ("csv", "is not a soundscape-ssl checkpoint: it is a text file (it starts 'path,label')"),
    ("folder", "is a folder, not a soundscape-ssl checkpoint file"),
    ("run_folder", "is a folder, not a soundscape-ssl checkpoint file; did you mean "),
    ("empty", "is not a soundscape-ssl checkpoint: it is an empty file"),
    ("truncated", "is not a soundscape-ssl checkpoint (a damaged or foreign torch/zip file: "),
    ("other_torch", "is not a soundscape-ssl checkpoint (format: None, expected 'soundscape_ssl.pretrain.v1')"),
    ("missing", "no such file"),
])
def test_a_file_that_is_not_a_checkpoint_is_named_for_what_it_is(kind: str, expected: str, tmp_path: Path,
                                                                capsys) -> None:
    """issue 17.3: a WAV gave `IndexError: pop from empty list`, a CSV `Unsupported operand 112`,
    a folder a misleading "not found"."""
    path = tmp_path / kind
    if kind == "wav":
        path = path.with_suffix(".wav")
        sf.write(path, np.zeros(1600, dtype="float32"), 16000)
    elif kind == "csv":
        path.write_text("path,label\na.wav,x\n")
    elif kind in ("folder", "run_folder"):
        path.mkdir()
        if kind == "run_folder":
            torch.save({"format": "another"}, path / "checkpoint.pth")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        torch.save({"format": CHECKPOINT_FORMAT, "weights": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:400])
    elif kind == "other_torch":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros(16000 * 2, dtype="float32"), 16000)
    assert cli.main(["embed", "--audio", str(wav), "--checkpoint", str(path), "--out", str(tmp_path / "e.npy")]) == 1
    line = _one_error_line(capsys.readouterr().err, "soundscape-ssl embed")
    assert str(path) in line and expected in line


# -- profiles -------------------------------------------------------------------------------------


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    """A study of one notebook whose parameters are n_threads and seed."""
    repo = tmp_path / "repo"
    (repo / "notebooks").mkdir(parents=True)
    (repo / "configs").mkdir()
    (tmp_path / "archive").mkdir()
    cell = nbformat.v4.new_code_cell("run_dir = ''\narchive_dir = ''\nn_threads = 1\nseed = 0")
    cell.metadata["tags"] = ["parameters"]
    notebook = nbformat.v4.new_notebook(cells=[cell, nbformat.v4.new_code_cell("print(n_threads)")])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, repo / "notebooks" / "01_only.ipynb")
    return repo


@pytest.mark.parametrize("section, expected", [
    # issue 17.2: this key became code in the injected-parameters cell and created the file
    ({"01": {"_ = open('{marker}','w').write('x'); y": 1}}, "unknown key \"_ = open("),
    ({"3": {"n_threads": 2}}, "unknown notebook section '3' in notebooks"),
    ({"01": {"n_thredas": 2}}, "unknown key 'n_thredas' in notebooks.01 (parameters of 01_only): "
                               "did you mean 'n_threads'?"),
    ({"01": {"seed": "__import__('os').system('touch {marker}')"}}, "wrong type for key 'seed' in notebooks.01"),
])
def test_a_profile_never_becomes_code_and_stops_before_any_notebook(repo: Path, marker: Path, section: dict,
                                                                    expected: str, capsys) -> None:
    text = yaml.safe_dump({"shared": {"archive_dir": str(repo.parent / "archive")}, "notebooks": section})
    (repo / "configs" / "hostile.yaml").write_text(text.replace("{marker}", str(marker)))
    assert cli.main(["run", "--profile", "hostile", "--repo-root", str(repo), "--run-id", "r"]) == 2
    line = _one_error_line(capsys.readouterr().err, "soundscape-ssl run")
    assert line.startswith(f"soundscape-ssl run: error: profile {repo / 'configs' / 'hostile.yaml'}: ")
    assert expected in line
    assert not marker.exists()
    assert not (repo / "runs").exists()  # stopped before any notebook: no run folder at all


def test_only_checked_values_reach_papermill(repo: Path, monkeypatch) -> None:
    """What the driver hands papermill is the profile's checked data plus the run's paths."""
    (repo / "configs" / "fine.yaml").write_text(yaml.safe_dump(
        {"shared": {"archive_dir": str(repo.parent / "archive"), "seed": 3}, "notebooks": {"01": {"n_threads": 2}}}))
    handed: list[dict] = []
    monkeypatch.setattr(runner, "execute_notebook", lambda nb, out, parameters, cwd: handed.append(parameters))
    monkeypatch.setattr(runner, "export_html", lambda path: path)
    runner.run_pipeline("fine", run_id="r", repo_root=repo, runs_root=repo / "runs")
    assert handed == [{"seed": 3, "n_threads": 2, "run_dir": str(repo / "runs" / "r"),
                       "archive_dir": str(repo.parent / "archive")}]


def test_profile_yaml_tags_that_build_objects_are_refused(repo: Path, marker: Path) -> None:
    (repo / "configs" / "tagged.yaml").write_text(
        f"notebooks:\n  '01':\n    seed: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        runner.load_profile("tagged", repo)
    assert not marker.exists()


def test_the_payload_is_real(marker: Path) -> None:
    """The hostile fixtures are only meaningful if unpickling them does run the payload."""
    pickle.loads(pickle.dumps(_Payload(marker))).close()
    assert marker.exists()
