"""Evaluation: per-slide metrics (binary tumour and per class), the papers' tables and
statistics, figures, and the embedded cohort measured against real patches (nuclei,
cohort_windows, cohort_stats).  TensorFlow-free."""
