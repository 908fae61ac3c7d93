"""Loads exported pipeline folders in an interpreter where the deepflow package cannot be imported.

Run as ``python -I diffusers_only.py jobs.json results.json`` from a folder outside the repository: ``-I`` keeps the
script's folder, the working directory and PYTHON* variables off ``sys.path``; the finder installed first makes
``import deepflow`` (and any ``deepflow.*``) fail even though the package is installed in this environment
(editable: a meta-path finder added by a ``.pth`` file). Only torch, diffusers, safetensors, numpy, PIL (and
transformers for text models) are used.

Each job: ``{"name", "folder", "call": {pipeline kwargs}, "load": {from_pretrained kwargs}, "out": npz path,
"save_to": optional folder for a save_pretrained round trip}``; the results: per job either
``{"ok": true, ...}`` (images in ``out``: ``pil`` uint8 [B,H,W,C], ``pt`` float [B,C,H,W], ``again``: the images
of the saved copy) or ``{"ok": false, "error": "<Type>: <message>"}``.
"""
from __future__ import annotations

import importlib.abc
import json
import sys


class _NoDeepflow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201 - the finder protocol
        if name == "deepflow" or name.startswith("deepflow."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: a diffusers-only interpreter)", name=name)
        return None


sys.meta_path.insert(0, _NoDeepflow())


def _deepflow_importable() -> bool:
    try:
        import deepflow  # noqa: F401
    except ImportError:
        return False
    return True


def _images(pipe, call: dict) -> dict:  # noqa: ANN001
    import numpy as np
    import torch

    kwargs = dict(call)
    if "generator_seed" in kwargs:
        kwargs["generator"] = torch.Generator().manual_seed(int(kwargs.pop("generator_seed")))
    pil = pipe(**kwargs, output_type="pil").images
    if "generator_seed" in call:
        kwargs["generator"] = torch.Generator().manual_seed(int(call["generator_seed"]))
    pt = pipe(**kwargs, output_type="pt").images
    pixels = np.stack([np.asarray(image) for image in pil])
    return {"pil": pixels if pixels.ndim == 4 else pixels[..., None], "pt": pt.float().numpy()}


def run_script(job: dict) -> dict:
    """Run ``job["script"]`` (e.g. the README's example) as written, in ``job["cwd"]``."""
    import os

    before = os.getcwd()
    os.chdir(job["cwd"])
    try:
        exec(compile(job["script"], "README.md", "exec"), {"__name__": "__main__"})
    finally:
        os.chdir(before)
    return {"ok": True}


def run(job: dict) -> dict:
    if "script" in job:
        return run_script(job)
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    load = dict(job.get("load", {}))
    if "torch_dtype" in load:
        load["torch_dtype"] = getattr(torch, load["torch_dtype"])
    if "vae_from" in load:
        from diffusers import AutoencoderKL

        load["vae"] = AutoencoderKL.from_pretrained(load.pop("vae_from"))
    pipe = DiffusionPipeline.from_pretrained(job["folder"], trust_remote_code=True, **load)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to("cpu")
    arrays = _images(pipe, job["call"])
    result = {"ok": True, "class": type(pipe).__name__, "components": sorted(pipe.components)}
    if job.get("save_to"):
        pipe.save_pretrained(job["save_to"])
        again = DiffusionPipeline.from_pretrained(job["save_to"], trust_remote_code=True)
        again.set_progress_bar_config(disable=True)
        arrays["again"] = _images(again, job["call"])["pil"]
    np.savez(job["out"], **arrays)
    return result


def main() -> int:
    jobs_path, results_path = sys.argv[1], sys.argv[2]
    results: dict = {"deepflow_importable": _deepflow_importable(),
                     "modules": sorted(name for name in sys.modules if name.split(".")[0] == "deepflow"),
                     "sys_path": list(sys.path), "jobs": {}}
    import torch

    torch.set_num_threads(1)
    for job in json.loads(open(jobs_path).read()):
        try:
            results["jobs"][job["name"]] = run(job)
        except Exception as error:  # noqa: BLE001 - reported to the test, which checks the message
            results["jobs"][job["name"]] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    results["modules_after"] = sorted(name for name in sys.modules if name.split(".")[0] == "deepflow")
    with open(results_path, "w") as handle:
        json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
