"""DeepFlow and SiT networks and the flow math. No I/O, no torch.distributed."""

from deepflow.models.dit import BranchOutputs, DeepFlowDiT
from deepflow.models.registry import create_model, list_models

__all__ = ["BranchOutputs", "DeepFlowDiT", "create_model", "list_models"]
