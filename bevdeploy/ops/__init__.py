"""The reference system's TensorRT plugins as ``torch.library`` ops with Triton kernels.

Importing this package registers every ``torch.ops.bevdeploy.*`` op. Each op lives in a module of
its own name, with its public function and ``nn.Module`` inside (``from bevdeploy.ops.msda import
msda, MSDA``); the package does not re-export the functions, so ``bevdeploy.ops.msda`` always is the
module (a same-named function here would shadow it). See ``ops/README.md`` for the variants (fp32,
fp16, fp16x2, int8), the dispatch rule and the registration choice.
"""

from bevdeploy.ops import (  # noqa: F401  (imported for their op registrations)
    bev_pool_v2,
    flash_attention,
    grid_sample,
    inverse,
    modulated_deform_conv2d,
    msda,
    rotate,
    sca,
)

OP_MODULES = ("bev_pool_v2", "flash_attention", "grid_sample", "inverse", "modulated_deform_conv2d", "msda", "rotate", "sca")
