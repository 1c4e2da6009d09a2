// Decode attention over the rotation-codec cache (codec 2: rotation + Lloyd-Max codes, TurboQuant
// style; kernels/rotation.py), CUDA C++ for sm_80+ (tuned on sm_90), on the shared decode skeleton
// (decode_common.cuh: online softmax, warp merge, combine).
//
// Compiled by NVRTC with the shapes as macros: D head_dim (64, 128), KB key bits (4), VB value bits
// (3, 4), NSINK exact sink tokens, RR residual window, NW warps per CTA, QDT 0 fp16 / 1 bf16, MK mask kind, CAUSAL / CAUSAL_C as in
// qjl_decode.cu, CK keys centered per BLK-token block (the rotated block mean, fp16, is added back as
// q' . mu per block and query row). Side data (scales, means) fp16.
//
// The math (kernels/rotation.py): score_j = a_j <Pi q, cb_k[idx_j]> (+ <Pi q, mu_b>), values are summed
// in the rotated basis, o' = sum_j p_j b_j cb_v[idx_j], and rotated back once in the combine, o = Pi^T o'.
// Both products run on fp16 m16n8k16 tensor-core MMAs, fed in registers:
//   * codes -> fp16 operands by register lookup: the Lloyd-Max codebooks of N(0, 1) are symmetric,
//     cb[15 - c] = -cb[c], so code c is a sign (bit 3) and a 3-bit magnitude index; the 8 magnitudes'
//     low and high bytes are 4 registers, and PRMT looks up 4 codes at a time (byte selector = index).
//     18 integer ops per 8 codes (lut8 below), no shared-memory round trip, no conversion.
//   * keys: tokens on M, channels on K. The K order inside an MMA is free (it only has to agree
//     between A and B), so thread t takes the channels [D/4 t, D/4 (t + 1)) of its two tokens: one
//     16-byte load per token, and the B operand (Pi q, fp16, in shared memory) in natural order.
//   * values: out'^T (D x rows) += V'^T P^T as in the QJL kernel; the per-token scale b_j goes into P
//     (4 FMULs per tile) instead of into every element.
//   * KI8 (4-bit keys whose codebook is on the half-integer grid s (k + 1/2), kernels/rotation.py
//     grid_codebook): keys on int8 m16n8k32 MMAs instead. A code becomes the u8 level B = cb / s + 63.5
//     by one PRMT per 4 codes from the 8 levels of codes 0-7, and the other half (code c >= 8, the
//     negation of code 15 - c) by XOR 0x7F, whose mask a sign-mode PRMT makes from bit 3 of the code:
//     8 ALU ops per 8 codes against lut8's 14, one byte per code (no lo/hi interleave), half the MMAs
//     per channel. Pi q is a 16-bit fixed-point number in two s8 digits (rot_prep); with <= 4 query
//     rows the 8 MMA columns hold both digits of every row (PK), so one MMA per 32 channels. The
//     offset 63.5 comes back exactly in int32: sum_c (B_c - 63.5) Q_c = (2 sum_c B_c Q_c - 127 sum_c Q_c) / 2.
// One CTA per (batch * kv head, split), each warp its own 32-token groups through a cp.async ring.

#include "decode_common.cuh"

#ifndef NW
#define NW 4
#endif
#ifndef STAGES
#define STAGES 3
#endif
#ifndef MINB
#define MINB 3
#endif
#ifndef CK
#define CK 0
#endif
#ifndef BLK
#define BLK 128
#endif
#ifndef FUSEQ
#define FUSEQ 0                 // 1: Pi q computed by each split CTA on the tensor cores, no rot_prep launch
#endif
#if HAD && !FUSEQ
#error "HAD computes Pi q in the split (FUSEQ)"
#endif
#ifndef KI8
#define KI8 0                   // 1: keys on int8 MMAs (grid codebook, lut_i8)
#endif
#ifndef PK
#define PK 0                    // KI8 with <= 4 query rows: both digits of Pi q in one MMA's 8 columns
#endif
#ifndef MKS
#define MKS 0                   // 1 (MK 3 / 4): the group's 32 mask values staged with it by cp.async (the
                                // launcher checks: unit stride, 16-byte aligned rows, covering the cache)
#endif
#if MKS && !(MK == 3 || MK == 4)
#error "MKS needs a per-position mask (MK 3 / 4)"
#endif
#define MKE (MKS ? (MK == 3 ? 1 : 4) : 0)   // staged mask bytes per token
#ifndef EARLY
#define EARLY 0                 // 1 (CK): the block means staged into shared memory before the dependency wait
#endif
#ifndef NSINK
#define NSINK 0                 // exact sink tokens (positions 0 .. NSINK-1: masked here, attended in the combine)
#endif
#define CPT (D / 4)             // key channels per thread (t) and token
#define KW (CPT * KB / 32)      // 32-bit key words per thread and token
#define NK (D / 16)             // key k-steps
#define CPL (D / 8)             // value channels per lane group (g)
#define CB (CPL * VB / 8)       // value code bytes per lane group and token
#define CW (CPL / 8)            // value code words per lane group and token, 8 codes a word in nibbles
#define NT (D / 16)             // value M-tiles
#ifndef VFRAG
#define VFRAG 0                 // 1: the kernel layout (params center & 4): value codes in fragment order
                                // (rotation.frag_pack), 4-bit codes sign-magnitude (rotation.sm_relabel)
#endif
#define VW (D * VB / 32)        // VFRAG: 32-bit value words per lane and group
#ifndef PIPE
#define PIPE 0                  // 1 (VFRAG only): values of group i - 1 beside the keys of group i (software pipeline)
#endif
#if PIPE && !VFRAG
#error "PIPE needs the kernel layout (VFRAG)"
#endif
#define PD (STAGES - 1 - PIPE)  // prefetch distance in groups (PIPE keeps the previous group's stage resident)
#if PD < 1
#error "STAGES too small for PIPE (>= 3)"
#endif

