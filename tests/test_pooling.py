"""The names of the poolings and of the stored spaces built from them."""

from __future__ import annotations

import pytest

from soundscape_ssl.pretrain.pooling import BAND_POOLINGS, POOLINGS, parse_poolings, split_space_name


def test_parse_poolings_keeps_the_canonical_order_and_refuses_unknown_names() -> None:
    assert parse_poolings("band_active,mean") == ("mean", "band_active")
    assert parse_poolings("all") == POOLINGS
    assert set(BAND_POOLINGS) <= set(POOLINGS)
    with pytest.raises(ValueError, match="pooling must be one of"):
        parse_poolings("band_max")


@pytest.mark.parametrize("space, expected", [
    ("vicreg_band_active", ("vicreg", "band_active")),   # not ("vicreg_band", "active")
    ("vicreg_band", ("vicreg", "band")),
    ("untrained_dino_cls", ("untrained_dino", "cls")),
    ("my_run_mean", ("my_run", "mean")),
])
def test_split_space_name_matches_the_longest_pooling(space: str, expected: tuple[str, str]) -> None:
    assert split_space_name(space) == expected


@pytest.mark.parametrize("space", ["logmel_stats", "band", "_band", "vicreg"])
def test_split_space_name_refuses_a_name_without_a_checkpoint_and_pooling(space: str) -> None:
    with pytest.raises(ValueError, match="is not <checkpoint>_<pooling>"):
        split_space_name(space)
