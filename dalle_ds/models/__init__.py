"""The models: configs and presets, the paper's attention masks, sparse attention, the dVAE and the
DALL-E transformer. Pure torch (no DeepSpeed, no torch.distributed): a test enforces it."""
