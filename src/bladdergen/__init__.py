"""bladdergen: synthetic 3D bladder CT (3D VQ-GAN + latent DDPM) and few-label segmentation (DeepAtlas).

Pipeline, in the order the sub-packages are used::

    data (phantom, preprocess) -> vqgan -> diffusion (train-ldm, sample) -> deepatlas -> evaluate

One tensor layout everywhere: ``(B, C, X, Y, Z)`` with Z the axial slice axis, last.
"""

__version__ = "0.1.0"
