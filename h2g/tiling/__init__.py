"""Where on a slide to look: tissue detection, labelled patch grids and sliding-window
grids.  TensorFlow-free."""