struct Args {
    const u16* q; i64 sqb, sqh, sqt;
    const i64* len;
    const u16* rk; const u16* rv; i64 srb, srh, srt;
    const u16* kn; const u16* vn; i64 snb, snh, snt;
    const u8* kidx; const u16* kscale; const u16* kmean; const u8* vidx; const u16* vscale;
    const u16* qr;          // (BH, 8, D) Pi q / 2^e per row, fp16 (rot_prep)
    const float* qrs;       // (BH, 8) 2^e per row
    const float* pi;        // (D, D) fp32: the combine rotates the partials back
    const uint4* pif;       // FUSEQ: 16 Pi as fp16 hi and lo A fragments (2, D/16 m-tiles, D/16 k-steps, 32 lanes)
    const u32* lut;         // 11 words: key magnitudes (lo bytes 0-3, 4-7, hi bytes 0-3, 4-7), then values'
                            // (the same for 4-bit values; for 3-bit ones lo bytes of cb 0-3, 4-7, hi bytes),
                            // then KI8's u8 key levels of codes 0-7, XOR 0x80 (bytes 0-3, 4-7), 0x80808080
    const signed char* qi;  // KI8: (BH, 16, D) s8 digits of Q = round(Pi q / sigma): hi rows 0-7, lo rows 0-7
    const float* qsig;      // KI8: (BH, 8) sigma per row (0 for rows >= M)
    float kstep;            // KI8: the key codebook's grid step s
    const u16* ksink; const u16* vsink;   // (B * H, NSINK, D) fp16 exact sink tokens
    const void* mask; i64 smb, smh, smt, sml;
    float* opart; float* lse;
    float qk_scale;
    int H, G, Tq, T, M, LC, chunk, nsplit, nblk;
};

// 8 codes (nibbles of x, code c: sign bit 3, magnitude index c ^ 7 below 8, c & 7 from 8) -> 4 fp16x2.
// S0/S1 pick the pairs: keys (0x5140, 0x7362) give (c0, c1), (c2, c3), ...; values, whose words hold two
// tokens' codes interleaved byte by byte, (0x6240, 0x7351) give (tokA c, tokB c) pairs.
template <u32 S0, u32 S1>
__device__ __forceinline__ void lut8(u32 x, const u32 (&tb)[4], u32 (&h)[4]) {
    const u32 ng = ~x & 0x88888888u;                 // bit 3 of a nibble: the code is negative
#if VFRAG
    const u32 m = ~x & 0x77777777u;                  // sign-magnitude storage (rotation.sm_relabel): 7 - bits 0-2
#else
#if FMAOFF
    u32 n7; asm("mul.hi.u32 %0, %1, %2;" : "=r"(n7) : "r"(ng), "r"(0xE0000000u));   // 7 ng / 8 = ng - ng >> 3
#else
    const u32 n7 = ng - (ng >> 3);
#endif
    const u32 m = (x ^ n7) & 0x77777777u;
#endif
    const u32 mh = shr_(m, 16);
    const u32 la = prmt(tb[0], tb[1], m), lb = prmt(tb[0], tb[1], mh);
    u32 ha = prmt(tb[2], tb[3], m), hb = prmt(tb[2], tb[3], mh);
    const u32 ng4 = shl_(ng, 4);                      // sign of nibble 2i at bit 7 of byte i
    ha ^= prmt(ng4, ng, 0x5140) & 0x80808080u;        // byte i <- sign of code i (i = 0..3)
    hb ^= prmt(ng4, ng, 0x7362) & 0x80808080u;        // codes 4..7
    h[0] = prmt(la, ha, S0); h[1] = prmt(la, ha, S1);
    h[2] = prmt(lb, hb, S0); h[3] = prmt(lb, hb, S1);
}

// 3-bit values: the 8 codebook entries' lo and hi bytes are 4 registers and the 3-bit code is the
// byte selector itself (no symmetry needed, no sign); the nibbles come from the packed 24-bit words by
// three shift-and-select steps (spread3). 8 codes: 1 SHF + 8 PRMT here, 3 SHF + 4 LOP3 + 1 PRMT before.
template <u32 S0, u32 S1>
__device__ __forceinline__ void lut3(u32 x, const u32 (&tb)[4], u32 (&h)[4]) {
    const u32 xh = shr_(x, 16);
    const u32 la = prmt(tb[0], tb[1], x), lb = prmt(tb[0], tb[1], xh);
    const u32 ha = prmt(tb[2], tb[3], x), hb = prmt(tb[2], tb[3], xh);
    h[0] = prmt(la, ha, S0); h[1] = prmt(la, ha, S1);
    h[2] = prmt(lb, hb, S0); h[3] = prmt(lb, hb, S1);
}

// KI8: 8 4-bit key codes (nibbles of x) -> 8 u8 levels, o[0] codes 0-3, o[1] codes 4-7. Code c < 8 is
// level P[c] (table byte P[c] ^ 0x80, XOR 0x80 back); code c >= 8 is the negation of code 15 - c, i.e.
// 127 - P[15 - c] = (table byte of 15 - c) ^ 0xFF. The XOR mask is 0x80 or 0xFF by a sign-mode PRMT
// (selector bit 3 set: the selected byte's sign replicated) on the raw code; sg = 0x80808080 comes from
// memory (lut[10]) so that ptxas keeps it in one register instead of re-materializing it per PRMT.
__device__ __forceinline__ void lut_i8(u32 x, u32 t0, u32 t1, u32 sg, u32 (&o)[2]) {
#if VFRAG
    const u32 m = x & 0x77777777u;                   // sign-magnitude storage (rotation.sm_relabel): 15 - c stored
#else
    const u32 ps = x & 0x88888888u;                  // bit 3: code >= 8, looked up as 15 - c = c ^ 15
#if FMAOFF
    u32 n7; asm("mul.hi.u32 %0, %1, %2;" : "=r"(n7) : "r"(ps), "r"(0xE0000000u));
#else
    const u32 n7 = ps - (ps >> 3);
#endif
    const u32 m = (x ^ n7) & 0x77777777u;
#endif
    o[0] = prmt(t0, t1, m) ^ prmt(sg, sg, x);
    o[1] = prmt(t0, t1, shr_(m, 16)) ^ prmt(sg, sg, shr_(x, 16));
}

