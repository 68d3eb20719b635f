"""Evaluation of language models: perplexity (more metrics can live beside it)."""

from .perplexity import PerplexityResult, gemma_logits_fn, perplexity

__all__ = ["PerplexityResult", "gemma_logits_fn", "perplexity"]
