"""Prompt methods over a frozen CLIP: zero-shot, CoOp, CoCoOp, KgCoOp, MaPLe, DPL, IVLP, PromptSRC,
and DePT."""
from .base import ModelOutput, PromptedCLIP, PromptModel
from .cocoop import CoCoOp
from .coop import CoOp
from .dept import DePT
from .dpl import DPL
from .factory import BASE_METHODS, METHOD_NAMES, build_model, depths_within, method_defaults, parse_method
from .ivlp import IVLP
from .kgcoop import KgCoOp
from .maple import MaPLe
from .promptsrc import PromptSRC
from .zsclip import ZeroShotCLIP

__all__ = [
    "ModelOutput", "PromptModel", "PromptedCLIP", "CoOp", "CoCoOp", "KgCoOp", "MaPLe", "DPL", "IVLP", "PromptSRC",
    "DePT", "ZeroShotCLIP", "BASE_METHODS", "METHOD_NAMES", "build_model", "depths_within", "method_defaults",
    "parse_method",
]
