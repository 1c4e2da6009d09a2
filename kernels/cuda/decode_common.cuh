// Shared pieces of the decode-attention kernels (DESIGN 4b: one skeleton, codecs as plug-ins).
// Included by every kernels/cuda/*_decode.cu; NVRTC gets it as a named header (kernels/cuda/__init__.py).
// Each codec file defines its Args struct (with the fields the skeleton reads: q, len, ring/new k/v and
// their strides, mask and strides, opart, lse, H, G, Tq, T, M, nsplit, qk_scale) before the skeleton parts.
#pragma once
typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned short u16;
typedef unsigned char u8;
typedef long long i64;
#define INFINITY __int_as_float(0x7f800000)

__device__ __forceinline__ float h2f(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ float b2f(u16 h) { return __uint_as_float(((u32)h) << 16); }
#if QDT == 0
__device__ __forceinline__ float q2f(u16 h) { return h2f(h); }
__device__ __forceinline__ u16 f2q(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
#else
__device__ __forceinline__ float q2f(u16 h) { return b2f(h); }
__device__ __forceinline__ u16 f2q(float f) { u16 h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
#endif
__device__ __forceinline__ u16 f2h(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r; asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo)); return r;
}
__device__ __forceinline__ u32 hfma2(u32 a, u32 b, u32 c) {
    u32 r; asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c)); return r;
}
__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 s) {
    u32 r; asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(s)); return r;
}
#ifndef FMAOFF
#define FMAOFF 0                // 1: shifts as integer multiplies (FMA pipe), off the ALU pipe that operand
                                // building (PRMT, LOP3) keeps busy
#endif
// x >> k and x << k as IMAD.HI / IMAD.SHL: the ALU pipe (PRMT, LOP3) is the split kernel's busiest
__device__ __forceinline__ u32 shr_(u32 x, int k) {
#if FMAOFF
    u32 r; asm("mul.hi.u32 %0, %1, %2;" : "=r"(r) : "r"(x), "r"(1u << (32 - k))); return r;
#else
    return x >> k;
#endif
}
__device__ __forceinline__ u32 shl_(u32 x, int k) {
#if FMAOFF
    u32 r; asm("mul.lo.u32 %0, %1, %2;" : "=r"(r) : "r"(x), "r"(1u << k)); return r;
#else
    return x << k;
#endif
}

// Programmatic dependent launch (sm_90+): a kernel launched with it (kernels/cuda launch(pdl=True))
// may be scheduled while the call's previous kernel still runs, so its independent prologue (cp.async of
// the cache, exact tokens, constants) overlaps that kernel; griddep_wait() must come before the first
// read of what the previous kernel writes (a no-op when launched without PDL). griddep_launch() lets the
// next kernel's CTAs be scheduled once every CTA of this grid has passed it.
// TL=1 (benchmarks/timeline.py): thread 0 of every CTA stamps %globaltimer at event k; qjl_tl[k] keeps
// the earliest stamp over CTAs, qjl_tl[16 + k] the latest. Compiled out otherwise.
#ifndef TL
#define TL 0
#endif
#if TL
__device__ unsigned long long qjl_tl[32];
__device__ __forceinline__ void tl_mark(int k) {
    if (threadIdx.x == 0) {
        unsigned long long t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t) :: "memory");
        atomicMin(&qjl_tl[k], t);
        atomicMax(&qjl_tl[16 + k], t);
    }
}
#define TLM(k) tl_mark(k)
#else
#define TLM(k)
#endif
__device__ __forceinline__ void griddep_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void griddep_launch() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// The Sylvester Hadamard transform of a D-vector held by one warp, D / 32 consecutive entries a lane
// (entry E lane + k in x[k]): in-lane butterflies for strides < E, shuffles for the others. y = H x,
// H_ij = (-1)^popcount(i & j), unnormalized (the randomized Hadamard rotation, rot.py hadamard_signs)
template <int D_>
__device__ __forceinline__ void fwht_warp(float (&x)[D_ / 32], int lane) {
    constexpr int E = D_ / 32;
#pragma unroll
    for (int st = 1; st < E; st <<= 1)
#pragma unroll
        for (int k = 0; k < E; ++k)
            if (!(k & st)) { const float u = x[k], v = x[k + st]; x[k] = u + v; x[k + st] = u - v; }
#pragma unroll
    for (int st = E; st < D_; st <<= 1) {
        const bool up = lane & (st / E);
#pragma unroll
        for (int k = 0; k < E; ++k) {
            const float v = __shfl_xor_sync(0xffffffffu, x[k], st / E);
            x[k] = up ? v - x[k] : x[k] + v;
        }
    }
}

