"""Import of the reference implementation's checkpoints (ByteDance-Seed/DeepFlow key layout) and export back.

The mapping functions are pure (no I/O); the command that reads a reference checkpoint and writes an export is
``deepflow.platform.inference.convert``:

    python -m deepflow.platform.inference.convert --reference ckpt.pt --name "DeepFlow-XL/2-3T" --out converted/
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import torch

from deepflow.models.dit import DeepFlowDiT
from deepflow.models.registry import SIZES, create_model, parse_model_name

__all__ = [
    "load_reference_state_dict",
    "to_reference_state_dict",
    "reference_key_to_ours",
    "our_key_to_reference",
    "infer_reference_config",
    "reference_legacy_scaling",
    "select_reference_weights",
    "REFERENCE_LEGACY_SCALING_DEFAULT",
    "ReferenceCheckpointError",
]

#: The reference scripts' default for ``--legacy-scaling`` (a store_true flag): the gap-modulation scale is not
#: clamped. Used when a checkpoint's args do not say (a bare state dict, or args without the field).
REFERENCE_LEGACY_SCALING_DEFAULT = False


class ReferenceCheckpointError(ValueError):
    """The checkpoint does not match the requested architecture (lists the offending keys)."""


# (reference prefix pattern, our prefix); N = block index. Everything else keeps its name.
_RENAMES: list[tuple[str, str]] = [
    (r"df_blocks\.(\d+)\.cross_attention\.multihead_attn\.", r"vera_blocks.\1.cross_attention."),
    (r"df_blocks\.(\d+)\.", r"vera_blocks.\1."),
    (r"final_layer\.(\d+)\.", r"velocity_heads.\1."),
    (r"final_acc_layer\.", "acc_head."),
]
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def reference_key_to_ours(key: str, num_branches: int) -> str:
    """Reference name -> our parameter name (SiT's single ``final_layer.*`` maps to ``velocity_heads.0.*``)."""
    key = _strip_wrappers(key)
    if num_branches == 1 and key.startswith("final_layer.") and not re.match(r"final_layer\.\d+\.", key):
        return "velocity_heads.0." + key[len("final_layer."):]
    for pattern, repl in _RENAMES:
        new, n = re.subn("^" + pattern, repl, key)
        if n:
            return new
    return key


def our_key_to_reference(key: str, num_branches: int) -> str:
    """Our parameter name -> reference name (inverse of ``reference_key_to_ours``)."""
    if num_branches == 1 and key.startswith("velocity_heads.0."):
        return "final_layer." + key[len("velocity_heads.0."):]
    m = re.match(r"vera_blocks\.(\d+)\.cross_attention\.(in_proj_weight|in_proj_bias|out_proj\..*)$", key)
    if m:
        return f"df_blocks.{m[1]}.cross_attention.multihead_attn.{m[2]}"
    for ours, ref in ((r"vera_blocks\.(\d+)\.", r"df_blocks.\1."), (r"velocity_heads\.(\d+)\.", r"final_layer.\1."),
                      (r"acc_head\.", "final_acc_layer.")):
        new, n = re.subn("^" + ours, ref, key)
        if n:
            return new
    return key


def _indices(keys: list[str], prefix: str) -> list[int]:
    pat = re.compile("^" + re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m[1]) for k in keys if (m := pat.match(k))})


def _args_get(args: Any, name: str) -> Any:
    if args is None:
        return None
    if isinstance(args, Mapping):
        return args.get(name)
    return getattr(args, name, None)


def select_reference_weights(
    checkpoint: Mapping[str, Any], prefer: str = "ema"
) -> tuple[Mapping[str, torch.Tensor], Any]:
    """A full checkpoint dict {ema, model, args, ...} -> (weights, args); a bare state dict -> (it, None)."""
    if any(isinstance(checkpoint.get(k), Mapping) for k in ("ema", "model")):
        order = [prefer] + [k for k in ("ema", "model") if k != prefer]
        for k in order:
            if isinstance(checkpoint.get(k), Mapping):
                return checkpoint[k], checkpoint.get("args")
    return checkpoint, None


def reference_legacy_scaling(args: Any) -> bool | None:
    """``args.legacy_scaling`` of a reference checkpoint (True: the gap-modulation scale was clamped to [-5, 5]),
    or None when ``args`` (an argparse.Namespace or a dict) is absent or does not record it."""
    value = _args_get(args, "legacy_scaling")
    if value is None:
        return None
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise ReferenceCheckpointError(f"args.legacy_scaling must be true or false, got {value!r}")


