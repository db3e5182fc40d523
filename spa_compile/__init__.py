"""spa_compile: a torch.compile backend that turns attention into Sparse Projected Attention."""

from .config import SPAConfig
from .projector import Projector
from .visibility import BiasMaskError, Visibility

__all__ = ["SPAConfig", "Projector", "Visibility", "BiasMaskError"]
