"""Analysis of a trained backbone: embeddings, the output spaces a run scores, clusters, baselines,
metrics, attention heads, BirdNET, validation on labelled recordings."""
