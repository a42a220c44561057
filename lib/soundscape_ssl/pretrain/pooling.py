"""The names of the tile-level poolings of a backbone's final tokens: the one definition.

* "mean": the mean over all patch tokens;
* "cls": the class token;
* "band": the mean over time of each frequency row of patch tokens, rows side by side from low
  to high frequency (keeps *where in frequency* the content lies);
* "band_active": "band" over the tile's active time columns only: the columns of patches whose
  mean model input (after normalisation and background removal, so PCEN's foreground when that
  is the removal) is at or above the tile's median column. A call often fills a few columns of
  a 3 s tile; a mean over all of them mixes it with the background between calls.

`models.PooledEmbeddings` has one field per name, in this order (the order in which the
embedding stage concatenates them); VICReg's loss reads one of them (`vicreg.pooling`), the
embedding stage writes any of them (`embed --pooling`), validation scores them. Free of torch,
so modules that avoid importing it (validation's configuration) can name poolings too.
"""

from __future__ import annotations

POOLINGS = ("mean", "cls", "band", "band_active")
BAND_POOLINGS = ("band", "band_active")   # frequency rows side by side: rows x embed_dim wide
POOLING_ALIASES = {"both": ("mean", "cls"), "all": POOLINGS}


def parse_poolings(pooling: str) -> tuple[str, ...]:
    """"mean", "both", "all" or a comma list ("mean,band") -> the poolings, in POOLINGS order."""
    names: set[str] = set()
    for part in str(pooling).split(","):
        part = part.strip()
        if part in POOLING_ALIASES:
            names.update(POOLING_ALIASES[part])
        elif part in POOLINGS:
            names.add(part)
        else:
            raise ValueError(f"pooling must be one of {POOLINGS}, an alias in "
                             f"{sorted(POOLING_ALIASES)} or a comma list of them, got {pooling!r}")
    return tuple(name for name in POOLINGS if name in names)


def split_space_name(space: str) -> tuple[str, str]:
    """A stored space's name "<checkpoint>_<pooling>" -> (checkpoint, pooling), matching the
    longest pooling name ("vicreg_band_active" -> ("vicreg", "band_active"), not "band_active"
    cut at its last underscore); ValueError for a name that ends in no pooling."""
    for pooling in sorted(POOLINGS, key=len, reverse=True):
        checkpoint = space.removesuffix(f"_{pooling}")
        if checkpoint and checkpoint != space:
            return checkpoint, pooling
    raise ValueError(f"space {space!r} is not <checkpoint>_<pooling> with a pooling of {POOLINGS}")
