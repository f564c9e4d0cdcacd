"""The operation families, each registering what it knows in the tables of `base`.

Importing this package registers the built-in operations, in the same tables that
`jaxlrp.extend` adds to."""

from jaxlrp._ops import (  # noqa: F401
    base,
    control,
    convolution,
    embeddings,
    kernels,
    linear,
    norms,
    products,
    registered,
    regions,
    selections,
    softmax,
    ssm,
)
