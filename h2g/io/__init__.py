"""Reading and writing files: slides (OpenSlide at a magnification), annotations (masks and
label maps) with their class tables, manifests, pyramidal TIFFs, GeoJSON and overlays.
TensorFlow-free."""
