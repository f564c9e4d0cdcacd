"""Selections and data movement (max pooling, `max`, slicing, reshapes, concatenation,
padding, gathers, sorting, and across devices `all_gather`, `ppermute`, `all_to_all`):
relevance follows the gradient, to the values each output was taken from. Comparisons and other elementwise ops with integer or boolean outputs carry none."""

from __future__ import annotations

from jaxlrp._analysis import is_float
from jaxlrp._ops.base import PASSTHROUGH, classifier
from jaxlrp._program import Node

# A table: `jaxlrp.extend.register_passthrough` adds to it.
GRADIENT = set(
    """reshape broadcast_in_dim squeeze expand_dims transpose concatenate stack slice dynamic_slice
    dynamic_update_slice gather scatter scatter-max scatter-min pad rev select_n max min reduce_max
    reduce_min reduce_window_max reduce_window_min copy convert_element_type reduce_precision split
    sort cummax cummin stop_gradient optimization_barrier pvary pcast all_gather ppermute all_to_all
    name""".split()  # name: jax.ad_checkpoint.checkpoint_name, for save_only_these_names policies
)


@classifier(order=PASSTHROUGH)
def _passthrough(planner, node: Node, relevant) -> bool:
    """Computed as it is: the program's own gradient carries the relevance."""
    return node.name in GRADIENT or (node.elementwise and not is_float(node.outputs[0]))
