"""Write a dataset from in-memory arrays (synthetic data for tests and benchmarks, or data encoded elsewhere).

```python
from deepflow.data_pipeline.arrays import write_array_dataset
write_array_dataset("s3://bucket/toy", {"mean": mean, "std": std}, labels, kind="vae", num_classes=10,
                    storage_options=opts)            # mean/std float16 [N, 4, 32, 32], labels int [N]
loader = ShardLoader("s3://bucket/toy", batch_size=8, storage_options=opts)
```
The result is an ordinary committed dataset (shards, records, done marker, manifest) of one writer rank.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .manifest import ChannelStats, done_marker_name, finalize
from .shards import Block, build_shard, record_name, sha256_hex, shard_name
from deepflow.artifacts import SD_VAE_LATENT_SCALE
from deepflow.storage import Storage

KIND_FIELDS = {"vae": ("mean", "std"), "pixel": ("pixels",)}


def write_array_dataset(
    url: str,
    fields: dict[str, np.ndarray],
    labels: np.ndarray,
    kind: str = "vae",
    num_classes: int | None = None,
    latent_scale: float = SD_VAE_LATENT_SCALE,
    samples_per_shard: int = 1000,
    samples_per_block: int | None = None,
    storage_options: dict[str, Any] | None = None,
    keys: list[str] | None = None,
) -> dict[str, Any]:
    """Write ``fields`` (each ``[N, C, H, W]``; ``mean``+``std`` float16 for ``vae``, ``pixels`` uint8 or
    float16 for ``pixel``; optional ``mean_flip``/``std_flip``) and ``labels`` (int ``[N]``) as a dataset.

    Returns the manifest.
    """
    if kind not in KIND_FIELDS:
        raise ValueError(f"kind must be one of {sorted(KIND_FIELDS)}, got {kind!r}")
    missing = [name for name in KIND_FIELDS[kind] if name not in fields]
    if missing:
        raise ValueError(f"kind {kind!r} needs fields {missing}")
    count = len(labels)
    for name, array in fields.items():
        if array.ndim != 4 or len(array) != count:
            raise ValueError(f"field {name!r}: expected [N={count}, C, H, W], got {list(array.shape)}")
    storage = Storage(url, storage_options)
    storage.makedirs()
    fingerprint = f"arrays-{count}-{sha256_hex(np.ascontiguousarray(labels).tobytes())[:12]}"
    keys = keys if keys is not None else [f"sample-{i:08d}" for i in range(count)]
    labels = np.asarray(labels, dtype=np.int64)
    names = []
    stats_field = KIND_FIELDS[kind][0]
    for index, start in enumerate(range(0, count, samples_per_shard)):
        stop = min(start + samples_per_shard, count)
        block = Block(keys[start:stop], {**{n: a[start:stop] for n, a in fields.items()}, "labels": labels[start:stop]})
        data = build_shard(block, samples_per_block)
        name = shard_name(0, index)
        storage.write_bytes(name, data)
        stats = ChannelStats()
        values = fields[stats_field][start:stop]
        stats.update(values)
        storage.write_json(record_name(name), {"name": name, "num_samples": stop - start, "sha256": sha256_hex(data),
                                               "bytes": len(data), "skipped": [], "stats": stats.to_json(),
                                               "fingerprint": fingerprint})
        names.append(name)
    shape = list(fields[stats_field].shape[1:])
    header = {
        "kind": kind,
        "shape": shape,
        "dtype": str(fields[stats_field].dtype),
        "resolution": None,
        "num_classes": int(num_classes if num_classes is not None else (labels.max() + 1 if count else 0)),
        "class_names": None,
        "latent_scale": latent_scale if kind == "vae" else None,
        "has_flip": "mean_flip" in fields,
        "image_format": None,
        "image_shape": None,
        "encoder": {"name": "arrays", "version": 1},
        "text": None,
        "has_captions": False,
        "source": {"kind": "arrays", "num_items": count},
        "samples_per_shard": samples_per_shard,
        "samples_per_block": samples_per_block,
        "fields": {**{n: {"dtype": str(a.dtype), "shape": list(a.shape[1:])} for n, a in fields.items()},
                   "labels": {"dtype": "int64", "shape": []}},
    }
    storage.write_json(done_marker_name(0), {"rank": 0, "world_size": 1, "fingerprint": fingerprint, "shards": names,
                                            "header": header})
    manifest = finalize(storage, fingerprint, 1, header)
    assert manifest is not None
    return manifest
