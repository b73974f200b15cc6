// W4A16 for decode-sized steps (1-64 rows): 4-bit weights dequantized in registers, bf16 tensor-core MMAs.
// Compiled at run time with NVRTC (model_server/int4_mma.py owns the layout, the launch and the cache); no headers.
//
// y[m, n] = sum_k x[m, k] * ((q[n, k] - 8) * scale[k / G, n] + zero[k / G, n])
//
// The product runs "swapped": the weight is the MMA's A operand (16 output rows), the activations the B operand
// (8 tokens), so a step of 1-64 tokens fills the 16-row side with weight rows, not with padding.
// mma.m16n8k16 bf16: lane = 4 * g + c. A regs: {a0,a1} row g, {a2,a3} row g+8 (logical cols 2c, 2c+1),
// {a4,a5} row g, {a6,a7} row g+8 (cols 2c+8, 2c+9); B regs: {b0,b1} k 2c, 2c+1, {b2,b3} k 2c+8, 2c+9, token g;
// C: {c0,c1} row g, tokens 2c, 2c+1; {c2,c3} row g+8.
// K order: the logical columns of k16 step j (0..3) of a 64-wide block, for lane c, are the physical columns
// 16c + 4j + {0,1} (first pair) and 16c + 4j + {2,3} (second pair). Any permutation of k applied to both operands
// leaves the sum unchanged; this one makes each lane's activations 16 contiguous bf16 per block and token (two
// 16-byte shared loads), and its weights one 16-byte global load per block and 16-row tile.
//
// Weight layout (int4_mma.pack): u32 [N/16, K/64, 32 lanes, 4 steps j]; nibble i of the word holds:
//   0: q[g][p0]  4: q[g][p0+1]  1: q[g+8][p0]  5: q[g+8][p0+1]  2: q[g][p0+2]  6: q[g][p0+3]  3: q[g+8][p0+2]
//   7: q[g+8][p0+3]   with p0 = 64 * block + 16c + 4j, rows relative to the tile's first row.
// So (word >> 4i) & 0x000F000F, or'ed with bf16 128.0 (0x4300) in both halves, is the bf16 pair (128 + q, 128 + q')
// of A register i: exact, no int -> float conversion.
// Scales: u32 pairs [N/16, K/G, 8 (g)]: x = scale[row g] | scale[row g+8] << 16, y = the same for zero (bf16 bits).
// Dequantized: w = (v - 136) * scale + zero in bf16x2 FMAs: v - 136 = q - 8 is exact, the second FMA rounds once.
//
// Split K (gridDim.y = S > 1): every CTA writes fp32 partial sums to part[S, M, N]; the last CTA of a column
// (a ticket counted in tickets[blockIdx.x], reset by that CTA) adds the S partials in split order (deterministic)
// and writes y. The tickets must be zero before the first launch; the buffers belong to one stream at a time.
//
// GLU (a merged [gate; up] projection of N = 2 I rows, I a multiple of 16): each warp's R tiles are R / 2 gate tiles
// and the up tiles I rows below them, so every lane holds gate and up of the same outputs and tokens, and y [M, I]
// = silu(gate) * up is stored instead of both products, rounded where the separate ops round (each product to bf16,
// silu in fp32 to bf16, the product to bf16); with split K the column's last CTA does the same on the summed
// partials (model_server/int4_mma_glu.py).

typedef unsigned int u32;
typedef unsigned short u16;

#define BF2_ONE 0x3F803F80u
#define BF2_M136 0xC308C308u
#define BF2_MAGIC 0x43004300u

__device__ __forceinline__ u32 bf2_fma(u32 a, u32 b, u32 c) {
    u32 d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

__device__ __forceinline__ u32 dq(u32 q, int shift, u32 s2, u32 z2) {
    u32 v = ((q >> shift) & 0x000F000Fu) | BF2_MAGIC;
    return bf2_fma(bf2_fma(v, BF2_ONE, BF2_M136), s2, z2);
}

__device__ __forceinline__ void mma16816(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)), "l"(src), "r"(bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

__device__ __forceinline__ u32 prmt(u32 a, u32 sel) {
    u32 d;
    asm("prmt.b32 %0, %1, 0, %2;" : "=r"(d) : "r"(a), "r"(sel));
    return d;
}

__device__ __forceinline__ void st_cg(float* p, float v) { asm volatile("st.global.cg.f32 [%0], %1;" ::"l"(p), "f"(v)); }


__device__ __forceinline__ float4 ld_cg4(const float* p) {
    float4 v;
    asm volatile("ld.global.cg.v4.f32 {%0,%1,%2,%3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ void st_bf16x4(u16* p, float4 v) {
    u32 lo, hi;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(lo) : "f"(v.y), "f"(v.x));    // first operand -> upper half
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(hi) : "f"(v.w), "f"(v.z));
    asm volatile("st.global.v2.u32 [%0], {%1,%2};" ::"l"(p), "r"(lo), "r"(hi));
}

