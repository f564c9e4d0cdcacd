"""jaxlrp: Layer-wise Relevance Propagation as a JAX function transformation.

    import jaxlrp
    from jaxlrp import composites, rules, viz

    explain = jaxlrp.lrp(model, composites.EpsilonPlusFlat())
    relevance = explain(variables, x, target=None)      # shaped like x

See `jaxlrp.rules` for the rules and their math, `jaxlrp.composites` for how layers get them,
`jaxlrp.attribution` for baselines, `jaxlrp.evaluate` for faithfulness, `jaxlrp.concepts` for
concepts (relevance at hidden layers, conditional relevance), `jaxlrp.viz` for pictures, `jaxlrp.attention` for attention in linear memory,
`jaxlrp.extend` to teach jaxlrp new primitives (and `jaxlrp.rules.rule` for new rules).
"""

from jaxlrp import attention, attribution, composites, concepts, evaluate, extend, rules, viz
from jaxlrp._dataset import CorruptChunkWarning, InvalidRowsWarning, explain_dataset
from jaxlrp._generation import explain_generation
from jaxlrp._hooks import Explanation
from jaxlrp._layer import Layer
from jaxlrp._lease import LeaseHeld
from jaxlrp._plan import UnsupportedOperation
from jaxlrp._store import RowStatus, StoreReport, verify_dataset
from jaxlrp._table import LayerInfo, RuleTable
from jaxlrp._transform import UnmergedAffineWarning, lrp, lrp_fn, output_and_lrp, rule_table

__version__ = "0.1.0"

__all__ = [
    "CorruptChunkWarning",
    "Explanation",
    "InvalidRowsWarning",
    "Layer",
    "LayerInfo",
    "LeaseHeld",
    "RowStatus",
    "RuleTable",
    "StoreReport",
    "UnmergedAffineWarning",
    "UnsupportedOperation",
    "attention",
    "attribution",
    "composites",
    "concepts",
    "evaluate",
    "explain_dataset",
    "explain_generation",
    "extend",
    "lrp",
    "lrp_fn",
    "output_and_lrp",
    "rule_table",
    "rules",
    "verify_dataset",
    "viz",
]
