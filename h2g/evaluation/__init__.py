"""Evaluation: per-slide metrics (binary tumour and per class), the papers' tables and
statistics, and figures.  TensorFlow-free."""
