// bf16 GEMV for decode steps of R = 1..8 rows: y[q, n] = sum_k x[q, k] * W[n, k] (an nn.Linear weight [N, K],
// row-major, no bias; x [R, K] and y [R, N] contiguous), fp32 accumulation, y rounded to bf16 once. Compiled at run
// time with NVRTC (model_server/gemv_bf16.py owns the launch and the choice; model_server/int4_mma_build.py the
// compile and the cache); no headers.
//
// Each warp owns RPW consecutive rows; lane l reads the row's 16-byte chunks l, l + 32, l + 64, ... (coalesced: a warp
// reads 512 contiguous bytes per row and step), U chunks per row in flight before any is used, the weights with a
// streaming load that skips L1 (each byte is read once), x through the read-only path (every warp reads all of it).
// Two accumulator chains per row; a warp shuffle sums the lanes. Needs K % 8 == 0 and 16-byte aligned x and W.
// With R > 1 rows of x each weight chunk is read once and used R times (a lane holds each x row's chunk too), so a
// step of R rows reads the weights once. A row's chunk j (c = lane + 32 j) adds into chain j & 1 in every
// configuration with U even, in the same order whatever R and RPW: those give the same bits for a row of x.

typedef unsigned int u32;
typedef unsigned short u16;

__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ uint4 ld_ro(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ float lo(u32 v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float hi(u32 v) { return __uint_as_float(v & 0xFFFF0000u); }

__device__ __forceinline__ float dot8(const uint4& w, const uint4& x, float acc) {
    acc = fmaf(lo(w.x), lo(x.x), acc);
    acc = fmaf(hi(w.x), hi(x.x), acc);
    acc = fmaf(lo(w.y), lo(x.y), acc);
    acc = fmaf(hi(w.y), hi(x.y), acc);
    acc = fmaf(lo(w.z), lo(x.z), acc);
    acc = fmaf(hi(w.z), hi(x.z), acc);
    acc = fmaf(lo(w.w), lo(x.w), acc);
    acc = fmaf(hi(w.w), hi(x.w), acc);
    return acc;
}

__device__ __forceinline__ u16 to_bf16(float f) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// RPW: rows per warp; WARPS per CTA; U: 16-byte chunks per row and lane in flight; R: rows of x (1: the one-row
// kernel as measured on 2026-12-06, the same instructions).
template <int RPW, int WARPS, int U, int R = 1>
__global__ void __launch_bounds__(WARPS * 32)
gemv_bf16(const uint4* __restrict__ X, const uint4* __restrict__ W, u16* __restrict__ Y, int N, int K) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int row0 = (blockIdx.x * WARPS + warp) * RPW;
    if (row0 >= N) return;
    const int kc = K >> 3;                          // 16-byte chunks per row
    const uint4* wr[RPW];
#pragma unroll
    for (int r = 0; r < RPW; ++r) wr[r] = W + (size_t)min(row0 + r, N - 1) * kc;   // past N: a real row, not written
    float acc[RPW][R][2];
#pragma unroll
    for (int r = 0; r < RPW; ++r)
#pragma unroll
        for (int q = 0; q < R; ++q) acc[r][q][0] = acc[r][q][1] = 0.f;
    for (int c0 = lane; c0 < kc; c0 += 32 * U) {
        uint4 w[RPW][U], x[R][U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + 32 * u;
            const bool ok = c < kc;
#pragma unroll
            for (int q = 0; q < R; ++q) x[q][u] = ok ? ld_ro(X + q * kc + c) : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
            for (int r = 0; r < RPW; ++r) w[r][u] = ok ? ld_stream(wr[r] + c) : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int r = 0; r < RPW; ++r)
#pragma unroll
                for (int q = 0; q < R; ++q) acc[r][q][u & 1] = dot8(w[r][u], x[q][u], acc[r][q][u & 1]);
    }
#pragma unroll
    for (int r = 0; r < RPW; ++r)
#pragma unroll
        for (int q = 0; q < R; ++q) {
            float s = acc[r][q][0] + acc[r][q][1];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xFFFFFFFFu, s, o);
            if (lane == 0 && row0 + r < N) Y[(size_t)q * N + row0 + r] = to_bf16(s);
        }
}
