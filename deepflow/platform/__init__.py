"""Training at scale: config, engines (ddp/fsdp/deepspeed), checkpoints, EMA, eval, logging."""
