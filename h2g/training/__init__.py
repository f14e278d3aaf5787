"""Training: the Keras fit loop with exact resume (``fit``), losses (CWCE, Dice) and the
in-graph k-means cluster model (``clustering``).  Imports TensorFlow."""
