"""torch_embed: widen trained PyTorch networks by critical embeddings, measure the landscape.

The Embedding Principle (Zhang, Li, Zhang, Luo, Xu; NeurIPS 2021, J. Mach. Learn. 2022)
says the loss landscape of a wide network contains every critical point of every
narrower one. torch_embed widens ``nn.Sequential`` MLPs, and any model it can trace
into width groups (:func:`width_groups`), in place by such embeddings, deepens
residual models by null blocks (:func:`deepen`), and computes
Hessian inertia before and after, including its exact change.

``torch_embed.testing`` (assertion helpers), ``torch_embed.landscape`` and
``torch_embed.distributed`` (widening under DDP and FSDP2) are submodules; the most
used landscape tools are also exported here.
"""

from torch_embed import distributed, landscape, testing
from torch_embed._sequential import register_elementwise
from torch_embed.critical import CriticalPointResult, critical_point
from torch_embed.deepen import deepen
from torch_embed.depth import DepthEmbedding
from torch_embed.embedding import Embedding, EmbeddingKind, LayerMap
from torch_embed.exactness import forward_error_bound, unit_roundoff
from torch_embed.graph.groups import WidthGroup, width_groups
from torch_embed.hessian import HessianOperator, flat_loss, gradient, hessian, hvp
from torch_embed.inertia import Inertia, default_tolerance, eigenvalues, hessian_inertia, inertia
from torch_embed.inertia_change import complement_blocks, inertia_change
from torch_embed.landscape import (
    condense,
    critical_dimension,
    effective_widths,
    empirical_nullity,
    escape,
    saddle_certificates,
    truly_bad_condition,
)
from torch_embed.optim_state import (
    SUPPORTED_OPTIMIZERS,
    ApproximateStateWarning,
    map_optimizer_state,
)
from torch_embed.report import EmbeddingReport, check_embedding
from torch_embed.schemes import General, Net2Net, Null, RandomPad, Scheme, Split, plan
from torch_embed.spectrum import extreme_eigenvalues, hutchinson_trace, spectral_density
from torch_embed.widen import embed_, widen

__version__ = "0.1.0"

# Sorted (ruff RUF022); the README's table groups the same names by task.
__all__ = [
    "SUPPORTED_OPTIMIZERS",
    "ApproximateStateWarning",
    "CriticalPointResult",
    "DepthEmbedding",
    "Embedding",
    "EmbeddingKind",
    "EmbeddingReport",
    "General",
    "HessianOperator",
    "Inertia",
    "LayerMap",
    "Net2Net",
    "Null",
    "RandomPad",
    "Scheme",
    "Split",
    "WidthGroup",
    "__version__",
    "check_embedding",
    "complement_blocks",
    "condense",
    "critical_dimension",
    "critical_point",
    "deepen",
    "default_tolerance",
    "distributed",
    "effective_widths",
    "eigenvalues",
    "embed_",
    "empirical_nullity",
    "escape",
    "extreme_eigenvalues",
    "flat_loss",
    "forward_error_bound",
    "gradient",
    "hessian",
    "hessian_inertia",
    "hutchinson_trace",
    "hvp",
    "inertia",
    "inertia_change",
    "landscape",
    "map_optimizer_state",
    "plan",
    "register_elementwise",
    "saddle_certificates",
    "spectral_density",
    "testing",
    "truly_bad_condition",
    "unit_roundoff",
    "widen",
    "width_groups",
]
