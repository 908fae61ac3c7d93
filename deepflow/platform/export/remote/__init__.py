"""Templates of the code an exported diffusers folder carries (``pipeline_deepflow.py``, ``deepflow_transformer.py``,
``deepflow_scheduler.py``, and ``deepflow_export_common.py``: what those three share). They are never imported from the
package: ``deepflow.platform.export.codegen`` fills their generated blocks and writes them into the folder, beside the
copied ``deepflow/models`` modules they import."""
