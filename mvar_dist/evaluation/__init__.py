"""Evaluating generated images as the VAR-family papers do: the Inception network (ours; the
weights are the user's), the ADM evaluator's statistics (FID, sFID, Inception Score,
precision/recall), the reference batch, and ``mvar-dist evaluate``'s pipeline."""
