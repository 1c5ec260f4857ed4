"""Sampling exported models: loading a model with its (checked) tokenizer, batched and seeded
generation, and the image outputs (uint8 arrays, PNG grids, the ADM evaluator's ``.npz``)."""
