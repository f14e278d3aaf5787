"""Whole-slide inference: backends (Keras, ONNX Runtime, OpenVINO), patch-wise heatmaps,
H2G-Net's low-resolution refinement inputs, sliding-window segmentation and rasters.
TensorFlow-free except the Keras backend, which imports it inside itself."""
