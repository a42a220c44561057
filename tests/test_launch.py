"""Launching pretraining from notebooks: commands, validated configs, streamed checked subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from soundscape_ssl.core.config import ConfigError
from soundscape_ssl.pretrain import launch
from soundscape_ssl.report import training_report


def test_single_node_is_standalone_and_multi_node_needs_an_endpoint() -> None:
    command = launch.torchrun_command("soundscape_ssl.pretrain.train", ["--config", "c.json"], nproc_per_node=8)
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in command and "--nproc_per_node=8" in command
    assert command[-4:] == ["-m", "soundscape_ssl.pretrain.train", "--config", "c.json"]
    multi = launch.torchrun_command("soundscape_ssl.pretrain.train", [], nproc_per_node=4, nnodes=2,
                                    rdzv_endpoint="node01:29500")
    assert "--standalone" not in multi
    assert {"--nnodes=2", "--rdzv_backend=c10d", "--rdzv_endpoint=node01:29500"} <= set(multi)
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        launch.torchrun_command("m", [], nnodes=2)


def test_train_config_is_validated_before_launch(tmp_path) -> None:
    path = launch.write_train_config(tmp_path / "dino", {
        "method": "dino", "store_dir": "/tiles", "out_dir": str(tmp_path / "dino"),
        "model": {"arch": "vit_tiny", "depth": 2}, "dino": {"out_dim": 512}})
    written = json.loads(path.read_text())
    assert written["model"]["depth"] == 2 and written["dino"]["out_dim"] == 512
    assert written["mae"]["mask_ratio"] == 0.75  # defaults filled in: the file is the whole config
    with pytest.raises(ValueError, match="method"):
        launch.write_train_config(tmp_path / "x", {"method": "simclr", "store_dir": "/t", "out_dir": "/o"})


def test_run_streaming_echoes_lines_and_raises_with_the_meaning() -> None:
    lines: list[str] = []
    launch.run_streaming([sys.executable, "-c", "print('one'); print('two')"], echo=lines.append)
    assert lines == ["one", "two"]
    with pytest.raises(subprocess.CalledProcessError) as caught:
        launch.run_streaming([sys.executable, "-c", "import sys; print('boom'); sys.exit(4)"],
                             echo=lines.append, exit_meanings=launch.TRAIN_EXIT_MEANINGS)
    assert caught.value.returncode == 4
    assert "collapse" in caught.value.stderr and "boom" in caught.value.output


def test_training_log_keeps_the_latest_record_per_step_and_skips_cut_lines(tmp_path) -> None:
    records = [{"event": "start", "git_sha": "abc"},
               {"event": "train", "step": 10, "loss": 3.0, "lr": 1e-4, "tiles_per_s": 5.0},
               {"event": "train", "step": 20, "loss": 2.0, "lr": 2e-4, "tiles_per_s": 6.0},
               {"event": "start", "git_sha": "abc", "resumed_from_step": 10},
               {"event": "train", "step": 20, "loss": 1.5, "lr": 2e-4, "tiles_per_s": 7.0}]
    text = "\n".join(json.dumps(r) for r in records) + '\n{"event": "train", "st'
    (tmp_path / "log.jsonl").write_text(text)
    table, events = training_report.read_training_log(tmp_path)
    assert table["step"].tolist() == [10, 20] and table["loss"].tolist() == [3.0, 1.5]
    assert [e.get("resumed_from_step") for e in events] == [None, 10]
    summary = training_report.training_summary({"dino": table})
    assert bool(summary.loc[0, "loss_fell"]) and summary.loc[0, "steps"] == 20
    figure = training_report.plot_training_curves({"dino": table})
    assert len(figure.axes) == 2   # loss and lr; throughput has its own figure (machine-dependent)
    throughput = training_report.plot_throughput({"dino": table})
    assert throughput.axes[0].get_lines()[0].get_ydata().tolist() == [5.0, 7.0]


SHARED_SETTINGS = {"store_dir": "/tiles", "epochs": 3, "model": {"arch": "vit_tiny", "depth": 2},
                   "dino": {"out_dim": 512}}


def test_write_train_configs_lays_each_methods_overrides_over_the_shared_settings(tmp_path) -> None:
    paths = launch.write_train_configs(tmp_path, ["dino", "vicreg"], SHARED_SETTINGS, {
        "vicreg": {"epochs": 5, "model": {"depth": 1}, "vicreg": {"pooling": "band"}},
        "mae": {"epochs": 9}})
    dino, vicreg = (json.loads(paths[m].read_text()) for m in ("dino", "vicreg"))
    assert paths["dino"] == tmp_path / "dino" / "train_config.json"
    assert (dino["method"], dino["out_dir"], dino["epochs"], dino["dino"]["out_dim"]) == \
        ("dino", str(tmp_path / "dino"), 3, 512)
    assert vicreg["epochs"] == 5 and vicreg["vicreg"]["pooling"] == "band"
    assert vicreg["model"]["arch"] == "vit_tiny" and vicreg["model"]["depth"] == 1  # merged, not replaced
    assert dino["model"]["depth"] == 2
    assert not (tmp_path / "mae").exists()  # overrides of a method not run are checked, not written


@pytest.mark.parametrize("methods, overrides, message", [
    (["dinoo"], {}, "unknown key 'dinoo' in methods: did you mean 'dino'?"),
    (["dino"], {"byol": {}}, "unknown key 'byol' in method_overrides; valid keys: dino, mae, vicreg"),
    (["dino", "vicreg"], {"vicreg": {"vicreg": {"crop_frame": 96}}},
     "unknown key 'crop_frame' in method_overrides.vicreg.vicreg: did you mean 'crop_frames'?"),
    (["dino"], {"dino": {"epochs": "many"}}, "wrong type for key 'epochs' in method_overrides.dino"),
])
def test_write_train_configs_refuses_bad_settings_before_writing_any(tmp_path, methods, overrides, message) -> None:
    with pytest.raises(ConfigError, match=message.replace("?", "\\?")):
        launch.write_train_configs(tmp_path, methods, SHARED_SETTINGS, overrides)
    assert not any(tmp_path.iterdir())


def test_write_train_configs_validates_every_config_before_writing_any(tmp_path) -> None:
    # dino is fine; vicreg's crop is longer than the tile: nothing may be written.
    with pytest.raises(ValueError, match="crop_frames"):
        launch.write_train_configs(tmp_path, ["dino", "vicreg"], SHARED_SETTINGS,
                                   {"vicreg": {"vicreg": {"crop_frames": 999}}})
    assert not any(tmp_path.iterdir())


def test_training_environment_fixes_threads_on_cpu_only(monkeypatch) -> None:
    import torch

    cpu = launch.cpu_training_environment(3)
    assert cpu["OMP_NUM_THREADS"] == "3" and cpu["OMP_WAIT_POLICY"] == "PASSIVE"
    assert launch.training_environment("cpu", 3) == cpu
    assert launch.training_environment("cuda", 3) == {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert launch.training_environment("auto", 3) == cpu
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert launch.training_environment("auto", 3) == {}


def test_a_profiles_recipe_gives_the_same_train_config_to_notebook_and_script(tmp_path):
    """benchmarks/species.py reads notebook 03's parameters from a profile and builds each method's
    config with the function the notebook calls: the real_pool recipe's VICReg, checked."""
    from soundscape_ssl.pipeline.runner import profile_parameters

    params = profile_parameters("real_pool", "03")
    assert params["arch"] == "vit_tiny" and params["epochs"] == 1 and params["seed"] == 0   # profile, default
    settings = launch.train_settings_from_parameters(tmp_path / "tiles", **params)
    config = launch.method_train_config("vicreg", settings, params["method_overrides"], tmp_path / "vicreg",
                                        extra={"schedule_steps": 7, "max_steps": 7})
    overrides = params["method_overrides"]["vicreg"]
    assert config.vicreg.pooling == overrides["vicreg"]["pooling"]
    assert config.epochs == overrides["epochs"] and config.schedule_steps == config.max_steps == 7
    assert config.model.arch == "vit_tiny" and config.store_dir == str(tmp_path / "tiles")


