"""Inference: one generate path (conditions -> sampler -> decoder -> uint8) and the batch sampling job."""
