"""Serving: score many candidates per user against long histories (Scorer) and the fused GPU search."""
from darec.serve.fused_search import search_topk, triton_available
from darec.serve.scorer import History, Scorer, SearchResult, load_checkpoint

__all__ = ["Scorer", "History", "SearchResult", "load_checkpoint", "search_topk", "triton_available"]