// (a & m) | (b & ~m) as one LOP3 (LUT 0xE4 = a, b, m in the slots of 0xF0, 0xCC, 0xAA): written in C,
// ptxas makes two of it (b & ~m first), 3 extra ALU ops per spread3 call
template <u32 M>
__device__ __forceinline__ u32 sel(u32 a, u32 b) {
    u32 r; asm("lop3.b32 %0, %1, %2, %3, 0xE4;" : "=r"(r) : "r"(a), "r"(b), "n"(M)); return r;
}

// 8 3-bit codes (bits 0-23, 3 i .. 3 i + 2 code i; bits 24-31 zero) -> nibble i = code i (bit 3 zero).
// Each step leaves garbage only in bits that the next steps drop or the final mask clears.
__device__ __forceinline__ u32 spread3(u32 x) {
    x = sel<0x00000FFFu>(x, shl_(x, 4));     // codes 4-7 to bits 16-27
    x = sel<0x003F003Fu>(x, shl_(x, 2));     // pairs (2 i, 2 i + 1) to bytes
    x = sel<0x07070707u>(x, shl_(x, 1));     // odd codes to the high nibble
    return x & 0x77777777u;
}

// VFRAG, 3 bits: the 4th nibble word of a block, whose code bit r sits in bit 3 of word r's nibbles;
// m30 / m31 = 2^30 / 2^31 from memory (lut[11], lut[12]): with constant multipliers ptxas folds the
// mad.hi into LEA.HI, on the ALU pipe that the lookups keep busy
__device__ __forceinline__ u32 frag3(u32 w0, u32 w1, u32 w2, u32 m30, u32 m31) {
    const u32 a0 = w0 & 0x88888888u, a1 = w1 & 0x88888888u, a2 = w2 & 0x88888888u;
#if FMAOFF
    u32 r;                                   // a0 >> 3 | a1 >> 2 | a2 >> 1 (disjoint bits: sums) on the FMA pipe
    asm("mul.hi.u32 %0, %1, %2;" : "=r"(r) : "r"(a0), "r"(1u << 29));
    asm("mad.hi.u32 %0, %1, %2, %0;" : "+r"(r) : "r"(a1), "r"(m30));
    asm("mad.hi.u32 %0, %1, %2, %0;" : "+r"(r) : "r"(a2), "r"(m31));
    return r;
#else
    return (a0 >> 3) | (a1 >> 2) | (a2 >> 1);
#endif
}

// one lane group's CPL 3-bit value codes of a token (CB bytes at p) as CW nibble words
__device__ __forceinline__ void load_codes3(u32 (&w)[CW], const u8* p) {
    if constexpr (CW == 2) {     // 6 bytes, 2-byte aligned
        const u32 h0 = *(const u16*)p, h1 = *(const u16*)(p + 2), h2 = *(const u16*)(p + 4);
        w[0] = spread3(prmt(h0, h1, 0x2410));
        w[1] = spread3(prmt(h1, h2, 0x2541));
    } else {                     // 3 bytes at any alignment
        w[0] = spread3((u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16));
    }
}

// one 32-token group in shared memory (bytes): key codes, key scales, value codes, value scales
#define ST_K 0
#define ST_KS (ST_K + 32 * (D * KB / 8))
#define ST_V (ST_KS + 64)
#define ST_VS (ST_V + 32 * (D * VB / 8))
#define ST_MK (ST_VS + 64)
#define ST_SIZE (ST_MK + 32 * MKE)

struct Streams {
    CpStream<D * KB / 8, ST_K, NW> k;
    CpStream<2, ST_KS, NW> ks;
    CpStream<D * VB / 8, ST_V, NW> v;
    CpStream<2, ST_VS, NW> vs;
#if MKS
    CpStream<MKE, ST_MK, NW> mk;                    // the mask row of batch b, by position (not cache row)
#endif
    __device__ __forceinline__ Streams(const Args& a, i64 row, int lane, int b, int pos)
        : k(a.kidx, row, lane), ks(a.kscale, row, lane), v(a.vidx, row, lane), vs(a.vscale, row, lane)
#if MKS
        , mk((const u8*)a.mask + b * a.smb * MKE, pos, lane)
#endif
    {}
    __device__ __forceinline__ void issue(u32 st, int lane) const {
        k.issue(st, lane); ks.issue(st, lane); v.issue(st, lane); vs.issue(st, lane);
#if MKS
        mk.issue(st, lane);
#endif
    }
    __device__ __forceinline__ void step() {
        k.step(); ks.step(); v.step(); vs.step();
#if MKS
        mk.step();
#endif
    }
};

