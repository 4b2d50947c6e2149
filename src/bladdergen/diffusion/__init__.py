"""Stage 2: latent diffusion (denoiser, noise schedule, samplers) and the sampling pipeline."""
