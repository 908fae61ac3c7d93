"""DeepFlow and SiT networks, the text-to-image MMDiT and the flow math. No I/O, no torch.distributed."""

from deepflow.models.dit import BranchOutputs, DeepFlowDiT
from deepflow.models.mmdit import DeepFlowMMDiT
from deepflow.models.registry import ModelSpec, create_model, list_models, model_spec

__all__ = ["BranchOutputs", "DeepFlowDiT", "DeepFlowMMDiT", "ModelSpec", "create_model", "list_models", "model_spec"]
