"""sdtorch: Stable Diffusion from scratch in PyTorch."""
