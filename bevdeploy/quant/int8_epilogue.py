"""The int8 layers' epilogue as a Triton function: dequantize the int32 sum, bias, residual, activation,
then fp16/fp32 or the next layer's requantized int8 codes.

Shared by the int8 GEMM / conv kernels (:mod:`bevdeploy.quant.int8_kernels`) and the int8 DCNv2 kernel
(:mod:`bevdeploy.ops.modulated_deform_conv2d`), so every int8 layer rounds exactly alike. It imports
nothing from bevdeploy: the op modules import it while ``bevdeploy.ops`` is still initialising.
"""

try:
    import triton
    import triton.language as tl
except ImportError:  # the references run without Triton
    triton = None

if triton is not None:

    @triton.jit
    def load_residual_tile(r_ptr, offs_m, offs_n, M, N, stride_rm, stride_rn):
        """The [BLOCK_M, BLOCK_N] residual tile of rows ``offs_m`` and columns ``offs_n`` (0 outside M x N)."""
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        r_ptrs = r_ptr + offs_m.to(tl.int64)[:, None] * stride_rm + offs_n[None, :] * stride_rn
        return tl.load(r_ptrs, mask=mask, other=0)

    @triton.jit
    def int8_epilogue(
        acc, offs_m, offs_n, M, N, x_scale,
        ws_ptr, b_ptr, r_ptr, y_ptr,
        stride_rm, stride_rn, stride_ym, stride_yn, res_scale, inv_out_scale,
        x_zp, wsum_ptr, res_zp, out_lo, out_hi, out_zp, om_ptr, rm_ptr,
        HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, OUT_INT8: tl.constexpr,
        RES_AFTER_ACT: tl.constexpr, HAS_XZP: tl.constexpr, res_tile, RES_PRELOADED: tl.constexpr,
        HAS_OUT_MUL: tl.constexpr, HAS_RES_MUL: tl.constexpr,
    ):  # fmt: skip
        """y = act(acc * (x_scale * w_scale[n]) + bias[n] + res_scale * residual[m, n]) in fp32 (RES_AFTER_ACT:
        act(acc * (x_scale * w_scale[n]) + bias[n]) + res_scale * residual[m, n], YOLOX's bottleneck); stored
        cast to y's float dtype, or (OUT_INT8) as clamp(rint(y * inv_out_scale), -127, 127): the next
        int8 layer's codes, written once at 1 byte instead of 2 and never re-read as float. rint by
        the 1.5 * 2^23 trick (round half to even, as torch.round), after the clamp; NaN -> 0.
        Zero points (module docstring): HAS_XZP subtracts x_zp * w_sum[n] from the int32 sum; an int8
        residual is read as (r - res_zp) * res_scale; int8 codes are clamped to [out_lo, out_hi]
        (code range less out_zp) before rounding and get out_zp added after it. RES_PRELOADED: the residual
        is ``res_tile``, loaded by the caller before its K loop (:func:`load_residual_tile`), so its memory
        latency hides behind the MMAs instead of following them (short-K GEMMs wait on it); otherwise
        ``res_tile`` is unused and the residual is read here. HAS_OUT_MUL: y[m, n] is multiplied by
        om[n] (fp32) last, before the store or requantization: a consumer's smoothing divisor
        (:mod:`bevdeploy.quant.smooth`) applied by its producer, so the smoothed tensor stays int8.
        HAS_RES_MUL: the residual is also multiplied by rm[n] (fp32): a smoothed tensor read back as an identity
        (its producer divided it; this undoes that per channel)."""
        m_mask = offs_m < M
        n_mask = offs_n < N
        if HAS_XZP:
            acc = acc - x_zp * tl.load(wsum_ptr + offs_n, mask=n_mask, other=0)[None, :]
        ws = tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)
        out = acc.to(tl.float32) * (ws * x_scale)[None, :]
        if HAS_BIAS:
            out = out + tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
        rows = offs_m.to(tl.int64)
        if HAS_RESIDUAL:
            if RES_PRELOADED:
                r = res_tile
            else:
                r = load_residual_tile(r_ptr, offs_m, offs_n, M, N, stride_rm, stride_rn)
            r = (r.to(tl.float32) - res_zp) * res_scale
            if HAS_RES_MUL:
                r = r * tl.load(rm_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
        if HAS_RESIDUAL and not RES_AFTER_ACT:
            out = out + r
        if ACTIVATION == 1:
            out = tl.maximum(out, 0.0)
        elif ACTIVATION == 2:
            out = out * tl.sigmoid(out)
        if HAS_RESIDUAL and RES_AFTER_ACT:
            out = out + r
        if HAS_OUT_MUL:
            out = out * tl.load(om_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
        y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
        if OUT_INT8:
            v = out * inv_out_scale
            # NaN -> code 0 (as PTX's saturating cvt): max/min on NaN pick either operand by backend
            v = tl.where(v != v, 0.0, v)
            v = tl.minimum(tl.maximum(v, out_lo), out_hi)
            v = (v + 12582912.0) - 12582912.0 + out_zp
            tl.store(y_ptrs, v.to(tl.int8), mask=mask)
        else:
            tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask)
