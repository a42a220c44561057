"""Figures and tables a reader looks at: spectrogram panels, cluster maps and galleries, training curves."""
