"""Serving: score many candidates per user against long histories (Scorer) and the fused GPU search.

The model-code names load on first use, so that `darec.serve.export.load_exported` runs an exported
artifact in a process that never imports darec.models.
"""
from darec.serve.fused_search import search_topk, triton_available
from darec.checkpoint import load_model_checkpoint

__all__ = ["Scorer", "History", "SearchResult", "load_model_checkpoint", "search_topk", "triton_available"]

_LAZY = {"Scorer": "darec.serve.scorer", "History": "darec.serve.history", "SearchResult": "darec.serve.scorer"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'darec.serve' has no attribute {name!r}")
