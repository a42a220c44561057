"""Analysis of a trained backbone: embeddings, clusters, baselines, metrics, attention heads, BirdNET,
validation on labelled recordings."""