def _reference_df_idxs(args: Any) -> list[int] | None:
    """``args.df_idxs``: the reference scripts store the JSON text of the list ("[8,16]"); a list is accepted too."""
    value = _args_get(args, "df_idxs")
    if value is None:
        return None
    try:
        if isinstance(value, str):
            value = json.loads(value)
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        idxs = [int(i) for i in value]
        if any(isinstance(i, bool) for i in value):
            raise TypeError
    except (TypeError, ValueError):
        raise ReferenceCheckpointError(f"args.df_idxs must be a list of block counts, got {value!r}") from None
    return idxs


def _check_args_agree(args: Any, config: dict[str, Any], has_projectors: bool) -> None:
    """ReferenceCheckpointError when an architectural field of ``args`` contradicts the tensors: num_classes,
    resolution (latents are resolution / 8), ssl_align (the SSL projectors)."""
    num_classes = _args_get(args, "num_classes")
    if num_classes is not None and int(num_classes) != config["num_classes"]:
        raise ReferenceCheckpointError(
            f"args.num_classes={num_classes} but the label table holds {config['num_classes']} classes (+1 null)"
        )
    resolution = _args_get(args, "resolution")
    if resolution is not None and int(resolution) // 8 != config["input_size"]:
        raise ReferenceCheckpointError(
            f"args.resolution={resolution} means {int(resolution) // 8}x{int(resolution) // 8} latents but "
            f"pos_embed holds {config['input_size']}x{config['input_size']}"
        )
    ssl_align = _args_get(args, "ssl_align")
    if ssl_align is not None and bool(ssl_align) != has_projectors:
        raise ReferenceCheckpointError(
            f"args.ssl_align={bool(ssl_align)} but the state dict {'holds' if has_projectors else 'lacks'} "
            "the SSL projectors (projectors.N.*)"
        )


def infer_reference_config(state_dict: Mapping[str, torch.Tensor], args: Any = None) -> dict[str, Any]:
    """Architecture overrides read from tensor shapes and the checkpoint's ``args`` of a reference state dict.

    From ``args`` (an argparse.Namespace or a dict; every field optional): trans_depth (or depth) and num_classes,
    resolution and ssl_align are checked against the tensors; df_idxs gives the key layers (else evenly spaced);
    qk_norm=True is refused; legacy_scaling gives ``clamp_gap_scale`` (absent: the reference scripts' default,
    no clamp). fused_attn only picks an attention kernel and is ignored.
    """
    keys = [_strip_wrappers(k) for k in state_dict]
    sd = {_strip_wrappers(k): v for k, v in state_dict.items()}
    required = ("pos_embed", "x_embedder.proj.weight", "y_embedder.embedding_table.weight")
    missing = [k for k in required if k not in sd]
    if missing:
        raise ReferenceCheckpointError(f"not a reference DeepFlow/SiT state dict: missing keys {missing}")
    if _args_get(args, "qk_norm"):
        raise ReferenceCheckpointError("reference checkpoint uses qk_norm=True, which this model does not implement")
    pos = sd["pos_embed"]
    conv = sd["x_embedder.proj.weight"]  # [H, C, p, p]
    grid = int(round(pos.shape[1] ** 0.5))
    if grid * grid != pos.shape[1]:
        raise ReferenceCheckpointError(f"pos_embed has {pos.shape[1]} tokens, not a square grid")
    depth = len(_indices(keys, "blocks."))
    num_vera = len(_indices(keys, "df_blocks."))
    config: dict[str, Any] = dict(
        depth=depth,
        hidden_size=int(pos.shape[-1]),
        in_channels=int(conv.shape[1]),
        patch_size=int(conv.shape[-1]),
        input_size=grid * int(conv.shape[-1]),
        num_classes=int(sd["y_embedder.embedding_table.weight"].shape[0]) - 1,
    )
    for field in ("trans_depth", "depth"):  # the reference scripts' flag is --trans-depth
        args_depth = _args_get(args, field)
        if args_depth is not None and int(args_depth) != depth:
            raise ReferenceCheckpointError(f"args.{field}={args_depth} but the state dict holds {depth} blocks")
    df_idxs = _reference_df_idxs(args)
    if df_idxs is not None:
        key_layers = df_idxs + [depth]
        if len(key_layers) != num_vera + 1:
            raise ReferenceCheckpointError(
                f"args.df_idxs={df_idxs} names {len(key_layers) - 1} VeRA blocks, state dict holds {num_vera}"
            )
        config["key_layers"] = key_layers
    _check_args_agree(args, config, "projectors.0.0.weight" in sd)
    legacy_scaling = reference_legacy_scaling(args)
    config["clamp_gap_scale"] = REFERENCE_LEGACY_SCALING_DEFAULT if legacy_scaling is None else legacy_scaling
    if num_vera:
        config["acc_widths"] = tuple(int(sd[f"df_blocks.0.acc_mlp.{i}.weight"].shape[0]) for i in (0, 2, 4))
    if "projectors.0.0.weight" in sd:
        config.update(
            ssl_align=True,
            projector_dim=int(sd["projectors.0.0.weight"].shape[0]),
            z_dim=int(sd["projectors.0.4.weight"].shape[0]),
        )
    return config


