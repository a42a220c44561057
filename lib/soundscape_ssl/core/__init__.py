"""The shared mechanisms every stage uses, in the lowest layer (imports nothing above it):
provenance of products, statistics (stats: group bootstrap, intervals, paired differences, NMI/ARI)."""
