"""Export and deployment: Keras -> ONNX / OpenVINO with parity (``conversion``, imports
TensorFlow), model metadata, TF-free segmentation of a slide (``deploy``), the runtime
benchmark (``benchmark``) and the FAST peer (``fast``)."""
