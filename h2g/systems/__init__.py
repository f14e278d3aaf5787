"""The systems h2g reproduces, each a subpackage that registers its designs and chains the
shared stages (see :mod:`h2g.systems.registry`):

- :mod:`h2g.systems.h2g`: H2G-Net (Pedersen et al. 2022), its nine-design ablation.
"""