// 2^x as one MUFU.EX2: exp2f adds a range fix-up around it (FSETP + 2 predicated FMULs, 3 of the split
// loop's ~920 instructions per score group of 10); results below 2^-126 flush to 0, which a softmax
// weight that small is anyway against the running max's 1
__device__ __forceinline__ float ex2(float x) { float y; asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x)); return y; }

__device__ __forceinline__ u32 movt(u32 x) {
    u32 y; asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x)); return y;
}
__device__ __forceinline__ void mma_us(int (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_uu(int (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.u8.u8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_h16(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_h8(float (&c)[4], u32 a0, u32 a1, u32 b0) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(b0));
}

// MK (mask kind, compile time): 0 none (CAUSAL: query i sees positions <= n - Tq + i), 1 bool per
// (row, pos), 2 additive fp32 per (row, pos), 3 bool per pos, 4 additive fp32 per pos (HF's decode
// mask (B, 1, 1, L)). Scores are in log2 units; -inf where row r must not see position pos.
#define LOG2E_F 1.4426950408889634f
template <class A>
__device__ __forceinline__ float masked(const A& a, float s, int b, int h, int r, int pos, int lim, int n) {
    if (pos >= lim || r >= a.M) return -INFINITY;
    const int qh = h * a.G + r / a.Tq, tq = r % a.Tq;
    if constexpr (MK == 0) { if (CAUSAL && pos > n - a.Tq + tq) return -INFINITY; return s; }
    else if constexpr (MK == 1) return ((const u8*)a.mask)[b * a.smb + qh * a.smh + tq * a.smt + (i64)pos * a.sml] ? s : -INFINITY;
    else if constexpr (MK == 2) return s + LOG2E_F * ((const float*)a.mask)[b * a.smb + qh * a.smh + tq * a.smt + (i64)pos * a.sml];
    else if constexpr (MK == 3) return ((const u8*)a.mask)[b * a.smb + (i64)pos * a.sml] ? s : -INFINITY;
    else return s + LOG2E_F * ((const float*)a.mask)[b * a.smb + (i64)pos * a.sml];
}

template <int N> struct VecT;
template <> struct VecT<2> { typedef u32 T; };
template <> struct VecT<4> { typedef uint2 T; };

template <int W>
__device__ __forceinline__ void load_words(u32 (&w)[W], const u8* p) {
    if constexpr (W == 1) { w[0] = *(const u32*)p; }
    else if constexpr (W == 2) { uint2 v = *(const uint2*)p; w[0] = v.x; w[1] = v.y; }
    else {
#pragma unroll
        for (int i = 0; i < W; i += 4) { uint4 v = *(const uint4*)(p + 4 * i); w[i] = v.x; w[i + 1] = v.y; w[i + 2] = v.z; w[i + 3] = v.w; }
    }
}


__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 r; asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p)); return r;
}
// cp.async to a 32-bit shared address (the split's streams keep those, no generic-to-shared conversion per copy)
__device__ __forceinline__ void cp16s(u32 s, const void* g) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(s), "l"(g));
}
__device__ __forceinline__ void cp8s(u32 s, const void* g) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" :: "r"(s), "l"(g));
}
__device__ __forceinline__ void cp16(void* s, const void* g) { cp16s(smem_addr(s), g); }
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> __device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory"); }

// One cp.async stream of the split's stage ring: every 32-token group's rows (ROWB bytes each,
// contiguous in global memory) go to byte OFF of a stage. The lane's source pointer moves one ring
// step (NW_ groups) per group, so a group's copies cost one 64-bit add and cp.asyncs with immediate
// offsets: recomputing every copy's addresses from the row was 85 of rot_split's ~680
// loop instructions a group, most of them on the ALU pipe that the operand lookups keep busy.
template <int ROWB, int OFF, int NW_>
struct CpStream {
    const u8* p;
    __device__ __forceinline__ CpStream(const void* base, i64 row, int lane)
        : p((const u8*)base + row * ROWB + 16 * lane) {}
    // st: the stage's shared address + 16 lane
    __device__ __forceinline__ void issue(u32 st, int lane) const {
        constexpr int BYTES = 32 * ROWB;
#pragma unroll
        for (int o = 0; o < BYTES; o += 512)
            if (BYTES - o >= 512 || 16 * lane < BYTES - o) cp16s(st + OFF + o, p + o);
    }
    __device__ __forceinline__ void step() { p += NW_ * 32 * ROWB; }
};

