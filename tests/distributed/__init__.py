"""Several local processes (gloo) against a single-process float64 reference, forward and backward."""
