"""The names of the tile-level poolings of a backbone's final tokens: the one definition.

* "mean": the mean over all patch tokens;
* "cls": the class token;
* "band": the mean over time of each frequency row of patch tokens, rows side by side from low
  to high frequency (keeps *where in frequency* the content lies).

`models.PooledEmbeddings` has one field per name, in this order (the order in which the
embedding stage concatenates them); VICReg's loss reads one of them (`vicreg.pooling`), the
embedding stage writes any of them (`embed --pooling`), validation scores them. Free of torch,
so modules that avoid importing it (validation's configuration) can name poolings too.
"""

from __future__ import annotations

POOLINGS = ("mean", "cls", "band")
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