def load_reference_state_dict(
    state_dict: Mapping[str, Any], name: str, prefer: str = "ema", **overrides: Any
) -> DeepFlowDiT:
    """Build ``name`` and load reference-layout weights into it (exact: no key may be unknown or missing).

    ``state_dict``: a reference state dict, or a full checkpoint dict {ema, model, args, ...} (``prefer``
    picks 'ema' or 'model'; ``args`` supplies df_idxs, the key layers excluding the last, and legacy_scaling,
    see ``infer_reference_config``). Depth, widths, classes, input size and SSL projectors are read from the
    tensors. ``clamp_gap_scale`` is args.legacy_scaling, or False (no clamp, the reference scripts' default)
    when the args do not record it. ``overrides`` win (e.g. ``clamp_gap_scale=True`` for a bare state dict of a
    model trained with ``--legacy-scaling``).
    The returned model's parameters share storage with the given tensors (no copy).
    """
    weights, args = select_reference_weights(state_dict, prefer)
    config = infer_reference_config(weights, args)
    size, patch, k = parse_model_name(name)
    ref_model = _args_get(args, "model")  # the reference's model names: "DeepFlow-B/2", "DeepFlow-XL/2"
    m = re.match(r"^(?:DeepFlow|SiT)-(S|B|L|XL)/(\d+)$", ref_model.strip()) if isinstance(ref_model, str) else None
    if m and (m[1], int(m[2])) != (size, patch):
        raise ReferenceCheckpointError(
            f"checkpoint args.model={ref_model!r} does not match {name!r}: pass a {m[1]}/{m[2]} name"
        )
    for field, named in (("hidden_size", SIZES[size][0]), ("patch_size", patch)):
        if field not in overrides and config[field] != named:
            raise ReferenceCheckpointError(
                f"checkpoint {field} {config[field]} does not match {name!r} ({named}); pass the matching name "
                f"or override {field}= (and num_heads=)"
            )
    config.update(overrides)
    if "key_layers" in config and len(config["key_layers"]) != k:
        raise ReferenceCheckpointError(
            f"{name!r} has {k} branches but the checkpoint has {len(config['key_layers'])} "
            f"(key layers {config['key_layers']}); pass the matching name"
        )
    with torch.device("meta"):
        model = create_model(name, **config)
    mapped = {reference_key_to_ours(key, k): value for key, value in weights.items()}
    expected = model.state_dict()
    unknown = sorted(key for key in weights if reference_key_to_ours(key, k) not in expected)
    missing = sorted(our_key_to_reference(key, k) for key in expected if key not in mapped)
    mismatched = sorted(
        f"{our_key_to_reference(key, k)}: checkpoint {tuple(mapped[key].shape)} vs model {tuple(t.shape)}"
        for key, t in expected.items()
        if key in mapped and tuple(mapped[key].shape) != tuple(t.shape)
    )
    if unknown or missing or mismatched:
        lines = [f"reference checkpoint does not match {name!r} (config {config}):"]
        if unknown:
            lines.append(f"  unknown keys ({len(unknown)}): {unknown}")
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {missing}")
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): {mismatched}")
        raise ReferenceCheckpointError("\n".join(lines))
    model.load_state_dict({key: mapped[key].float() for key in expected}, strict=True, assign=True)
    model.pos_embed.requires_grad_(False)
    return model


def to_reference_state_dict(model: DeepFlowDiT) -> dict[str, torch.Tensor]:
    """Our model -> state dict in the reference layout (tensors detached, sharing storage)."""
    k = model.num_branches
    return {our_key_to_reference(key, k): t.detach() for key, t in model.state_dict().items()}
