"""Argument validation shared by every backend.

This is the one place that raises for bad arguments, so that behaviour cannot drift between the
CPU, GPU and distributed paths. Exception *types* follow torch 2.13 (users catch them); messages
say what was wrong, what was expected and what was given.

One module per family of losses, the shared pieces in ``_common``; every check is re-exported
here, so callers write ``_checks.check_...`` whatever its family:

==================  ===========================================================================
``_common``         reductions, ``ignore_index``, label smoothing, ``z_loss``, ``softcap``,
                    ``chunk_size``, floating input, non-differentiable weights, devices; dtype
                    and shape names for messages; host reads vs device assertions
``binary``          ``binary_cross_entropy`` and ``binary_cross_entropy_with_logits``
``categorical``     ``nll_loss`` and ``cross_entropy``: class-index and probability targets,
                    the class weight, the target range
``linear``          linear cross entropy (both target kinds) and linear distillation: the heads
``backend``         the ``CROSSENT_BACKEND`` setting (imported from there, by ``_backend``)
``distributed``     the vocab-parallel losses' local checks (imported from there, not here)
==================  ===========================================================================
"""

from __future__ import annotations

from crossent._checks._common import (
    Reduction,
    check_chunk_size,
    check_floating,
    check_ignore_index,
    check_label_smoothing,
    check_not_differentiable,
    check_real,
    check_reduction,
    check_same_device,
    check_softcap,
    check_z_loss,
    dtype_repr,
    reduction_from_legacy,
    resolve_reduction,
    scalar_type_name,
    shape_repr,
)
from crossent._checks.binary import (
    check_binary_cross_entropy,
    check_binary_cross_entropy_with_logits,
    check_probabilities,
)
from crossent._checks.categorical import (
    check_class_weight,
    check_cross_entropy_prob,
    check_index_target_dtype,
    check_index_targets,
    check_nll_shapes,
    check_probability_ignore_index,
    check_target_range,
)
from crossent._checks.linear import (
    check_distillation_heads,
    check_distillation_options,
    check_distillation_target,
    check_linear_dtypes,
    check_linear_head,
    check_linear_ignore_index,
    check_linear_shapes,
    check_probability_target_options,
)

__all__ = [
    "Reduction",
    "check_binary_cross_entropy",
    "check_binary_cross_entropy_with_logits",
    "check_chunk_size",
    "check_class_weight",
    "check_cross_entropy_prob",
    "check_distillation_heads",
    "check_distillation_options",
    "check_distillation_target",
    "check_floating",
    "check_ignore_index",
    "check_index_target_dtype",
    "check_index_targets",
    "check_label_smoothing",
    "check_linear_dtypes",
    "check_linear_head",
    "check_linear_ignore_index",
    "check_linear_shapes",
    "check_nll_shapes",
    "check_not_differentiable",
    "check_probabilities",
    "check_probability_ignore_index",
    "check_probability_target_options",
    "check_real",
    "check_reduction",
    "check_same_device",
    "check_softcap",
    "check_target_range",
    "check_z_loss",
    "dtype_repr",
    "reduction_from_legacy",
    "resolve_reduction",
    "scalar_type_name",
    "shape_repr",
]
