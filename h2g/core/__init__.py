"""Shared plumbing: errors, configuration (presets, overrides), cached stages, atomic writes,
machine resources and the CLI wrapper.  TensorFlow-free."""
