"""The model and where it runs: loading any causal LM, where each family keeps its MLP
output projections, the batched forward (teacher forcing, greedy decoding, prefix
caching), the editing strategies and the collectives between ranks."""