__device__ __forceinline__ u16 to_bf16(float f) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float bf16_round(float f) { return __uint_as_float(((u32)to_bf16(f)) << 16); }

// silu(gate) * up as the separate ops compute it from bf16 products: silu(g) = g * sigmoid(g) in fp32, rounded to
// bf16, times up, rounded to bf16 (returned as the float of that bf16)
__device__ __forceinline__ float glu(float gate, float up) {
    const float g = bf16_round(gate);
    return bf16_round(bf16_round(g * (1.f / (1.f + expf(-g)))) * bf16_round(up));
}

// One k16 step of one 16-row tile: the lane's weight word q (rows g and g + 8) dequantized with its row pair's scale and
// zero (``sz``: scales x, zeros y; bf16 of row g low, row g + 8 high) and multiplied into every token tile's sums;
// b0/b1: the token tiles' B registers of that step.
template <int NT>
__device__ __forceinline__ void tile_step(float (&acc)[NT][4], u32 q, uint2 sz, const u32 (&b0)[NT],
                                          const u32 (&b1)[NT]) {
    const u32 s_lo = prmt(sz.x, 0x1010), s_hi = prmt(sz.x, 0x3232);
    const u32 z_lo = prmt(sz.y, 0x1010), z_hi = prmt(sz.y, 0x3232);
    const u32 a0 = dq(q, 0, s_lo, z_lo), a1 = dq(q, 4, s_hi, z_hi);
    const u32 a2 = dq(q, 8, s_lo, z_lo), a3 = dq(q, 12, s_hi, z_hi);
#pragma unroll
    for (int t = 0; t < NT; ++t) mma16816(acc[t], a0, a1, a2, a3, b0[t], b1[t]);
}

__device__ __forceinline__ u32 word(const uint4& w, int j) { return j == 0 ? w.x : j == 1 ? w.y : j == 2 ? w.z : w.w; }

