"""Hyperparameter sweeps with Ray Tune over dotted config paths (``tune_spaces/*.yaml``)."""
