"""Exports of trained models to other ecosystems: a self-contained diffusers pipeline folder
(``deepflow export --format diffusers``; :func:`export_diffusers`)."""

from deepflow.platform.export.diffusers_export import ExportResult, export_diffusers

__all__ = ["ExportResult", "export_diffusers"]