// NT: 8-token tiles (M <= 8 * NT); R: 16-row tiles per warp; WARPS per CTA (same K range, different rows);
// STAGES: blocks of 64 k in flight (activations, weights and scales through cp.async into shared memory).
// FLAT and KW: FLAT = 1 is served for every shape, KW where the measured table (int4_mma_tuned.json) picks it;
// FLAT = 0, KW = 1 compile to the kernel measured before them (int4_mma.rule_config, the A/B baseline).
// FLAT: each thread's activation copies are one unrolled run with their addresses and predicates computed once per
// kernel (FLAT = 0: a loop over threadIdx.x, which the compiler cannot unroll, re-derives them every block).
// KW: warps along K inside the CTA: WARPS = RW * KW; the KW warps of a row group share its 16-row tiles and take
// the block's four k16 steps between them (KW = 2: a 32-column half each, KW = 4: one step each); at the end
// warps 1..KW-1 of a group hand their sums to warp 0 through shared memory (in order: deterministic). More warps
// per tile without split K's global partial sums. KW > 1 copies activations as FLAT does.
// GLU: the epilogue above (R even: R / 2 gate tiles, then their up tiles).
template <int NT, int R, int WARPS, int STAGES, int FLAT = 0, int KW = 1, int GLU = 0>
__global__ void __launch_bounds__(WARPS * 32)
w4a16_mma(const u16* __restrict__ X, const uint4* __restrict__ Wp, const uint2* __restrict__ SZ, u16* __restrict__ Y,
          float* __restrict__ part, int* __restrict__ tickets, int M, int N, int K, int gshift, int kb_per_split) {
    static_assert((KW == 1 || KW == 2 || KW == 4) && WARPS % KW == 0, "KW: 1, 2 or 4 warps along K");
    static_assert(GLU == 0 || R % 2 == 0, "GLU: each gate tile pairs with its up tile");
    constexpr int RT = GLU ? R / 2 : R;            // output tiles per warp (GLU: gate tiles; their up tiles follow)
    constexpr int RW = WARPS / KW;                 // row groups (warps with their own tiles)
    constexpr bool FLATX = FLAT != 0 || KW > 1;
    constexpr int MP = NT * 8;
    constexpr int XROW = 72;                       // 64 bf16 + 8 of padding: conflict-free 16-byte shared loads
    constexpr int THREADS = WARPS * 32;
    constexpr int XB = MP * XROW * 2, WB = RW * R * 512, STAGE = XB + WB + RW * R * 64;
    // one stage: activations [MP][XROW] bf16, weights [RW * R][32 lanes] uint4, scales [RW * R][8] uint2;
    // everything arrives through cp.async, so one wait per block covers all three
    extern __shared__ uint4 smem_raw[];
    char* smem = reinterpret_cast<char*>(smem_raw);
    __shared__ int is_last;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int rw = KW == 1 ? warp : warp % RW, kw = KW == 1 ? 0 : warp / RW;
    const int g = lane >> 2, c = lane & 3;
    const int KB = K >> 6, KG = KB >> gshift, ntiles = N >> 4;
    const int tile0 = (blockIdx.x * RW + rw) * RT;
    const int otiles = GLU ? ntiles >> 1 : ntiles;     // output tiles (GLU: gate tiles)
    const int S = gridDim.y, split = blockIdx.y;
    const int kb0 = split * kb_per_split, nkb = kb_per_split;

    constexpr int XCH = MP * 8, XPER = (XCH + THREADS - 1) / THREADS;   // 16-byte activation copies per block
    const u16* xsrc[FLATX ? XPER : 1];             // FLAT: this thread's copies, set once (block 0's columns)
    int xdst[FLATX ? XPER : 1], xbytes[FLATX ? XPER : 1];
    if constexpr (FLATX) {
#pragma unroll
        for (int it = 0; it < XPER; ++it) {
            const int idx = threadIdx.x + it * THREADS, row = idx >> 3, ch = idx & 7;
            const bool ok = row < M && idx < XCH;
            xsrc[it] = X + (size_t)(ok ? row : 0) * K + ch * 8;
            xdst[it] = row * XROW + ch * 8;
            xbytes[it] = ok ? 16 : 0;
        }
    }

    float acc[R][NT][4];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[r][t][e] = 0.f;

#define W4_X(ST) reinterpret_cast<u16*>(smem + (ST) * STAGE)
#define W4_W(ST) reinterpret_cast<uint4*>(smem + (ST) * STAGE + XB)
#define W4_S(ST) reinterpret_cast<uint2*>(smem + (ST) * STAGE + XB + WB)
#define W4_ISSUE(I, ST)                                                                                      \
    {                                                                                                        \
        const int i_ = (I);                                                                                  \
        if (i_ < nkb) {                                                                                      \
            const int kb = kb0 + i_;                                                                         \
            u16* xs_ = W4_X(ST);                                                                             \
            if constexpr (FLATX) {                                                                           \
                _Pragma("unroll") for (int it = 0; it < XPER; ++it) {                                        \
                    if (XCH % THREADS == 0 || threadIdx.x + it * THREADS < XCH)                              \
                        cp_async16(xs_ + xdst[it], xsrc[it] + kb * 64, xbytes[it]);                          \
                }                                                                                            \
            } else {                                                                                         \
                for (int idx = threadIdx.x; idx < MP * 8; idx += THREADS) {                                  \
                    const int row = idx >> 3, ch = idx & 7;                                                  \
                    const bool ok = row < M;                                                                 \
                    cp_async16(xs_ + row * XROW + ch * 8, X + (size_t)(ok ? row : 0) * K + kb * 64 + ch * 8, \
                               ok ? 16 : 0);                                                                 \
                }                                                                                            \
            }                                                                                                \
            _Pragma("unroll") for (int r = 0; r < R; ++r) {                                                  \
                const int t = GLU && r >= RT ? tile0 + r - RT + (ntiles >> 1) : tile0 + r;                  \
                const int slot = rw * R + r;                                                                 \
                if (tile0 + r % RT < otiles && (KW == 1 || kw == 0)) {                                       \
                    cp_async16(W4_W(ST) + slot * 32 + lane, Wp + ((size_t)t * KB + kb) * 32 + lane, 16);     \
                    if (lane < 4)                                                                            \
                        cp_async16(W4_S(ST) + slot * 8 + lane * 2,                                           \
                                   SZ + ((size_t)t * KG + (kb >> gshift)) * 8 + lane * 2, 16);               \
                }                                                                                            \
            }                                                                                                \
        }                                                                                                    \
        cp_async_commit();                                                                                   \
    }

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) W4_ISSUE(s, s)

    for (int i0 = 0; i0 < nkb; i0 += STAGES) {
#pragma unroll
        for (int s = 0; s < STAGES; ++s) {
            const int i = i0 + s;
            cp_async_wait<STAGES - 2>();
            __syncthreads();
            W4_ISSUE(i + STAGES - 1, (s + STAGES - 1) % STAGES)
            if (i < nkb && KW == 4) {
                // this warp's k16 step j = kw: each lane's activation columns c * 16 + 4 * kw .. + 3 per token row,
                // its weights word kw of the lane's 16 bytes
                const u16* xb = W4_X(s);
                u32 b0[NT], b1[NT];
#pragma unroll
                for (int t = 0; t < NT; ++t) {
                    const uint2 b = *reinterpret_cast<const uint2*>(xb + (t * 8 + g) * XROW + c * 16 + kw * 4);
                    b0[t] = b.x;
                    b1[t] = b.y;
                }
#pragma unroll
                for (int r = 0; r < R; ++r)
                    tile_step<NT>(acc[r], reinterpret_cast<const u32*>(W4_W(s))[((rw * R + r) * 32 + lane) * 4 + kw],
                                  W4_S(s)[(rw * R + r) * 8 + g], b0, b1);
            } else if (i < nkb) {
                const u16* xb = W4_X(s);
#pragma unroll
                for (int jq = 0; jq < 2 / KW; ++jq) {      // KW = 1: both 32-column halves; KW = 2: half kw
                    const int jp = KW == 1 ? jq : kw;
                    uint4 b[NT];
#pragma unroll
                    for (int t = 0; t < NT; ++t)
                        b[t] = *reinterpret_cast<const uint4*>(xb + (t * 8 + g) * XROW + c * 16 + jp * 8);
                    u32 b0[2][NT], b1[2][NT];                     // [jj][t]: the B registers of steps 2 jp + jj
#pragma unroll
                    for (int t = 0; t < NT; ++t) {
                        b0[0][t] = b[t].x;
                        b1[0][t] = b[t].y;
                        b0[1][t] = b[t].z;
                        b1[1][t] = b[t].w;
                    }
#pragma unroll
                    for (int r = 0; r < R; ++r) {
                        const uint4 wv = W4_W(s)[(rw * R + r) * 32 + lane];
                        const uint2 szv = W4_S(s)[(rw * R + r) * 8 + g];
#pragma unroll
                        for (int jj = 0; jj < 2; ++jj) tile_step<NT>(acc[r], word(wv, jp * 2 + jj), szv, b0[jj], b1[jj]);
                    }
                }
            }
        }
    }
