"""darec: long-sequence CTR prediction with DARE and its baselines."""
__version__ = "0.1.0"
__all__ = ["__version__", "Scorer"]


def __getattr__(name: str):  # lazy, so `import darec` stays light: darec.Scorer imports torch on first use
    if name == "Scorer":
        from darec.serve.scorer import Scorer
        return Scorer
    raise AttributeError(f"module 'darec' has no attribute {name!r}")
