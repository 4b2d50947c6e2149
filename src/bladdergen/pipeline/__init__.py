"""The whole pipeline as one command (``bladdergen demo``) and multi-process helpers."""
