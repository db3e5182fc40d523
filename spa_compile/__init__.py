"""spa_compile: a torch.compile backend that turns attention into Sparse Projected Attention.

    model = torch.compile(model, backend="spa")

See SPEC.md for the semantics and README.md for explain, tuning and inspection.
"""

from . import calibrate  # a callable module: spa_compile.calibrate(model, batches, ...)
from . import ops  # noqa: F401  (registers torch.ops.spa.attention)
from .backend import spa_backend
from .config import SPAConfig
from .explain import Report, SiteReport, explain
from .functional import spa_attention
from .inspection import inspect
from .logging_setup import configure_from_env as _configure_logging_from_env
from .projector import Projector
from .training_alongside import ProjectorTrainer
from .visibility import BiasMaskError, Visibility

__all__ = [
    "SPAConfig",
    "Projector",
    "ProjectorTrainer",
    "Report",
    "SiteReport",
    "Visibility",
    "BiasMaskError",
    "calibrate",
    "explain",
    "inspect",
    "spa_attention",
    "spa_backend",
]
__version__ = "0.1.0"


def _register_backend_without_entry_point() -> None:
    """``backend="spa"`` also where spa_compile is on the path but not installed (no entry point).

    An installed package registers through the ``torch_dynamo_backends`` entry point, which
    Dynamo loads itself; registering here as well would be a duplicate, so this only fills in.
    """
    from importlib.metadata import entry_points

    from torch._dynamo.backends import registry

    if "spa" in entry_points(group="torch_dynamo_backends").names or "spa" in registry._COMPILER_FNS:
        return
    registry.register_backend(spa_backend, name="spa")


_register_backend_without_entry_point()

_configure_logging_from_env()  # SPA_LOG=1 prints each site's decision (see logging_setup)
