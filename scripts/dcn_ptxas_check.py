"""Offline sm_90 compile check of the DCN implicit-GEMM kernel (no GPU needed): registers, spills,
shared memory, wgmma / cp.async counts per tile config, as ``ptxas -v`` reports them.

    PYTHONPATH=. python scripts/dcn_ptxas_check.py                      # the fp16 candidates
    PYTHONPATH=/path/to/triton-3.6:. PTXAS=ptxas python scripts/dcn_ptxas_check.py
    python scripts/dcn_ptxas_check.py "[(2, 64, 256, 32, 8, 3, True, False)]"   # VARIANT, BM, BN, BK, warps, stages, swap, tap_inner
    python scripts/dcn_ptxas_check.py int8                              # the int8 candidates (fp16-MMA form)

Strides are specialised as the GPU launch sees them for channels-last input/weight and an offset slice
of a channels-last offset-conv output (stride 1 as a constexpr, the others divisible by 16): without
that, Triton neither vectorises the gathers nor pipelines them, and the numbers mean nothing.
"""

import ast
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from bevdeploy.ops import modulated_deform_conv2d as mdc  # noqa: E402


def ptxas_report(kernel) -> str:
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptxas = os.path.join(bin_dir, os.environ.get("PTXAS", "ptxas-blackwell" if os.path.exists(
        os.path.join(bin_dir, "ptxas-blackwell")) else "ptxas"))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    r = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
    os.unlink(f.name)
    text = r.stderr + r.stdout
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    warn = " C7515(wgmma serialised)" if "C7515" in text else ""
    return f"regs {regs.group(1) if regs else '?'} spill-stores {spill.group(1) if spill else '?'}{warn}"


def compile_config(variant, bm, bn, bk, warps, stages, swap=False, tap_inner=False, cin=256, int8_mma=False):
    """variant 3 (int8) compiles as the int8 engines launch it: int8 input codes, ReLU and int8 output, fp16
    weight codes (int8 ones with ``int8_mma``)."""
    fn = mdc._modulated_deform_conv2d_igemm_kernel
    names = fn.arg_names
    dt = "fp32" if variant == 0 else "fp16"
    ptr_dt = dict(x_ptr=dt, w_ptr=dt, y_ptr=dt, ws_ptr="fp32")
    if variant == 3:
        ptr_dt.update(x_ptr="i8", y_ptr="i8", w_ptr="i8" if int8_mma else "fp16")
    ones = dict(stride_xc=1, stride_wc=1, stride_oc=1, stride_mw=1)
    div16 = {"x_ptr", "off_ptr", "msk_ptr", "w_ptr", "b_ptr", "y_ptr", "stride_xn", "stride_xh", "stride_xw",
             "stride_wo", "stride_wh", "stride_ww", "Cout", "Cd", "HoWo", "stride_mn", "stride_mc", "stride_on"}
    const = dict(**ones, KH=3, KW=3, VARIANT=variant, HAS_BIAS=True, NCB=cin // bk, CH_MASK=False, N_MASK=False,
                 BASE_ALIGN=16, USE_ASM=True, CARRY=False, SWAP=swap, TAP_INNER=tap_inner,
                 ACTIVATION=int(variant == 3), OUT_INT8=variant == 3, INT8_MMA=bool(int8_mma), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    sig = {}
    for a in names:
        if a in const:
            sig[a] = "constexpr"
        elif a.endswith("_ptr"):
            sig[a] = "*" + ptr_dt.get(a, "fp16")
        elif a in ("input_scale", "inv_out_scale", "out_lo", "out_hi", "out_zp", "x_zp"):
            sig[a] = "fp32"
        else:
            sig[a] = "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs={(names.index(a),): [["tt.divisibility", 16]] for a in div16})
    return triton.compile(src, target=GPUTarget("cuda", 90, 64), options=dict(num_warps=warps, num_stages=stages))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "int8":
        configs = [(3, *c) for c in mdc._igemm_candidate_configs("int8")]
    elif len(sys.argv) > 1:
        configs = ast.literal_eval(sys.argv[1])
    else:
        configs = [(2, *c) for c in mdc._igemm_candidate_configs("fp16")]
    print(f"triton {triton.__version__}")
    for cfg in configs:
        try:
            k = compile_config(*cfg)
        except Exception as e:  # noqa: BLE001 (report and go on)
            print(cfg, "FAILED", type(e).__name__, str(e)[:300])
            continue
        ptx = k.asm["ptx"]
        print(cfg, ptxas_report(k), f"smem {k.metadata.shared}", f"wgmma {ptx.count('wgmma.mma_async')}",
              f"cp.async {ptx.count('cp.async.cg') + ptx.count('cp.async.ca')}", flush=True)


if __name__ == "__main__":
    main()
