"""gmpatl-ray: GMP-ATL speech emotion recognition (HuBERT + multi-scale pseudo-labels) on Ray."""

__version__ = "0.1.0"
