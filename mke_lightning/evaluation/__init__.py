"""Scoring an edit: the items per measure and language and their scoring
(:mod:`.evaluator`), the metric protocols, the neighbourhood of an edit, perplexity
of a multilingual sample, and the aggregation across edits and ranks."""
