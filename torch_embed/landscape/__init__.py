"""Landscape tools: strict-saddle certificates, escape by widening, condensation.

Thin re-exports; the modules hold the documentation:
:mod:`~torch_embed.landscape.saddles`, :mod:`~torch_embed.landscape.condense`,
:mod:`~torch_embed.landscape.dimension`.
"""

from torch_embed.landscape.condense import CondenseResult, condense, effective_widths
from torch_embed.landscape.dimension import critical_dimension, empirical_nullity
from torch_embed.landscape.saddles import (
    Certificate,
    EscapeResult,
    EscapeStep,
    TrulyBadCondition,
    escape,
    saddle_certificates,
    truly_bad_condition,
)

# saddles: Certificate, EscapeResult, EscapeStep, TrulyBadCondition, escape,
#   saddle_certificates, truly_bad_condition; condense: CondenseResult, condense,
#   effective_widths; dimension: critical_dimension, empirical_nullity.
__all__ = [
    "Certificate",
    "CondenseResult",
    "EscapeResult",
    "EscapeStep",
    "TrulyBadCondition",
    "condense",
    "critical_dimension",
    "effective_widths",
    "empirical_nullity",
    "escape",
    "saddle_certificates",
    "truly_bad_condition",
]
