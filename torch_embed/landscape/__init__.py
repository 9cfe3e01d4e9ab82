"""Landscape tools: strict-saddle certificates, escape by widening, condensation."""

from torch_embed.landscape.condense import CondenseResult, condense, effective_widths

__all__ = [
    # condensation, the inverse of widening
    "CondenseResult",
    "condense",
    "effective_widths",
]
