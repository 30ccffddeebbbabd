"""Offline sm_90 compile check of the int8 GEMM / implicit-GEMM conv kernels (no GPU needed): registers,
spills and wgmma count per tile config, as ``ptxas -v`` reports them, for the YOLOX bottleneck epilogue
(bias + SiLU + int8 residual after it + int8 out) with and without the smoothing multipliers
(``out_mul`` / ``residual_mul``).

    PYTHONPATH=. python scripts/int8_ptxas_check.py
    PYTHONPATH=. python scripts/int8_ptxas_check.py "[(128, 64, 64, 8, 4, 4)]"   # BM, BN, BK, GROUP_M, warps, stages

Pointers and the sizes / strides a GPU launch sees as multiples of 16 are specialised so (Triton does the
same at launch); without that the loads are not vectorised and the numbers mean nothing.
"""

import ast
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from dcn_ptxas_check import ptxas_report  # noqa: E402

from bevdeploy.quant import int8_kernels as ik  # noqa: E402

FLOATS = {"x_scale", "res_scale", "inv_out_scale", "res_zp", "out_lo", "out_hi", "out_zp"}
DIV16 = {"C", "O", "N", "K", "stride_xb", "stride_wo", "stride_xm", "stride_wn", "stride_rm", "stride_ym"}
PTR_DTYPES = dict(x_ptr="i8", w_ptr="i8", y_ptr="i8", r_ptr="i8", wsum_ptr="i32")


def compile_kernel(fn, const: dict, config):
    names = fn.arg_names
    sig = {a: "constexpr" if a in const else ("*" + PTR_DTYPES.get(a, "fp32")) if a.endswith("_ptr")
           else "fp32" if a in FLOATS else "i32" for a in names}
    div16 = [a for a in names if a not in const and (a.endswith("_ptr") or a in DIV16)]
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs={(names.index(a),): [["tt.divisibility", 16]] for a in div16})
    _, _, _, _, warps, stages = config
    return triton.compile(src, target=GPUTarget("cuda", 90, 64), options=dict(num_warps=warps, num_stages=stages))


def main() -> None:
    configs = ast.literal_eval(sys.argv[1]) if len(sys.argv) > 1 else [(128, 128, 64, 8, 8, 3), (128, 64, 64, 8, 4, 4)]
    print(f"triton {triton.__version__}")
    for cfg in configs:
        bm, bn, bk, gm = cfg[:4]
        for mul in (False, True):
            epi = dict(HAS_BIAS=True, HAS_RESIDUAL=True, ACTIVATION=2, OUT_INT8=True, RES_AFTER_ACT=True, HAS_XZP=False,
                       BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, HAS_OUT_MUL=mul, HAS_RES_MUL=mul)
            kernels = [("conv 3x3", ik._int8_conv2d_kernel, dict(KH=3, KW=3, EVEN_C=True, **epi)),
                       ("linear", ik._int8_linear_kernel, dict(EVEN_K=True, PRELOAD_RES=False, **epi))]
            for label, fn, const in kernels:
                try:
                    k = compile_kernel(fn, const, cfg)
                except Exception as e:  # noqa: BLE001 (report and go on)
                    print(cfg, label, "multipliers" if mul else "plain", "FAILED", type(e).__name__, str(e)[:300])
                    continue
                print(cfg, label, "multipliers" if mul else "plain", ptxas_report(k),
                      f"wgmma {k.asm['ptx'].count('wgmma.mma_async')}", flush=True)


if __name__ == "__main__":
    main()
