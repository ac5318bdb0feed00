"""Serving: score many candidates per user against long histories (Scorer) and the fused GPU search."""
from darec.serve.fused_search import search_topk, triton_available
from darec.checkpoint import load_model_checkpoint
from darec.serve.scorer import History, Scorer, SearchResult

__all__ = ["Scorer", "History", "SearchResult", "load_model_checkpoint", "search_topk", "triton_available"]
