"""The built-in passes, one a file; importing this package registers them."""
from msc.passes import (  # noqa: F401
    annotate_roles,
    insert_dispatch_combine,
    lower_roles,
    pipeline_microbatches,
    place_experts,
    shard_tensor_parallel,
    split_roles,
)
