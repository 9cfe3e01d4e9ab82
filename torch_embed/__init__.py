"""torch_embed: widen trained PyTorch MLPs by critical embeddings, measure the landscape.

The Embedding Principle (Zhang, Li, Zhang, Luo, Xu; NeurIPS 2021, J. Mach. Learn. 2022)
says the loss landscape of a wide network contains every critical point of every
narrower one. torch_embed widens ``nn.Sequential`` MLPs in place by such embeddings,
and computes Hessian inertia before and after, including its exact change.
"""

from torch_embed._sequential import register_elementwise
from torch_embed.embedding import Embedding, EmbeddingKind, LayerMap
from torch_embed.exactness import forward_error_bound
from torch_embed.optim_state import SUPPORTED_OPTIMIZERS, map_optimizer_state
from torch_embed.schemes import General, Net2Net, Null, RandomPad, Scheme, Split, plan
from torch_embed.widen import embed_, widen

__version__ = "0.1.0"

__all__ = [
    "SUPPORTED_OPTIMIZERS",
    # the embedding as data
    "Embedding",
    "EmbeddingKind",
    "General",
    "LayerMap",
    "Net2Net",
    "Null",
    "RandomPad",
    "Scheme",
    # schemes
    "Split",
    "__version__",
    "embed_",
    # exactness
    "forward_error_bound",
    "map_optimizer_state",
    "plan",
    "register_elementwise",
    # widening
    "widen",
]
