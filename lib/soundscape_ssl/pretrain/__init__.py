"""Self-supervised pretraining: the ViT backbone, DINO / MAE / VICReg, the training loop, checkpoints, launch."""
