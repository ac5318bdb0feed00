"""darec: long-sequence CTR prediction with DARE and its baselines."""
__version__ = "0.1.0"
__all__ = ["__version__"]
