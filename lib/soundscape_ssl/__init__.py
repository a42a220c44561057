"""soundscape_ssl: self-supervised learning on passively recorded soundscapes.

The thin, tested library that every numbered notebook calls. Its folders read like the study,
each importing only from the ones above it in this list:

* `core`: the shared mechanisms (provenance);
* `recordings`: the archive inventory, the synthetic archive and its ground truth;
* `tiles`: the log-mel front end, the tiling stage, the tile store;
* `pretrain`: the ViT backbone, DINO / MAE / VICReg, the training loop and checkpoints;
* `analysis`: embeddings, clusters, baselines, metrics, attention heads, BirdNET, validation;
* `report`: figures and tables;
* `pipeline`: the `soundscape-ssl` command and the papermill driver of the notebooks.
"""

__version__ = "0.1.0"
