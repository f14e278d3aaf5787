"""Reading and writing files: slides (OpenSlide at a magnification), annotations (masks,
label maps and polygon files: QuPath GeoJSON, ASAP XML, Aperio ImageScope XML, behind one
source interface) with their class tables, manifests, pyramidal TIFFs, GeoJSON and
overlays.  TensorFlow-free."""