// each warp's first STAGES_ - 1 groups of [lo, hi) in flight through its ring (S: the codec's streams,
// positioned at the warp's first group; left at the group the loop prefetches first)
template <int STAGES_, int NW_, int ST_SIZE_, class S>
__device__ __forceinline__ void stream_prologue(S& s, u32 sb, int lo, int hi, int warp, int lane) {
#pragma unroll
    for (int s_ = 0; s_ < STAGES_ - 1; ++s_) {
        if (lo + warp * 32 + s_ * NW_ * 32 < hi) s.issue(sb + s_ * ST_SIZE_, lane);
        cp_commit();
        s.step();
    }
}

// ---------------------------------------------------------------------------------------------
// The decode skeleton's shared steps. Layout they assume (every codec's split kernel): a warp owns
// 32-token groups as two 16-token m16n8 tiles; score s[tile][e] is token g (e < 2) or g + 8 (e >= 2)
// of the tile for query row 2t + (e & 1); value accumulators acc[i][e] are channels (row g, g + 8 of
// M-tile i) x query rows (2t, 2t + 1), i.e. out^T = V^T P^T.
// ---------------------------------------------------------------------------------------------

// online softmax over a group's 32 scores (log2 units): updates the running max m_r / sum l_r of
// rows 2t + j (uniform over the 8 lanes of equal t; mu_r: m_r, or 0 while it is -inf), returns the
// probabilities in pr. Lazy: the max is reduced across the warp and acc rescaled only when some score
// exceeds the running max (a warp vote on the lanes' own maxima); after the first groups that is rare,
// and the common path skips the 6 shuffles, their 6 FMNMX and the rescale factors (exact either way:
// with no score above m_r, the new max is m_r)
template <int NT_>
__device__ __forceinline__ void softmax_step(const float (&s)[2][4], float (&m_r)[2], float (&mu_r)[2], float (&l_r)[2],
                                             float (&pr)[2][4], float (&acc)[NT_][4]) {
    float lm[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) lm[j] = fmaxf(fmaxf(s[0][j], s[0][j + 2]), fmaxf(s[1][j], s[1][j + 2]));
    if (__any_sync(0xffffffffu, lm[0] > m_r[0] || lm[1] > m_r[1])) {
        float alj[2];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            float mx = lm[j];
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
            const float mn = fmaxf(m_r[j], mx);
            const float mu = mn == -INFINITY ? 0.f : mn;
            alj[j] = ex2(m_r[j] - mu);              // 0 from -inf: acc and l are still 0 then
            m_r[j] = mn;
            mu_r[j] = mu;
            l_r[j] *= alj[j];
        }
#pragma unroll
        for (int i = 0; i < NT_; ++i) { acc[i][0] *= alj[0]; acc[i][2] *= alj[0]; acc[i][1] *= alj[1]; acc[i][3] *= alj[1]; }
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        float sum = 0.f;
#pragma unroll
        for (int tt = 0; tt < 2; ++tt) {
            pr[tt][j] = ex2(s[tt][j] - mu_r[j]);
            pr[tt][j + 2] = ex2(s[tt][j + 2] - mu_r[j]);
            sum += pr[tt][j] + pr[tt][j + 2];
        }
        l_r[j] += sum;
    }
}

// a warp's (m, l, unnormalized acc) into shared memory for the CTA merge; channel of acc[i] row g
// is CPL_ * g + 2 i (+1 for row g + 8), the codecs lay their value fragments out that way
template <int NT_, int CPL_, int D_, int NW_>
__device__ __forceinline__ void store_warp(float (*wo)[8][D_], float (*wm)[8], float (*wl)[8], int warp, int g, int t,
                                           const float (&m_r)[2], float (&l_r)[2], const float (&acc)[NT_][4]) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        l_r[j] += __shfl_xor_sync(0xffffffffu, l_r[j], 4);
        l_r[j] += __shfl_xor_sync(0xffffffffu, l_r[j], 8);
        l_r[j] += __shfl_xor_sync(0xffffffffu, l_r[j], 16);
    }