extern "C" __global__ void __launch_bounds__(NW * 32, MINB) rot_split(const Args a) {
    const int bh = blockIdx.x, sp = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int b = bh / a.H, h = bh % a.H;
    const int n = (int)a.len[0];
    const int c1 = n / RR * RR;
    const int cl = min(c1, n - a.T);
    const int lo = sp * a.chunk;
    const int hi = min(lo + a.chunk, cl);
    TLM(2);
    griddep_launch();                               // rot_combine's exact part needs nothing of this kernel

    extern __shared__ __align__(16) u8 dsm[];       // launcher: dyn_smem (stages + q'.mu table, merge)
    __shared__ __align__(16) u16 qs[8][D];          // Pi q / 2^e, rows >= M are zero
    // each warp's first groups in flight before anything of rot_prep's is waited for (PDL), then the
    // q' . mu table and the operand setup
    const i64 tb = (i64)bh * a.LC;
#if CK && EARLY
    // the split's block means (kmean, independent of rot_prep) into shared memory before everything
    // else, so that the q' . mu table after the dependency wait reads them there instead of starting a
    // memory round trip then (its loads were part of the third of the split's stalls outside the loop)
    u8* kms = dsm + NW * STAGES * ST_SIZE + a.nblk * 32;
    {
        const int nbk = lo < hi ? (hi - 1) / BLK - lo / BLK + 1 : 0;
        const u8* src = (const u8*)(a.kmean + ((i64)bh * (a.LC / BLK) + lo / BLK) * D);
        for (int i = threadIdx.x; i < nbk * (D / 8); i += NW * 32) cp16(kms + 16 * i, src + 16 * i);
        cp_commit();                                // the oldest group: complete after cp_wait<PD> below
    }
#endif
    u8* wst = dsm + warp * (STAGES * ST_SIZE);
    const u32 sb = smem_addr(wst) + 16 * lane;
    Streams cps(a, tb + lo + warp * 32, lane, b, lo + warp * 32);
    stream_prologue<PD + 1, NW, ST_SIZE>(cps, sb, lo, hi, warp, lane);
    TLM(11);
#if FUSEQ
    __shared__ float qsc[8];                        // 2^e per row
    __shared__ float qsg[8];                        // KI8: sigma per row
    __shared__ __align__(16) signed char qis[16][D];   // KI8: digits of Q, hi rows 0-7, lo rows 8-15
#if HAD
    {   // Pi q = H (s q) / sqrt(D) (a.pi: s / sqrt(D)): a warp per query row by butterflies (fwht_warp),
        // no matrix read and no round trip through shared memory; lane holds channels E lane .. + E - 1
        constexpr int E = D / 32;
        float sg[E];
#pragma unroll
        for (int k = 0; k < E; ++k) sg[k] = a.pi[E * lane + k];
        for (int r = warp; r < 8; r += NW) {
            float x[E];
            const u16* qp = a.q + b * a.sqb + (h * a.G + r / a.Tq) * a.sqh + (r % a.Tq) * a.sqt + E * lane;
#pragma unroll
            for (int k = 0; k < E; ++k) x[k] = r < a.M ? q2f(qp[k]) * sg[k] : 0.f;
            fwht_warp<D>(x, lane);
            float ss = 0.f;
#pragma unroll
            for (int k = 0; k < E; ++k) ss += x[k] * x[k];
#pragma unroll
            for (int o = 16; o; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
            // |(Pi q)_e| <= |Pi q|: scaled so the largest possible entry is below 2^14 (fp16 max 65504)
            const float sc = ss > 0.f ? exp2f(ceilf(0.5f * log2f(ss)) - 13.f) : 1.f;
            const float sig = ss > 0.f ? sqrtf(ss) * (1.f / 32000.f) : 0.f;
            if (lane == 0) { qsc[r] = sc; qsg[r] = sig; }
#pragma unroll
            for (int k = 0; k < E; ++k) {
                qs[r][E * lane + k] = f2h(x[k] / sc);
#if KI8
                const int Q = sig > 0.f ? __float2int_rn(x[k] / sig) : 0;
                const int hd = (Q + 128) >> 8;
                qis[r][E * lane + k] = (signed char)hd;
                qis[8 + r][E * lane + k] = (signed char)(Q - 256 * hd);
#endif
            }
        }
    }
#else
    {   // Pi q on the tensor cores, as rot_prep computes it: y^T (D x 8 rows) = Pi (D x D) (q / 2^e)^T with
        // Pi as 16 Pi = hi + lo in fp16 (A fragments prepared once per layer, rot.py pi_fragments) and q in
        // fp16 (exact from bf16 once scaled by 2^-e): products exact, fp32 sums, ~2^-22 of |q| all told
        __shared__ float qf[8][D];
        for (int i = threadIdx.x; i < 8 * D; i += NW * 32) {
            const int r = i / D, d = i % D;
            qf[r][d] = r < a.M ? q2f(a.q[b * a.sqb + (h * a.G + r / a.Tq) * a.sqh + (r % a.Tq) * a.sqt + d]) : 0.f;
        }
        __syncthreads();
        for (int r = warp; r < 8; r += NW) {
            float ss = 0.f;
            for (int d = lane; d < D; d += 32) ss += qf[r][d] * qf[r][d];
#pragma unroll
            for (int o = 16; o; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
            // |(Pi q)_e| <= |q|: scaled so the largest possible entry is below 2^14 (fp16 max 65504)
            if (lane == 0) {
                qsc[r] = ss > 0.f ? exp2f(ceilf(0.5f * log2f(ss)) - 13.f) : 1.f;
                qsg[r] = ss > 0.f ? sqrtf(ss) * (1.f / 32000.f) : 0.f;
            }
        }
        __syncthreads();
        u32 bf[D / 16][2];                          // B: row g, channels 16 ks + 2t (+1) and + 8 (+9)
        {
            const float iv = 1.f / qsc[g];
#pragma unroll
            for (int ks = 0; ks < D / 16; ++ks) {
                const float* qr_ = &qf[g][16 * ks + 2 * t];
                bf[ks][0] = pack2(qr_[0] * iv, qr_[1] * iv);
                bf[ks][1] = pack2(qr_[8] * iv, qr_[9] * iv);
            }
        }
        for (int mt = warp; mt < D / 16; mt += NW) {
            float c[4] = {0.f, 0.f, 0.f, 0.f};
            const uint4* ph = a.pif + (i64)mt * (D / 16) * 32 + lane;
            const uint4* pl = ph + (D / 16) * (D / 16) * 32;
#pragma unroll
            for (int ks = 0; ks < D / 16; ++ks) {
                const uint4 x = ph[ks * 32], y = pl[ks * 32];
                mma_h16(c, x.x, x.y, x.z, x.w, bf[ks][0], bf[ks][1]);
                mma_h16(c, y.x, y.y, y.z, y.w, bf[ks][0], bf[ks][1]);
            }
#pragma unroll
            for (int e = 0; e < 4; ++e) {           // channel 16 mt + g (+ 8), row 2t (+ 1)
                const int ch = 16 * mt + g + 8 * (e >> 1), r = 2 * t + (e & 1);
                const float y = 0.0625f * c[e];     // (Pi q)_ch / 2^e
                qs[r][ch] = f2h(y);
#if KI8
                const int Q = qsg[r] > 0.f ? __float2int_rn(y * qsc[r] / qsg[r]) : 0;
                const int hd = (Q + 128) >> 8;
                qis[r][ch] = (signed char)hd;
                qis[8 + r][ch] = (signed char)(Q - 256 * hd);
#endif
            }
        }
    }
#endif
    TLM(12);
    const signed char* qib = &qis[0][0];
    const float* qsgb = qsg;
#else
    griddep_wait();                                 // qr, qrs, qi, qsig: rot_prep's
    TLM(3);
    for (int i = threadIdx.x; i < 8 * D / 8; i += NW * 32)
        ((uint4*)&qs[0][0])[i] = ((const uint4*)(a.qr + (i64)bh * 8 * D))[i];
    const signed char* qib = a.qi + (i64)bh * 16 * D;
    const float* qsgb = a.qsig + bh * 8;
#endif
#if CK
    // q' . mu_b per block of this split and query row (mu_b: the block's rotated mean key)
    float* qmu = (float*)(dsm + NW * STAGES * ST_SIZE);
    const int blo = lo / BLK;
#if EARLY
    cp_wait<PD>();                                  // kmean staged (the stage groups may still be in flight)
#endif
#endif
    __syncthreads();
#if CK
    if (lo < hi) {
        const int nb = (hi - 1) / BLK - blo + 1;
        // one thread per (block, row): 16-byte loads and a private FMA chain, no shuffle reductions
        // (the warp-per-block form with 8 shuffle trees per block held ~13% of the split at 128k)
        for (int i = threadIdx.x; i < nb * 8; i += NW * 32) {
            const int bi = i >> 3, r = i & 7;
#if EARLY
            const uint4* mu = (const uint4*)(kms + bi * (2 * D));
#else
            const uint4* mu = (const uint4*)(a.kmean + ((i64)bh * (a.LC / BLK) + blo + bi) * D);
#endif
            const uint4* qv = (const uint4*)&qs[r][0];
            float s0 = 0.f, s1 = 0.f;
#pragma unroll
            for (int e = 0; e < D / 8; ++e) {
                const uint4 m = mu[e], x = qv[e];
                const u32 mw[4] = {m.x, m.y, m.z, m.w}, xw[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    s0 += h2f((u16)(mw[j] & 0xFFFFu)) * h2f((u16)(xw[j] & 0xFFFFu));
                    s1 += h2f((u16)(mw[j] >> 16)) * h2f((u16)(xw[j] >> 16));
                }
            }
            qmu[bi * 8 + r] = s0 + s1;
        }
    }
    __syncthreads();
#endif

    __shared__ float wm[NW][8], wl[NW][8];
    float (*wo)[8][D] = (float (*)[8][D])dsm;       // the stages are free by then (launcher sizes dsm for both)
    TLM(4);
    {
    float m_r[2] = {-INFINITY, -INFINITY}, mu_r[2] = {0.f, 0.f}, l_r[2] = {0.f, 0.f};
    float acc[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

    if (lo + warp * 32 < hi) {
        const u32 m30 = a.lut[11], m31 = a.lut[12];     // frag3's multipliers
#if KI8
        // B operand of the int8 key MMAs: column g's digits at channels CPT t + 8 w + 0..7 (k-step w);
        // PK: columns 0-3 the hi digits of rows 0-3, columns 4-7 their lo digits
        u32 bi[D / 32][2];
#if PK
        const signed char* qd = qib + (g < 4 ? g : g + 4) * D + CPT * t;
#else
        const signed char* qd = qib + g * D + CPT * t;
        u32 bl[D / 32][2];
#endif
        int cs = 0, csl = 0;
#pragma unroll
        for (int w = 0; w < D / 32; ++w) {
            const uint2 v = *(const uint2*)(qd + 8 * w);
            bi[w][0] = v.x; bi[w][1] = v.y;
            cs = __dp4a((int)v.x, 0x01010101, cs); cs = __dp4a((int)v.y, 0x01010101, cs);
#if !PK
            const uint2 vl = *(const uint2*)(qd + 8 * D + 8 * w);
            bl[w][0] = vl.x; bl[w][1] = vl.y;
            csl = __dp4a((int)vl.x, 0x01010101, csl); csl = __dp4a((int)vl.y, 0x01010101, csl);
#endif
        }
#pragma unroll
        for (int o = 1; o <= 2; o <<= 1) {
            cs += __shfl_xor_sync(0xffffffffu, cs, o);
            csl += __shfl_xor_sync(0xffffffffu, csl, o);
        }
        // 127 sum_c Q_c of rows 2t, 2t + 1 (the u8 levels' offset 63.5, removed in int32)
        int kof[2];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
#if PK
            const int r = (2 * t + j) & 3;
            kof[j] = 127 * (256 * __shfl_sync(0xffffffffu, cs, 4 * r) + __shfl_sync(0xffffffffu, cs, 4 * (r + 4)));
#else
            const int r = 2 * t + j;
            kof[j] = 127 * (256 * __shfl_sync(0xffffffffu, cs, 4 * r) + __shfl_sync(0xffffffffu, csl, 4 * r));
#endif
        }
        const float ri0 = qsgb[2 * t] * (0.5f * a.kstep) * a.qk_scale;
        const float ri1 = qsgb[2 * t + 1] * (0.5f * a.kstep) * a.qk_scale;
        const u32 tk0 = a.lut[8], tk1 = a.lut[9], sg = a.lut[10];
        const int k512 = (int)a.lut[13], k2 = (int)a.lut[14];
        u32 tv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) tv[i] = a.lut[4 + i];
#else
        // B operand of the key MMAs for the whole split: row g, channels CPT t + 4 ks + (0, 1) / (2, 3)
        u32 bq[NK][2];
#pragma unroll
        for (int ks = 0; ks < NK; ++ks) {
            const uint2 v = *(const uint2*)&qs[g][CPT * t + 4 * ks];
            bq[ks][0] = v.x; bq[ks][1] = v.y;
        }
        u32 tk[4], tv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) { tk[i] = a.lut[i]; tv[i] = a.lut[4 + i]; }
#endif
#if FUSEQ
        const float rs0 = qsc[2 * t] * a.qk_scale, rs1 = qsc[2 * t + 1] * a.qk_scale;
#else
        const float rs0 = a.qrs[bh * 8 + 2 * t] * a.qk_scale, rs1 = a.qrs[bh * 8 + 2 * t + 1] * a.qk_scale;
#endif
#if MK == 1 || MK == 2
        i64 mrow[2];
#endif
#if CAUSAL_C
        int qpos[2];
#endif
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int r = min(2 * t + j, a.M - 1);
#if MK == 1 || MK == 2
            mrow[j] = b * a.smb + (h * a.G + r / a.Tq) * a.smh + (r % a.Tq) * a.smt;
#endif
#if CAUSAL_C
            qpos[j] = n - a.Tq + r % a.Tq;
#endif
        }
#if VFRAG
        // one 32-token group's values from its stage's codes gv and its packed P (tile, b0 / b1):
        // out'^T += V'^T (b P)^T per 16-token tile
        auto values = [&](const u8* gv, const u32 (&pk)[2][2]) {
            const u8* vlane = gv + lane * (4 * VW);
#pragma unroll
            for (int tt = 0; tt < 2; ++tt) {
                const u32 b0 = pk[tt][0], b1 = pk[tt][1];
                // nibble word i = the 8 codes of M-tile i's A fragment; 3 bits: every 4 stored as 3
                u32 vw[VW / 2], nwd[NT];
                {
                    // alignment: lane 4 VW bytes, tile 2 VW: 16 B (VW = 8, 16), 8 B (VW = 12), 4 B (VW = 6, D = 64 3 bits)
                    const u8* vp = vlane + tt * (2 * VW);
                    if constexpr ((VW / 2) % 4 == 0) load_words<VW / 2>(vw, vp);
                    else if constexpr ((VW / 2) % 2 == 0) {
#pragma unroll
                        for (int i = 0; i < VW / 2; i += 2) { const uint2 v = *(const uint2*)(vp + 4 * i); vw[i] = v.x; vw[i + 1] = v.y; }
                    } else {
#pragma unroll
                        for (int i = 0; i < VW / 2; ++i) vw[i] = *(const u32*)(vp + 4 * i);
                    }
                }
                if constexpr (VB == 3) {
#pragma unroll
                    for (int jb = 0; jb < NT / 4; ++jb) {
                        const u32 w0 = vw[3 * jb], w1 = vw[3 * jb + 1], w2 = vw[3 * jb + 2];
                        nwd[4 * jb] = w0 & 0x77777777u;
                        nwd[4 * jb + 1] = w1 & 0x77777777u;
                        nwd[4 * jb + 2] = w2 & 0x77777777u;
                        nwd[4 * jb + 3] = frag3(w0, w1, w2, m30, m31);
                    }
                } else {
#pragma unroll
                    for (int i = 0; i < NT; ++i) nwd[i] = vw[i];
                }
#pragma unroll
                for (int i = 0; i < NT; ++i) {          // nibbles 4k + 2a + h: (a0, a1, a2, a3) of M-tile i
                    u32 v4[4];
                    if constexpr (VB == 3) lut3<0x6240, 0x7351>(nwd[i], tv, v4);
                    else lut8<0x6240, 0x7351>(nwd[i], tv, v4);
                    mma_h16(acc[i], v4[0], v4[1], v4[2], v4[3], b0, b1);
                }
            }
        };
#endif
#if PIPE
        // software pipeline: each iteration does the values of the group before (its P and its stage,
        // still resident: prefetch distance STAGES - 2) beside this group's keys, two independent
        // dependency chains for the scheduler instead of one
        u32 ppk[2][2] = {{0u, 0u}, {0u, 0u}};
        const u8* pgv = wst;
#endif
        int it = 0;
        for (int g0 = lo + warp * 32; g0 < hi; g0 += NW * 32) {
            const bool tail = g0 + 32 > hi;
            const u8* gst = wst + (it % STAGES) * ST_SIZE;
            {
                const int gg = g0 + PD * NW * 32;
                if (gg < hi) cps.issue(sb + ((it + PD) % STAGES) * ST_SIZE, lane);
                cps.step();
                cp_commit();
                cp_wait<PD>();
                __syncwarp();
            }
#if PIPE
            // unconditional (a branch would split the two chains into separate blocks): in the first
            // iteration P is 0 and the codes those of any stage, finite through the lookup, so it adds 0
            values(pgv, ppk);                           // acc complete up to the previous group (softmax_step may rescale it)
#endif
            ++it;
            const u8* G_K = gst + ST_K;
            const u16* G_KS = (const u16*)(gst + ST_KS);
            const u8* G_V = gst + ST_V;
            const u16* G_VS = (const u16*)(gst + ST_VS);
            // value codes first (their latency overlaps the scoring): tokens 2t, 2t+1, 2t+8, 2t+9 of
            // each tile, lane group g's CB bytes
#if VFRAG
            // fragment order (rotation.frag_pack): this lane's VW words; tile tt's are the VW / 2 from word
            // tt VW / 2 on, read where they are used (values(); all VW live at once spill at 4 bits)
#else
            u32 cwt[2][4][CW];
#pragma unroll
            for (int tt = 0; tt < 2; ++tt)
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    const u8* cp = G_V + (16 * tt + 2 * t + (k & 1) + 8 * (k >> 1)) * (D * VB / 8) + CB * g;
                    if constexpr (VB == 3) load_codes3(cwt[tt][k], cp);
                    else if constexpr (CW == 1) cwt[tt][k][0] = *(const u32*)cp;
                    else { const uint2 v = *(const uint2*)cp; cwt[tt][k][0] = v.x; cwt[tt][k][1] = v.y; }
                }
#endif
            float s[2][4];
#pragma unroll
            for (int tt = 0; tt < 2; ++tt) {
                u32 kg[KW], k8[KW];
                load_words<KW>(kg, G_K + (16 * tt + g) * (D * KB / 8) + 4 * KW * t);
                load_words<KW>(k8, G_K + (16 * tt + g + 8) * (D * KB / 8) + 4 * KW * t);
#if KI8
                int ci[4] = {0, 0, 0, 0};
#if !PK
                int cl[4] = {0, 0, 0, 0};
#endif
#pragma unroll
                for (int w = 0; w < KW; ++w) {       // word w: channels CPT t + 8 w + 0..7 = k 4t.. and 16 + 4t..
                    u32 x0[2], x8[2];
                    lut_i8(kg[w], tk0, tk1, sg, x0);
                    lut_i8(k8[w], tk0, tk1, sg, x8);
                    mma_us(ci, x0[0], x8[0], x0[1], x8[1], bi[w][0], bi[w][1]);
#if !PK
                    mma_us(cl, x0[0], x8[0], x0[1], x8[1], bl[w][0], bl[w][1]);
#endif
                }
                float c[4];
#pragma unroll
                for (int e = 0; e < 4; ++e) {
#if PK
                    // lanes t = 2, 3 hold the lo digits of rows 0-3; they stand for the padding rows 4-7,
                    // whose sigma is 0, so what they compute here is multiplied by 0
                    const int o = __shfl_xor_sync(0xffffffffu, ci[e], 2);
#else
                    const int o = cl[e];
#endif
                    // 2 sum_c B_c Q_c - 127 sum_c Q_c, two IMADs (k512, k2 from memory: as constants, IMAD + LEA)
                    c[e] = (float)(ci[e] * k512 + (o * k2 - kof[e & 1]));
                }
                const float q0 = ri0, q1 = ri1;
#else
                float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                for (int w = 0; w < KW; ++w) {
                    u32 x0[4], x8[4];
                    lut8<0x5140, 0x7362>(kg[w], tk, x0);
                    lut8<0x5140, 0x7362>(k8[w], tk, x8);
                    mma_h16(c, x0[0], x8[0], x0[1], x8[1], bq[2 * w][0], bq[2 * w][1]);
                    mma_h16(c, x0[2], x8[2], x0[3], x8[3], bq[2 * w + 1][0], bq[2 * w + 1][1]);
                }
                const float q0 = rs0, q1 = rs1;
#endif
                const int p = g0 + 16 * tt;
                const float a0 = h2f(G_KS[16 * tt + g]), a8 = h2f(G_KS[16 * tt + g + 8]);
#if CK
                const float mu0 = qmu[(g0 / BLK - blo) * 8 + 2 * t] * rs0, mu1 = qmu[(g0 / BLK - blo) * 8 + 2 * t + 1] * rs1;
#else
                const float mu0 = 0.f, mu1 = 0.f;
#endif
                s[tt][0] = c[0] * (a0 * q0) + mu0;     // FMUL + FFMA per score
                s[tt][1] = c[1] * (a0 * q1) + mu1;
                s[tt][2] = c[2] * (a8 * q0) + mu0;
                s[tt][3] = c[3] * (a8 * q1) + mu1;
#if MKS
#pragma unroll
                for (int e2 = 0; e2 < 2; ++e2) {             // from the stage (positions g0 .. g0 + 31)
                    const int jj = 16 * tt + g + 8 * e2;
#if MK == 3
                    if (!(gst + ST_MK)[jj]) s[tt][2 * e2] = s[tt][2 * e2 + 1] = -INFINITY;
#else
                    const float mv = LOG2E_F * ((const float*)(gst + ST_MK))[jj];
                    s[tt][2 * e2] += mv; s[tt][2 * e2 + 1] += mv;
#endif
                }
#elif MK == 3 || MK == 4
#pragma unroll
                for (int e2 = 0; e2 < 2; ++e2) {
                    const i64 mo_ = b * a.smb + (i64)(p + g + 8 * e2) * a.sml;
#if MK == 3
                    if (!((const u8*)a.mask)[mo_]) s[tt][2 * e2] = s[tt][2 * e2 + 1] = -INFINITY;
#else
                    const float mv = LOG2E_F * ((const float*)a.mask)[mo_];
                    s[tt][2 * e2] += mv; s[tt][2 * e2 + 1] += mv;
#endif
                }
#elif MK == 1 || MK == 2
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const i64 mo_ = mrow[e & 1] + (i64)(p + g + 8 * (e >> 1)) * a.sml;
#if MK == 1
                    if (!((const u8*)a.mask)[mo_]) s[tt][e] = -INFINITY;
#else
                    s[tt][e] += LOG2E_F * ((const float*)a.mask)[mo_];
#endif
                }
#endif
#if CAUSAL_C
#pragma unroll
                for (int e = 0; e < 4; ++e) if (p + g + 8 * (e >> 1) > qpos[e & 1]) s[tt][e] = -INFINITY;
#endif
            }
            // the split's last group, and the sink positions (attended exactly in the combine): one
            // branch after both tiles, so that the block holds both tiles' keys (and PIPE's values)
            if (tail || (NSINK > 0 && g0 < NSINK)) {
#pragma unroll
                for (int tt = 0; tt < 2; ++tt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int pos = g0 + 16 * tt + g + 8 * (e >> 1);
                        if (pos >= hi || pos < NSINK) s[tt][e] = -INFINITY;
                    }
            }
            float pr[2][4];
            softmax_step<NT>(s, m_r, mu_r, l_r, pr, acc);
            // values: b_j (the value scale) folded into P
#if VFRAG
            u32 pk[2][2];
#pragma unroll
            for (int tt = 0; tt < 2; ++tt) {
                const float b0s = h2f(G_VS[16 * tt + g]), b8s = h2f(G_VS[16 * tt + g + 8]);
                pk[tt][0] = movt(pack2(pr[tt][0] * b0s, pr[tt][1] * b0s));   // tokens 2t, 2t+1 of row g
                pk[tt][1] = movt(pack2(pr[tt][2] * b8s, pr[tt][3] * b8s));   // tokens 2t+8, 2t+9
            }
#if PIPE
#pragma unroll
            for (int tt = 0; tt < 2; ++tt) { ppk[tt][0] = pk[tt][0]; ppk[tt][1] = pk[tt][1]; }
            pgv = G_V;
#else
            values(G_V, pk);
#endif
#else
#pragma unroll
            for (int tt = 0; tt < 2; ++tt) {
                const float b0s = h2f(G_VS[16 * tt + g]), b8s = h2f(G_VS[16 * tt + g + 8]);
                const u32 b0 = movt(pack2(pr[tt][0] * b0s, pr[tt][1] * b0s));   // tokens 2t, 2t+1 of row g
                const u32 b1 = movt(pack2(pr[tt][2] * b8s, pr[tt][3] * b8s));   // tokens 2t+8, 2t+9
                u32 af[NT][4];
#pragma unroll
                for (int k = 0; k < 2; ++k) {           // token pair (2t, 2t+1) + 8k
#pragma unroll
                    for (int w = 0; w < CW; ++w) {
#pragma unroll
                        for (int hf = 0; hf < 2; ++hf) {  // bytes 2hf, 2hf+1 of both tokens: channels 8w + 4hf + 0..3
                            const u32 x = prmt(cwt[tt][2 * k][w], cwt[tt][2 * k + 1][w], hf ? 0x7362 : 0x5140);
                            u32 v4[4];
                            if constexpr (VB == 3) lut3<0x6240, 0x7351>(x, tv, v4);
                            else lut8<0x6240, 0x7351>(x, tv, v4);
#pragma unroll
                            for (int j = 0; j < 4; ++j) {
                                const int u = 8 * w + 4 * hf + j;     // channel CPL g + u
                                af[u / 2][(u & 1) + 2 * k] = v4[j];
                            }
                        }
                    }
                }
#pragma unroll
                for (int i = 0; i < NT; ++i) mma_h16(acc[i], af[i][0], af[i][1], af[i][2], af[i][3], b0, b1);
            }
#endif
            __syncwarp();                               // this stage is refilled PD groups later (PIPE: after its values)
        }
