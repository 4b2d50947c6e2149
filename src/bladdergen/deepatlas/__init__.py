"""Stage 3: DeepAtlas, joint registration and segmentation with few labels; ``segment``."""
