"""Recordings: the archive inventory, the synthetic archive and its ground truth, collection statistics."""