#if PIPE
        if (it > 0) values(pgv, ppk);
#endif
        cp_wait<0>();
    }
    __syncthreads();                                // wo aliases the stages
    TLM(5);
    store_warp<NT, CPL, D, NW>(wo, wm, wl, warp, g, t, m_r, l_r, acc);
    }
    __syncthreads();
    merge_warps<D, NW>(a.opart + ((i64)bh * a.nsplit + sp) * 8 * D, a.lse + ((i64)bh * a.nsplit + sp) * 8, wo, wm, wl);
    TLM(6);
}

// Pi q per query row, divided by a power of two 2^e (e from |q|) so that fp16 holds it at full
// precision for any q, written (BH, 8, D) fp16 with 2^e in qrs. Grid (B * H, D / 32), 256 threads:
// warp r = row r, lane = output channel 32 c + lane; Pi's 32 rows of the chunk through shared memory.
extern "C" __global__ void __launch_bounds__(256) rot_prep(
        const u16* q, i64 sqb, i64 sqh, i64 sqt, const float* pi, u16* qr, float* qrs, int H, int G, int Tq, int M,
        signed char* qi, float* qsig) {
    TLM(0);
    griddep_launch();                               // rot_split's cp.async prologue needs nothing of this kernel
    const int bh = blockIdx.x, c = blockIdx.y, b = bh / H, h = bh % H;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __shared__ float qv[8][D];
    __shared__ float prow[32][D + 1];
    for (int i = threadIdx.x; i < 8 * D; i += 256) {
        const int r = i / D, d = i % D;
        qv[r][d] = r < M ? q2f(q[b * sqb + (h * G + r / Tq) * sqh + (r % Tq) * sqt + d]) : 0.f;
    }
    for (int i = threadIdx.x; i < 32 * (D / 4); i += 256) {
        const int kk = i / (D / 4), d4 = (i % (D / 4)) * 4;
        const float4 v = *(const float4*)(pi + (i64)(c * 32 + kk) * D + d4);
        prow[kk][d4] = v.x; prow[kk][d4 + 1] = v.y; prow[kk][d4 + 2] = v.z; prow[kk][d4 + 3] = v.w;
    }
    __syncthreads();
    float ss = 0.f;
    for (int d = lane; d < D; d += 32) ss += qv[warp][d] * qv[warp][d];
#pragma unroll
    for (int o = 16; o; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    // |(Pi q)_e| <= |q|: scaled so the largest possible entry is below 2^14 (fp16 max 65504)
    const float sc = ss > 0.f ? exp2f(ceilf(0.5f * log2f(ss)) - 13.f) : 1.f;
    float acc4[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int d = 0; d < D; d += 4) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc4[e] += prow[lane][d + e] * qv[warp][d + e];
    }
    const float acc = (acc4[0] + acc4[1]) + (acc4[2] + acc4[3]);
    qr[((i64)bh * 8 + warp) * D + c * 32 + lane] = f2h(acc / sc);
    if (c == 0 && lane == 0) qrs[bh * 8 + warp] = sc;
#if KI8
    // Q = round(Pi q / sigma), |Q| <= 32000 since |(Pi q)_e| <= |q|; digits Q = 256 hi + lo, lo in [-128, 127]
    const float sig = ss > 0.f ? sqrtf(ss) * (1.f / 32000.f) : 0.f;
    const int Q = ss > 0.f ? __float2int_rn(acc / sig) : 0;
    const int hd = (Q + 128) >> 8;
    qi[((i64)bh * 16 + warp) * D + c * 32 + lane] = (signed char)hd;
    qi[((i64)bh * 16 + 8 + warp) * D + c * 32 + lane] = (signed char)(Q - 256 * hd);
    if (c == 0 && lane == 0) qsig[bh * 8 + warp] = sig;
#endif
    TLM(1);
}

// Per (b, kv head, query row): the exact tokens (ring + new) merged with the split partials, which
// are rotated back by Pi first (decode_common.cuh). Grid (B * H, M), D threads.
extern "C" __global__ void __launch_bounds__(D) rot_combine(const Args a, u16* out, i64 sob, i64 soh, i64 sot) {
    combine_body<Args, true>(a, out, sob, soh, sot, a.pi);
}
