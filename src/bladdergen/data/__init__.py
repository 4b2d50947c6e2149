"""Data in: the phantom generator, volume I/O, preprocessing, and the preprocessed-set reader."""
