"""Triton helpers shared by the int8 and fp8 GEMM / conv kernels: the grouped tile order and the K loop of
one GEMM tile with both operands K-major (what Hopper's 8-bit wgmma wants).

Like :mod:`bevdeploy.quant.int8_epilogue` it imports nothing from bevdeploy, so every kernel module can use it.
"""

try:
    import triton
    import triton.language as tl
except ImportError:  # the references run without Triton
    triton = None

if triton is not None:

    @triton.jit
    def tile_coords(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """(row tile, column tile) of tile number ``pid`` in grouped order: GROUP_M row-tiles sweep the N
        tiles together, so a weight tile is read from L2 by GROUP_M neighbours in a row (Triton tutorial 03)."""
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m
        return pid_m, pid_n

    @triton.jit
    def program_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """:func:`tile_coords` of this program (one tile per program)."""
        return tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    @triton.jit
    def conv_tile_pixels(M, O, Ho, Wo, stride_h, stride_w, pad_h, pad_w, stride_xb, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """This program's implicit-GEMM conv tile: its rows (output pixels, NHWC order) and columns (output
        channels), wrapped (``% M``, ``% O``) so loads need no M/N masks, and each row's input corner
        (``hi0``, ``wi0``: top-left input position of the kernel window) and image offset (``img``, int64).
        Returns offs_m, offs_n, rn (int64 wrapped columns), hi0, wi0, img."""
        pid_m, pid_n = program_tile(M, O, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = offs_m % M
        rn = (offs_n % O).to(tl.int64)
        wo = rm % Wo
        t = rm // Wo
        ho = t % Ho
        b = t // Ho
        return offs_m, offs_n, rn, ho * stride_h - pad_h, wo * stride_w - pad_w, b.to(tl.int64) * stride_xb

    @triton.jit
    def gemm_tile(x_ptr, w_ptr, offs_m, offs_n, M, N, K, stride_xm, stride_wn, EVEN_K: tl.constexpr,
                  ACC_INT32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """acc[m, n] = sum_k x[m, k] * w[n, k] of one tile: tl.dot of [BM, BK] x trans([BN, BK]), int32 (int8
        operands, ACC_INT32) or fp32 (fp8). Rows and columns wrap (``% M``, ``% N``), so the loads need no M/N
        masks; the epilogue masks the store. EVEN_K: K % BLOCK_K == 0, no K masks."""
        offs_k = tl.arange(0, BLOCK_K)
        rm = (offs_m % M).to(tl.int64)
        rn = (offs_n % N).to(tl.int64)
        a_ptrs = x_ptr + rm[:, None] * stride_xm + offs_k[None, :]
        w_ptrs = w_ptr + rn[:, None] * stride_wn + offs_k[None, :]
        if ACC_INT32:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs)
                w = tl.load(w_ptrs)
            else:
                k_mask = offs_k[None, :] < K - k * BLOCK_K
                if ACC_INT32:
                    a = tl.load(a_ptrs, mask=k_mask, other=0)
                    w = tl.load(w_ptrs, mask=k_mask, other=0)
                else:
                    a = tl.load(a_ptrs, mask=k_mask, other=0.0)
                    w = tl.load(w_ptrs, mask=k_mask, other=0.0)
            if ACC_INT32:
                acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
            else:
                acc = tl.dot(a, tl.trans(w), acc)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        return acc
