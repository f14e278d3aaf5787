"""Training and inference samples: named co-centred views, the hierarchical sampler, the
one reader pool, tf.data pipelines (``dataset``, the only module here that imports
TensorFlow), augmentation, stain augmentation and the embedded synthetic cohort."""
