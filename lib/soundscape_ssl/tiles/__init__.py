"""Tiles: the log-mel front end, the tiling stage and the tile store it writes."""
