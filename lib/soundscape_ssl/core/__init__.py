"""The shared mechanisms every stage uses, in the lowest layer (imports nothing above it):
provenance of products."""
