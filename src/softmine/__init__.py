"""softmine: deep metric learning with Online Soft Mining and Class-Aware Attention.

Reproduces Wang et al., "Deep Metric Learning by Online Soft Mining and
Class-Aware Attention", AAAI 2019, and the baselines it is compared with.
"""

__version__ = "0.1.0"
