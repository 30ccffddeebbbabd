"""The DCN benchmark cases (``bevdeploy.eval.bench_ops.dcn_igemm_cases``) built and run on a tiny layer through the
interpreter: what the GPU bench times is the kernel it names, and its int8 check columns measure something."""

import torch

from bevdeploy.eval import bench_ops


def test_dcn_cases_run_and_check_the_int8_kernel_against_its_cpu_math(device):
    # two widths: each case must use its own int8 scales (the H100 run of 2026-12-07 failed on the first case,
    # whose closures had picked up the last case's per-channel weight scales)
    cases = bench_ops.dcn_igemm_cases(layers=[("tiny 1x32x6x8", (1, 32, 6, 8)), ("tiny 1x16x5x7", (1, 16, 5, 7))],
                                      device=str(device), variants=("fp16x2", "int8"))
    for case in cases:
        ref = case.reference().double().cpu()
        for variant in case.variants:
            y = case.make(variant)().double().cpu()
            err = ((y - ref).norm() / ref.norm()).item()
            assert y.shape == ref.shape and torch.isfinite(y).all()
            # fp16x2: fp16 storage only; int8: the quantization of x (amax / 127) and of the weights
            assert err < (2e-3 if variant == "fp16x2" else 3e-2), (case.shape, variant, err)
        check = case.extra["err_vs_cpu_int8"]
        assert check("fp16x2", 1.0) is None
        assert 0.0 <= check("int8", 1.0) < 2e-3  # the kernel equals the op's CPU int8 math (fp16 samples)
