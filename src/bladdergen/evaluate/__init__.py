"""Evaluation: segmentation scores, generated-volume quality, and the reader-study kit."""