#undef W4_ISSUE
#undef W4_X
#undef W4_W
#undef W4_S
    cp_async_wait<0>();
    if constexpr (KW > 1) {
        // warps 1..KW-1 of each row group hand their sums to its warp 0 through the (now idle) ring: [KW - 1][RW][R]
        // [NT][32 lanes] float4, added in warp order
        __syncthreads();
        float4* red = reinterpret_cast<float4*>(smem);
        if (kw > 0) {
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
                for (int t = 0; t < NT; ++t)
                    red[((((kw - 1) * RW + rw) * R + r) * NT + t) * 32 + lane] =
                        make_float4(acc[r][t][0], acc[r][t][1], acc[r][t][2], acc[r][t][3]);
        }
        __syncthreads();
        if (kw == 0) {
#pragma unroll
            for (int k2 = 0; k2 < KW - 1; ++k2)
#pragma unroll
                for (int r = 0; r < R; ++r)
#pragma unroll
                    for (int t = 0; t < NT; ++t) {
                        const float4 v = red[(((k2 * RW + rw) * R + r) * NT + t) * 32 + lane];
                        acc[r][t][0] += v.x;
                        acc[r][t][1] += v.y;
                        acc[r][t][2] += v.z;
                        acc[r][t][3] += v.w;
                    }
        }
    }

    if (S == 1) {
        if (KW > 1 && kw != 0) return;
        if constexpr (GLU != 0) {
            const int NO = N >> 1;
#pragma unroll
            for (int r = 0; r < RT; ++r) {
                const int t16 = tile0 + r;
                if (t16 >= otiles) continue;
                const int n = t16 * 16 + g;
#pragma unroll
                for (int t = 0; t < NT; ++t) {
                    const int m = t * 8 + 2 * c;
                    if (m < M) {
                        Y[(size_t)m * NO + n] = to_bf16(glu(acc[r][t][0], acc[r + RT][t][0]));
                        Y[(size_t)m * NO + n + 8] = to_bf16(glu(acc[r][t][2], acc[r + RT][t][2]));
                    }
                    if (m + 1 < M) {
                        Y[(size_t)(m + 1) * NO + n] = to_bf16(glu(acc[r][t][1], acc[r + RT][t][1]));
                        Y[(size_t)(m + 1) * NO + n + 8] = to_bf16(glu(acc[r][t][3], acc[r + RT][t][3]));
                    }
                }
            }
            return;
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int t16 = tile0 + r;
            if (t16 >= ntiles) continue;
            const int n = t16 * 16 + g;
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                const int m = t * 8 + 2 * c;
                if (m < M) {
                    Y[(size_t)m * N + n] = to_bf16(acc[r][t][0]);
                    Y[(size_t)m * N + n + 8] = to_bf16(acc[r][t][2]);
                }
                if (m + 1 < M) {
                    Y[(size_t)(m + 1) * N + n] = to_bf16(acc[r][t][1]);
                    Y[(size_t)(m + 1) * N + n + 8] = to_bf16(acc[r][t][3]);
                }
            }
        }
        return;
    }
    float* mine = part + (size_t)split * M * N;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int t16 = GLU && r >= RT ? tile0 + r - RT + (ntiles >> 1) : tile0 + r;
        if (tile0 + r % RT >= otiles || (KW > 1 && kw != 0)) continue;
        const int n = t16 * 16 + g;
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            const int m = t * 8 + 2 * c;
            if (m < M) {
                st_cg(mine + (size_t)m * N + n, acc[r][t][0]);
                st_cg(mine + (size_t)m * N + n + 8, acc[r][t][2]);
            }
            if (m + 1 < M) {
                st_cg(mine + (size_t)(m + 1) * N + n, acc[r][t][1]);
                st_cg(mine + (size_t)(m + 1) * N + n + 8, acc[r][t][3]);
            }
        }
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) is_last = atomicAdd(tickets + blockIdx.x, 1) == S - 1;
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    // the column's rows [n0, n0 + nrows) x tokens [0, M), four columns per thread at a time (coalesced 16-byte
    // loads of every split's partial sums, one 8-byte store of four bf16); GLU: its outputs, from the gate rows
    // n and the up rows n + N / 2
    if constexpr (GLU != 0) {
        const int NO = N >> 1, n0 = blockIdx.x * RW * RT * 16, quads = min(RW * RT * 16, NO - n0) >> 2;
        for (int e = threadIdx.x; e < M * quads; e += THREADS) {
            const int m = e / quads, n = n0 + (e - m * quads) * 4;
            float4 a = make_float4(0.f, 0.f, 0.f, 0.f), b = a;
#pragma unroll 4
            for (int sp = 0; sp < S; ++sp) {
                const float4 p = ld_cg4(part + ((size_t)sp * M + m) * N + n);
                const float4 q = ld_cg4(part + ((size_t)sp * M + m) * N + n + NO);
                a.x += p.x;
                a.y += p.y;
                a.z += p.z;
                a.w += p.w;
                b.x += q.x;
                b.y += q.y;
                b.z += q.z;
                b.w += q.w;
            }
            st_bf16x4(Y + (size_t)m * NO + n, make_float4(glu(a.x, b.x), glu(a.y, b.y), glu(a.z, b.z), glu(a.w, b.w)));
        }
        if (threadIdx.x == 0) tickets[blockIdx.x] = 0;
        return;
    }
    const int n0 = blockIdx.x * RW * R * 16, nrows = min(RW * R * 16, N - n0), quads = nrows >> 2;
    for (int e = threadIdx.x; e < M * quads; e += THREADS) {
        const int m = e / quads, n = n0 + (e - m * quads) * 4;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 4
        for (int sp = 0; sp < S; ++sp) {
            const float4 p = ld_cg4(part + ((size_t)sp * M + m) * N + n);
            v.x += p.x;
            v.y += p.y;
            v.z += p.z;
            v.w += p.w;
        }
        st_bf16x4(Y + (size_t)m * N + n, v);
    }
    if (threadIdx.x == 0) tickets[blockIdx.x] = 0;
}
