"""The platform, in three subpackages that show the architecture:

- :mod:`deepflow.platform.train`: run config, process groups, engines (ddp / fsdp / deepspeed), EMA, checkpoints,
  the training loop, TensorBoard logging, periodic evaluation, the Kubernetes launcher environment;
- :mod:`deepflow.platform.eval`: metric math, the feature-extractor registry (inception, dinov2, clip, classifier),
  the small-data classifier, CLIP score, the ADM-protocol evaluator of sample batches;
- :mod:`deepflow.platform.inference`: one generate path (condition plan -> sampler -> decoder -> uint8) and the
  batch sampling job.

Dependency direction: train -> (eval, inference) -> (data_pipeline, artifacts, storage) -> models; eval and
inference do not import each other's internals upward, nothing imports train.
"""
