"""Training: config, distributed context, engines, EMA, checkpoints, trainer, logging, periodic eval."""
