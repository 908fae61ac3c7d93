"""Convergence studies: many training runs through the normal trainer, scored and summarised over seeds."""