#pragma unroll
    for (int i = 0; i < NT_; ++i) {
        const int ch = CPL_ * g + 2 * i;
        wo[warp][2 * t][ch] = acc[i][0];
        wo[warp][2 * t + 1][ch] = acc[i][1];
        wo[warp][2 * t][ch + 1] = acc[i][2];
        wo[warp][2 * t + 1][ch + 1] = acc[i][3];
    }
    if (g == 0) {
        wm[warp][2 * t] = m_r[0]; wm[warp][2 * t + 1] = m_r[1];
        wl[warp][2 * t] = l_r[0]; wl[warp][2 * t + 1] = l_r[1];
    }
}

// merge the CTA's warps: one normalized partial (8 rows x D) and its log-sum-exp (base 2)
template <int D_, int NW_>
__device__ __forceinline__ void merge_warps(float* op, float* ls, float (*wo)[8][D_], float (*wm)[8], float (*wl)[8]) {
    for (int i = threadIdx.x; i < 8 * D_; i += NW_ * 32) {
        const int r = i / D_, d = i % D_;
        float mx = -INFINITY;
#pragma unroll
        for (int w = 0; w < NW_; ++w) mx = fmaxf(mx, wm[w][r]);
        const float mu = mx == -INFINITY ? 0.f : mx;
        float l = 0.f, o = 0.f;
#pragma unroll
        for (int w = 0; w < NW_; ++w) {
            const float f = exp2f(wm[w][r] - mu);
            l += wl[w][r] * f;
            o += wo[w][r][d] * f;
        }
        op[r * D_ + d] = l > 0.f ? o / l : 0.f;
        if (d == 0) ls[r] = l > 0.f ? mu + log2f(l) : -INFINITY;
    }
}

