"""Figures and tables a reader looks at: spectrogram panels, attention maps, cluster maps and galleries,
training curves, the labelled validation's figures."""
