"""The one config path (core/config.py): mappings and flags -> stage dataclasses, strictly."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from soundscape_ssl.analysis.attention import AttentionConfig
from soundscape_ssl.analysis.birdnet import BirdNetConfig
from soundscape_ssl.analysis.cluster import ClusterConfig
from soundscape_ssl.analysis.compare import CompareConfig
from soundscape_ssl.analysis.embed import EmbedConfig
from soundscape_ssl.analysis.metrics import KnnConfig
from soundscape_ssl.analysis.validate import ValidateConfig
from soundscape_ssl.core.config import (ConfigError, add_config_options, config_from_mapping,
                                        config_from_options, config_to_options, merge_mappings,
                                        read_mapping_file)
from soundscape_ssl.core.provenance import to_jsonable
from soundscape_ssl.pretrain.augment import AugmentConfig
from soundscape_ssl.pretrain.mae import MaeConfig
from soundscape_ssl.pretrain.models import BackboneConfig
from soundscape_ssl.pretrain.train import TrainConfig
from soundscape_ssl.recordings.archive import InventoryConfig
from soundscape_ssl.recordings.groundtruth import GroundTruthConfig
from soundscape_ssl.recordings.synth import SynthConfig
from soundscape_ssl.tiles.spectrogram import SpectrogramConfig
from soundscape_ssl.tiles.tiling import TilingConfig

# Every stage dataclass with fields changed from their defaults (booleans, None, tuples, nested
# sections, negative numbers, paths with spaces): what a round trip must reproduce exactly.
STAGE_CONFIGS = {
    "spectrogram": SpectrogramConfig(tile_s=2.0, tile_hop_s=1.0, mel_scale="htk", mel_norm=None,
                                     f_max_hz=12000.0),
    "tiling": TilingConfig(unit_max_tiles=7, decode_block_s=30.5),
    "inventory": InventoryConfig(root="/data/my archive", extensions=(".wav",), num_threads=2),
    "synth": SynthConfig(days=1, recording_start_hours=(5.0, 12.0), rainy_days=(), file_s=15.0,
                         start_date="2024-06-01"),
    "embed": EmbedConfig(pooling="mean,band", compile=True, num_workers=0, output_dtype="float16"),
    "validate": ValidateConfig(group_by="recordist+date", metadata_csv="meta.csv", poolings=("mean",),
                               include_birdnet=False, energy_f_low_hz=500.0),
    "birdnet": BirdNetConfig(latitude=48.5, longitude=-11.25, week_48=-1, location_filter=True),
    "cluster": ClusterConfig(fit_subsample=None, umap_min_dist=0.25, standardize=False),
    "compare": CompareConfig(knn_tasks=("species",), knn_max_rows=None, cluster=ClusterConfig(n_clusters=7),
                             knn=KnnConfig(k=3, metric="euclidean")),
    "attention": AttentionConfig(ground_truth=GroundTruthConfig(foreground_kinds=("bird", "insect"),
                                                                min_snr_db=-6.5),
                                 counting_only=False),
    "train": TrainConfig(method="mae", model=BackboneConfig(arch="vit_tiny", depth=2), adam_betas=(0.9, 0.95),
                         clip_grad_norm=None, max_steps=5, compile=True, mae=MaeConfig(masking="time"),
                         augment=AugmentConfig(mix_attenuation_db=(0.0, 12.0)), dataset_factory="m:f"),
}


def _message(cls: type, values: object, section: str | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping(cls, values, section)
    assert "\n" not in str(caught.value)  # one line
    return str(caught.value)


# -- mappings ------------------------------------------------------------------------------------


def test_unknown_key_names_key_section_valid_keys_and_close_match() -> None:
    message = _message(SpectrogramConfig, {"n_melz": 64})
    assert message.startswith("unknown key 'n_melz' in SpectrogramConfig: did you mean 'n_mels'? valid keys: ")
    assert "sample_rate_hz, tile_s, tile_hop_s" in message
    assert "did you mean" not in _message(TilingConfig, {"zzz": 1})  # no close match, no guess


def test_nested_sections_are_named_by_their_path() -> None:
    message = _message(TrainConfig, {"dino": {"teacher_momentun": 0.99}}, "notebooks.03.method_overrides.dino")
    assert message.startswith("unknown key 'teacher_momentun' in notebooks.03.method_overrides.dino.dino: "
                              "did you mean 'teacher_momentum'?")
    assert "valid keys: out_dim, head_hidden_dim" in message
    message = _message(TrainConfig, {"augment": {"mix_attenuation_db": [0.0, "loud"]}})
    assert message == ("wrong type for key 'mix_attenuation_db[1]' in TrainConfig.augment: "
                       "expected float, got 'loud'")
    assert _message(TrainConfig, {"dino": 3}) == ("wrong type for key 'dino' in TrainConfig: expected a "
                                                  "mapping of DinoConfig fields, got 3")
    assert _message(CompareConfig, {"knn": {"k": 2.5}}) == ("wrong type for key 'k' in CompareConfig.knn: "
                                                            "expected int, got 2.5")


@pytest.mark.parametrize("values, message", [
    ({"epochs": 2.5}, "wrong type for key 'epochs' in TrainConfig: expected int, got 2.5"),
    ({"epochs": "3"}, "wrong type for key 'epochs' in TrainConfig: expected int, got '3'"),
    ({"epochs": True}, "wrong type for key 'epochs' in TrainConfig: expected int, got True"),
    ({"compile": 1}, "wrong type for key 'compile' in TrainConfig: expected true or false, got 1"),
    ({"compile": "yes"}, "wrong type for key 'compile' in TrainConfig: expected true or false, got 'yes'"),
    ({"method": 1}, "wrong type for key 'method' in TrainConfig: expected str, got 1"),
    ({"max_steps": "none"}, "wrong type for key 'max_steps' in TrainConfig: expected int or null, got 'none'"),
    ({"adam_betas": [0.9]}, "wrong type for key 'adam_betas' in TrainConfig: expected a list of 2 values "
                            "(float, float), got [0.9]"),
    ({"base_lr": "1e-4"}, "wrong type for key 'base_lr' in TrainConfig: expected float, got '1e-4' (YAML reads "
                          "a number such as 1e-4 without a dot as text: write 1.0e-4)"),
])
def test_a_wrong_type_names_key_section_expectation_and_value(values: dict, message: str) -> None:
    assert _message(TrainConfig, values) == message


def test_only_lossless_conversions() -> None:
    config = config_from_mapping(TrainConfig, {"base_lr": 1, "adam_betas": [0.9, 0.95], "max_steps": None})
    assert config.base_lr == 1.0 and isinstance(config.base_lr, float)  # an int is a float
    assert config.adam_betas == (0.9, 0.95)                               # a list is a tuple
    assert config.max_steps is None and config.model == BackboneConfig()  # unset fields keep defaults
    assert config_from_mapping(TrainConfig, config) is config             # already converted


def test_the_dataclass_checks_still_run_and_are_named() -> None:
    message = _message(SpectrogramConfig, {"tile_s": 3.3333}, "tiles/config.json")
    assert message.startswith("tiles/config.json: tile_s=3.3333 s must be a positive whole number of samples")
    assert _message(InventoryConfig, {"num_threads": 2}) == "missing key 'root' in InventoryConfig"


def test_several_problems_are_reported_together() -> None:
    message = _message(TrainConfig, {"epochs": 2.5, "n_thredas": 2})
    assert "wrong type for key 'epochs'" in message and "unknown key 'n_thredas'" in message
    assert "did you mean 'cpu_threads'?" in message


def test_values_that_are_not_data_are_refused() -> None:
    assert "which is not data" in _message(TilingConfig, {"unit_max_tiles": object()})
    assert _message(TilingConfig, [1, 2]) == "TilingConfig must be a mapping of TilingConfig fields, got [1, 2]"


def test_stored_configs_no_longer_drop_unknown_keys() -> None:
    """InventoryConfig and BirdNetConfig used to drop unknown keys silently."""
    with pytest.raises(ConfigError, match="unknown key 'num_thread' in InventoryConfig"):
        InventoryConfig.from_dict({"root": "/a", "num_thread": 3})
    with pytest.raises(ConfigError, match="unknown key 'top_kk' in BirdNetConfig: did you mean 'top_k'"):
        BirdNetConfig.from_dict({"top_kk": 3})


@pytest.mark.parametrize("name", sorted(STAGE_CONFIGS))
def test_json_round_trip_of_every_stage_config(name: str) -> None:
    config = STAGE_CONFIGS[name]
    stored = json.loads(json.dumps(to_jsonable(config)))
    assert config_from_mapping(type(config), stored) == config


def test_merge_mappings_merges_sections_recursively() -> None:
    base = {"epochs": 1, "dino": {"out_dim": 8, "local_crops": 2}, "model": {"arch": "vit_tiny"}}
    merged = merge_mappings(base, {"dino": {"out_dim": 16}, "model": None, "seed": 3})
    assert merged == {"epochs": 1, "dino": {"out_dim": 16, "local_crops": 2}, "model": None, "seed": 3}
    assert base["dino"] == {"out_dim": 8, "local_crops": 2}  # inputs untouched


def test_read_mapping_file(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text('{"epochs": 2}')
    (tmp_path / "a.yaml").write_text("epochs: 2\ndino:\n  out_dim: 8\n")
    assert read_mapping_file(tmp_path / "a.json") == {"epochs": 2}
    assert read_mapping_file(tmp_path / "a.yaml") == {"epochs": 2, "dino": {"out_dim": 8}}
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping, got \\[1\\]"):
        read_mapping_file(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        read_mapping_file(tmp_path / "bad.yaml")
    (tmp_path / "code.yaml").write_text("a: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):  # safe loader: tags that run code are refused
        read_mapping_file(tmp_path / "code.yaml")


# -- command-line flags --------------------------------------------------------------------------


def _parser(cls: type) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="test", exit_on_error=False)
    add_config_options(parser, cls)
    return parser


@pytest.mark.parametrize("name", sorted(STAGE_CONFIGS))
def test_cli_round_trip_of_every_stage_config(name: str) -> None:
    config = STAGE_CONFIGS[name]
    flags = config_to_options(config)
    assert config_from_options(type(config), _parser(type(config)).parse_args(flags)) == config
    # Every leaf field appears once, as --field-name (nested: --section.field-name).
    names = {flag.split("=")[0] for flag in flags if flag.startswith("--")}
    assert len(names) == len([f for f in flags if f.startswith("--")])
    if name == "train":
        assert {"--dino.out-dim", "--model.arch", "--adam-betas", "--max-steps"} <= names


def test_flags_not_given_keep_the_base_then_the_defaults() -> None:
    parser = _parser(TrainConfig)
    config = config_from_options(TrainConfig, parser.parse_args(["--dino.out-dim", "512"]),
                                 base={"epochs": 7, "dino": {"local_crops": 3}})
    assert (config.epochs, config.dino.out_dim, config.dino.local_crops) == (7, 512, 3)
    assert config.dino.global_crops == TrainConfig().dino.global_crops


@pytest.mark.parametrize("flags, message", [
    (["--compile", "yes"], "argument --compile: expected true or false, got 'yes'"),
    (["--epochs", "2.5"], "argument --epochs: expected int, got '2.5'"),
    (["--max-steps", "many"], "argument --max-steps: expected int or none, got 'many'"),
    (["--adam-betas", "0.9"], "argument --adam-betas: expected 2 arguments"),
])
def test_bad_flags_name_the_flag_and_the_expectation(flags: list[str], message: str) -> None:
    with pytest.raises(argparse.ArgumentError, match=message.replace("(", "\\(").replace(")", "\\)")):
        _parser(TrainConfig).parse_args(flags)


def test_flag_values_read_explicitly() -> None:
    parser = _parser(TrainConfig)
    config = config_from_options(TrainConfig, parser.parse_args(
        ["--compile", "FALSE", "--max-steps", "None", "--clip-grad-norm", "none", "--base-lr", "1e-4"]))
    assert config.compile is False and config.max_steps is None and config.clip_grad_norm is None
    assert config.base_lr == 1e-4
    # A str field keeps "none" as text: only None-able fields read it as None.
    assert config_from_options(TrainConfig, parser.parse_args(["--background-removal", "none"])
                               ).background_removal == "none"
    empty = config_from_options(SynthConfig, _parser(SynthConfig).parse_args(["--rainy-days"]))
    assert empty.rainy_days == ()


def test_flags_become_the_same_config_errors() -> None:
    parser = _parser(SpectrogramConfig)
    with pytest.raises(ConfigError, match="SpectrogramConfig options: tile_s=3.3333 s must be a positive"):
        config_from_options(SpectrogramConfig, parser.parse_args(["--tile-s", "3.3333"]))


def test_excluded_fields_get_no_flag() -> None:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_config_options(parser, InventoryConfig, exclude=("root", "sites_csv"))
    assert "--root" not in parser.format_help() and "--num-threads" in parser.format_help()


def test_field_defaults_show_in_help() -> None:
    help_text = _parser(TrainConfig).format_help()
    assert "--dino.out-dim" in help_text and "(default: 65536)" in help_text
    assert "--compile [{true,false}]" in help_text


def test_stage_configs_cover_every_config_dataclass_with_flags() -> None:
    """The table above holds one of each stage dataclass a command or a stored config reads."""
    assert {type(c) for c in STAGE_CONFIGS.values()} >= {SpectrogramConfig, TilingConfig, EmbedConfig,
                                                          ValidateConfig, SynthConfig, TrainConfig}
    assert all(dataclasses.is_dataclass(c) for c in STAGE_CONFIGS.values())


def test_a_bare_boolean_flag_means_true():
    parser = _parser(ValidateConfig)
    assert config_from_options(ValidateConfig, parser.parse_args(["--allow-outside-paths"])).allow_outside_paths
    assert not config_from_options(ValidateConfig, parser.parse_args(["--allow-outside-paths", "false"])
                                   ).allow_outside_paths
    assert not config_from_options(ValidateConfig, parser.parse_args([])).allow_outside_paths