// Per (b, kv head, query row): attention over the exact tokens [cl, n) (residual ring below n - T,
// this step's tokens from n - T), merged with the nsplit partials of the compressed tokens.
// Grid (B * H, M), D threads; out (B, Hq, Tq, D) in q's dtype. Latency-bound (a few CTAs): every
// independent load is issued up front -- the first CH_E value rows by cp.async, the split partials
// into registers -- so the exact-score, value and partial round trips overlap.
#define EMAX 1024
#ifndef NSINK
#define NSINK 0                 // exact sink tokens (a.ksink / a.vsink, (B * H, NSINK, D) fp16), codecs that have them
#endif
#ifndef KST
#define KST 0                   // 1: the combine stages its first CH_E exact keys by cp.async (stage_keys)
#endif
#ifndef HAD
#define HAD 0                   // 1 (rotation codec): Pi is a randomized Hadamard transform, pi holds its signs / sqrt(D)
#endif
#define CH_E 136                // exact tokens staged at a time (a ring of 128 + 8 new tokens in one)
#define PREG 32                 // split partials held in registers (more: read in a loop at the end)
template <class A>
__device__ __forceinline__ void stage_values(const A& a, u16 (*vs)[D], int j0, int cnt, int e0, int n_old,
                                             int c1, int b, int h, int d) {
    for (int i = d; i < cnt * (D / 8); i += D) {          // 16-byte pieces of cnt value rows
        const int jj = i / (D / 8), cc = (i % (D / 8)) * 8, pos = e0 + j0 + jj;
        const u16* vp = pos < n_old ? a.rv + b * a.srb + h * a.srh + (i64)(pos - c1) * a.srt
                                    : a.vn + b * a.snb + h * a.snh + (i64)(pos - n_old) * a.snt;
        cp16(&vs[jj][cc], vp + cc);
    }
    cp_commit();
}
// KST: the first CH_E exact keys into dynamic shared memory (after pi's D * D * 4 bytes, ROT without HAD),
// every row's copies in flight at once: the scores then read shared memory instead of one global round
// trip per 4 tokens a warp
template <class A>
__device__ __forceinline__ void stage_keys(const A& a, u16 (*ks)[D], int cnt, int e0, int n_old, int c1,
                                           int b, int h, int d) {
    for (int i = d; i < cnt * (D / 8); i += D) {
        const int jj = i / (D / 8), cc = (i % (D / 8)) * 8, pos = e0 + jj;
        const u16* kp = pos < n_old ? a.rk + b * a.srb + h * a.srh + (i64)(pos - c1) * a.srt
                                    : a.kn + b * a.snb + h * a.snh + (i64)(pos - n_old) * a.snt;
        cp16(&ks[jj][cc], kp + cc);
    }
    cp_commit();
}
// ROT: the partials are in a rotated basis (rotation codec): their merged sum is rotated back by pi
// (D x D fp32, out_d = sum_e acc_e pi[e][d]) before the exact part is added; pi is copied to dynamic
// shared memory (D * D * 4 bytes, the launcher's) at the start, so its L2 round trips overlap the rest.
// Launched with PDL after the split: the exact part (scores, softmax against its own max, values)
// runs while the split does and needs nothing of it; griddep_wait() comes before the partials.
__device__ __forceinline__ float block_max(float v, float* red, int d) {
#pragma unroll
    for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    if ((d & 31) == 0) red[d >> 5] = v;
    __syncthreads();
    v = red[0];
#pragma unroll
    for (int w = 1; w < D / 32; ++w) v = fmaxf(v, red[w]);
    return v;
}
template <class A, bool ROT>
__device__ __forceinline__ void combine_body(const A& a, u16* out, i64 sob, i64 soh, i64 sot, const float* pi) {
    const int bh = blockIdx.x, r = blockIdx.y, b = bh / a.H, h = bh % a.H, d = threadIdx.x;
    const int n = (int)a.len[0];
    const int c1 = n / RR * RR;
    const int cl = min(c1, n - a.T);
    const int e0 = max(cl, 0), ne = n - e0, n_old = n - a.T;
    const int qh = h * a.G + r / a.Tq, tq = r % a.Tq;
    const int nsk = NSINK ? min(NSINK, max(cl, 0)) : 0;
    TLM(7);
    __shared__ float qrow[D];
    __shared__ float ps[EMAX];
    __shared__ float wsp[EMAX];
    __shared__ float red[2][D / 32];
    __shared__ __align__(16) u16 vs[CH_E][D];
#if KST
    extern __shared__ __align__(16) u8 cdyn[];
    u16 (*ks)[D] = (u16 (*)[D])(cdyn + (ROT && !HAD ? D * D * 4 : 0));
    stage_keys(a, ks, min(CH_E, ne), e0, n_old, c1, b, h, d);
#endif
    if constexpr (ROT && !HAD) {    // pi (D x D fp32) into dynamic shared memory, in flight during the exact part
        extern __shared__ __align__(16) u8 cdyn[];
        for (int i = d; i < D * D / 4; i += D) cp16(cdyn + 16 * i, pi + 4 * i);
        cp_commit();
    }
    stage_values(a, vs, 0, min(CH_E, ne), e0, n_old, c1, b, h, d);
    qrow[d] = q2f(a.q[b * a.sqb + qh * a.sqh + tq * a.sqt + d]);
#if KST
    if constexpr (ROT && !HAD) cp_wait<2>(); else cp_wait<1>();   // the keys (pi and the values may still fly)
#endif
    __syncthreads();                        // qrow (KST: and the staged keys)
    float mx = -INFINITY;
    {   // exact scores, a warp per token (lanes over channels: coalesced rows), EPL channels per lane
        const int w = d >> 5, ln = d & 31;
        float qv[D / 32];
#pragma unroll
        for (int e = 0; e < D / 32; ++e) qv[e] = qrow[ln * (D / 32) + e];
#pragma unroll 4
        for (int j = w; j < ne; j += D / 32) {
            const int pos = e0 + j;
#if KST
            const u16* kp = (j < CH_E ? &ks[j][0] : pos < n_old ? a.rk + b * a.srb + h * a.srh + (i64)(pos - c1) * a.srt
                                                                : a.kn + b * a.snb + h * a.snh + (i64)(pos - n_old) * a.snt)
                            + ln * (D / 32);
#else
            const u16* kp = (pos < n_old ? a.rk + b * a.srb + h * a.srh + (i64)(pos - c1) * a.srt
                                         : a.kn + b * a.snb + h * a.snh + (i64)(pos - n_old) * a.snt) + ln * (D / 32);
#endif
            u32 kw[D / 64];
            if constexpr (D / 32 == 4) { const uint2 v = *(const uint2*)kp; kw[0] = v.x; kw[1] = v.y; }
            else { kw[0] = *(const u32*)kp; }
            float s = 0.f;
#pragma unroll
            for (int e = 0; e < D / 32; ++e) s += qv[e] * q2f((u16)(kw[e / 2] >> (16 * (e & 1))));
#pragma unroll
            for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
            s = masked(a, s * a.qk_scale, b, h, r, pos, n, n);
            if (ln == 0) ps[j] = s;
            mx = fmaxf(mx, s);
        }
#if NSINK
        // sink tokens: positions 0 .. nsk-1 of the compressed part (the split masks them), after the others in ps
        for (int j = w; j < nsk; j += D / 32) {
            const u16* kp = a.ksink + ((i64)bh * NSINK + j) * D + ln * (D / 32);
            float s = 0.f;
#pragma unroll
            for (int e = 0; e < D / 32; ++e) s += qv[e] * h2f(kp[e]);
#pragma unroll
            for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
            s = masked(a, s * a.qk_scale, b, h, r, j, n, n);
            if (ln == 0) ps[ne + j] = s;
            mx = fmaxf(mx, s);
        }
#endif
    }
    const float me = block_max(mx, red[0], d);             // the exact part's max (syncs: ps is complete)
    const float mue = me == -INFINITY ? 0.f : me;
    for (int j = d; j < ne + nsk; j += D) ps[j] = exp2f(ps[j] - mue);
    float acc = 0.f, l = 0.f;
    for (int j0 = 0; j0 < ne; j0 += CH_E) {
        const int cnt = min(CH_E, ne - j0);
        if (j0) { __syncthreads(); stage_values(a, vs, j0, cnt, e0, n_old, c1, b, h, d); }
        cp_wait<0>();
        __syncthreads();
        for (int jj = 0; jj < cnt; ++jj) {
            const float p = ps[j0 + jj];
            l += p;
            acc += p * q2f(vs[jj][d]);
        }
    }
#if NSINK
    __syncthreads();
    for (int j = 0; j < nsk; ++j) {
        const float p = ps[ne + j];
        l += p;
        acc += p * h2f(a.vsink[((i64)bh * NSINK + j) * D + d]);
    }
#endif
    // ---- the split partials: written by the previous kernel ----
    TLM(8);
    griddep_wait();
    TLM(9);
    const float* op = a.opart + ((i64)bh * a.nsplit * 8 + r) * D + d;
    float opr[PREG];
#pragma unroll
    for (int s = 0; s < PREG; ++s) opr[s] = s < a.nsplit ? op[(i64)s * 8 * D] : 0.f;
    const float* lp = a.lse + (i64)bh * a.nsplit * 8 + r;
    float mxs = -INFINITY;
    for (int s = d; s < a.nsplit; s += D) { const float v = lp[s * 8]; wsp[s] = v; mxs = fmaxf(mxs, v); }
    const float mt = fmaxf(me, block_max(mxs, red[1], d));  // (syncs: wsp is complete)
    const float mu = mt == -INFINITY ? 0.f : mt;
    const float fe = me == -INFINITY ? 0.f : exp2f(me - mu);   // the exact part, rescaled to the joint max
    acc *= fe; l *= fe;
    float accp = 0.f, lpw = 0.f;
#pragma unroll
    for (int s = 0; s < PREG; ++s) {
        const float w = s < a.nsplit ? exp2f(wsp[s] - mu) : 0.f;
        if constexpr (ROT) { lpw += w; accp += w * opr[s]; } else { l += w; acc += w * opr[s]; }
    }
    for (int s = PREG; s < a.nsplit; ++s) {
        const float w = exp2f(wsp[s] - mu);
        if constexpr (ROT) { lpw += w; accp += w * op[(i64)s * 8 * D]; } else { l += w; acc += w * op[(i64)s * 8 * D]; }
    }
    if constexpr (ROT) {
        __shared__ float rot[D];
        rot[d] = accp;
#if HAD
        // Pi^T y = diag(s) H y / sqrt(D): warp 0 transforms, every thread takes its channel; pi holds s / sqrt(D)
        const float sg = pi[d];
        __syncthreads();
        if (d < 32) {
            float x[D / 32];
#pragma unroll
            for (int k = 0; k < D / 32; ++k) x[k] = rot[(D / 32) * d + k];
            fwht_warp<D>(x, d);
#pragma unroll
            for (int k = 0; k < D / 32; ++k) rot[(D / 32) * d + k] = x[k];
        }
        __syncthreads();
        acc += sg * rot[d];
#else
        extern __shared__ __align__(16) u8 cdyn[];
        const float* pis = (const float*)cdyn;
        cp_wait<0>();
        __syncthreads();
        float u0 = 0.f, u1 = 0.f;
#pragma unroll 8
        for (int e = 0; e < D; e += 2) { u0 += rot[e] * pis[e * D + d]; u1 += rot[e + 1] * pis[(e + 1) * D + d]; }
        acc += u0 + u1;
#endif
        l += lpw;
    }
    out[b * sob + qh * soh + tq * sot + d] = f2q(l > 0.f ? acc / l : 0.f);
    TLM(10);
}
