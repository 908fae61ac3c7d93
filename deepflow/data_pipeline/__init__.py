"""Raw data -> encoded webdataset shards on object storage -> training batches.

Modules:
    config         pydantic schema of the precompute job (YAML + ``--set a.b=c``), errors name field paths
    sources        ImageNet-style folders, COCO captions, Fashion-MNIST IDX, sklearn digits, webdataset tars, emoji
    preprocess     ADM centre crop / resize / pad to the training resolution
    encoders       ``pixel`` identity and ``vae`` (diffusers AutoencoderKL posterior mean + std, fp16)
    text_encoders  open_clip and transformers caption encoders (per-token fp16, mask, pooled; null caption)
    shards         the shard format (blocks of samples as .npy / .json / .png members; no pickle)
    manifest       commit protocol: shard records, per-rank done markers, manifest.json written last
    precompute     the rank-sharded, resumable encode job (``jobs/precompute.py``)
    stream         deterministic per-worker sample order and per-batch random draws
    loader         ``ShardLoader``: the training loader with exact ``state_dict`` resume
    arrays         write a committed dataset from in-memory arrays (tests, benchmarks, external encoders)

All reads and writes go through :mod:`deepflow.storage` (one retry policy, atomic writes); the manifest is read as
the typed :class:`deepflow.artifacts.Manifest`.
"""
