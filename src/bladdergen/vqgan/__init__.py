"""Stage 1: the 3D VQ-GAN that compresses CT volumes into a codebook latent."""
