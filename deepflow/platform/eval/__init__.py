"""Evaluation: metric math, feature-extractor registry, Inception, small-data classifier, CLIP score, evaluator."""