@pytest.mark.parametrize("profile", ["real_pool", "poster"])
def test_a_profiles_dino_is_the_recipe_measured_in_species(profile, tmp_path):
    """real_pool's and poster's DINO train on PCEN input with the head on the bands and Sinkhorn-Knopp
    targets (the study's own DINO, on the class token without background removal, learned a space
    below its untrained copy: notebook 07, r39). The config builds, the method embeds with the band
    pooling it trained, and one step on random tiles gives a finite loss."""
    import torch

    from soundscape_ssl.pipeline.runner import profile_parameters
    from soundscape_ssl.pretrain.augment import Normalization
    from soundscape_ssl.pretrain.train import build_method

    params = profile_parameters(profile, "03")
    settings = launch.train_settings_from_parameters(tmp_path / "tiles", **params)
    config = launch.method_train_config("dino", settings, params["method_overrides"], tmp_path / "dino")
    assert config.background_removal == "pcen" and config.augment.gain_db == 0.0
    assert (config.dino.pooling, config.dino.centering) == ("band", "sinkhorn_knopp") and config.dino.koleo_weight > 0
    config.model.arch, config.model.depth, config.dino.out_dim = "vit_tiny", 1, 64   # a step in seconds
    torch.manual_seed(0)
    method = build_method(config, Normalization(background="pcen"), total_steps=10, steps_per_epoch=5)
    assert method.embedding_pooling == "band"
    tiles = torch.randn(4, 1, config.model.n_mels, config.model.n_frames)
    assert torch.isfinite(method(tiles, step=0).loss)


def test_rectangular_patches_reach_a_profiles_recipe_as_species_sets_them(tmp_path):
    """`benchmarks/species.py --set vicreg.model.patch_size=8 --set vicreg.model.patch_frames=32`
    becomes this override, merged over the profile's: 8 x 32 patches on the real_pool VICReg recipe
    (its 128-frame crops are 4 patch columns), the rest of the recipe kept."""
    from soundscape_ssl.core.config import merge_mappings
    from soundscape_ssl.pipeline.runner import profile_parameters

    params = profile_parameters("real_pool", "03")
    settings = launch.train_settings_from_parameters(tmp_path / "tiles", **params)
    overrides = merge_mappings(params["method_overrides"],
                               {"vicreg": {"model": {"patch_size": 8, "patch_frames": 32}}})
    config = launch.method_train_config("vicreg", settings, overrides, tmp_path / "vicreg")
    assert config.model.patch_hw == (8, 32) and config.model.arch == "vit_tiny"
    assert config.vicreg.pooling == params["method_overrides"]["vicreg"]["vicreg"]["pooling"]
    assert launch.method_train_config("vicreg", settings, params["method_overrides"],
                                      tmp_path / "square").model.patch_hw == (16, 16)
    wrong = merge_mappings(params["method_overrides"], {"vicreg": {"model": {"patch_frames": 48}}})
    with pytest.raises(ValueError, match="16x48"):  # 256 frames are not whole 48-frame patches
        launch.method_train_config("vicreg", settings, wrong, tmp_path / "wrong")
