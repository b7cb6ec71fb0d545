# Set to True on GPUs with little memory: sliced attention, and the VAE and text encoder leave the GPU
# while the UNet samples (ControlLDM.low_vram_shift).
save_memory = False
