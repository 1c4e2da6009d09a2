// Decode attention over the QJL-compressed cache (codec 0), CUDA C++ for sm_80+ (tuned on sm_90).
//
// Compiled by NVRTC at first use (kernels/cuda/__init__.py) with the shapes as macros:
//   D head_dim, MS / MO sketch rows (inlier / outlier, multiples of 128; MO may be 0), NO outlier
//   channels (1..8, 0 = none), VB value bits (2, 4), VG value group, RR residual window, NW warps
//   per CTA, QDT 0 fp16 / 1 bf16 (q, ring and new tokens), MK mask kind, CAUSAL (exact part) and
//   CAUSAL_C (compressed part: only when fewer new tokens than queries). Side data is fp16.
//
// Why it looks like this (benchmarks/NOTES_kernels.md section 6): the Triton kernels unpacked every
// code into an MMA operand through shared memory (~190 warp-instructions per compressed token, the
// byte floor allows ~25). Here each thread turns its own 32-bit words into MMA fragments in
// registers:
//   * keys: tokens on the MMA M side, sign bits as u8 0/1 (one SHF + LOP3 per 4 signs), the query
//     sketch S q as a 16-bit fixed-point number in two int8 planes (hi s8, lo u8), int8 mma.sync
//     m16n8k32: <S q, sign> = 2 sum_k b_k Q_k - sum_k Q_k, exact in int32. The K order of the
//     fragments is chosen so that no bit moves between threads; S q (prep kernel) and the sketch
//     columns (Python, once per layer) are stored in that order.
//   * outliers (per 32-token group g, channels idx_g): the same sign fragments times the sketch
//     columns S[:, idx_g] (B operand, n = 8 channels) give T_jc = <S[:, c], sign_j>; the score is
//     c_in n_j (<S q, sign_j> - sum_c q_c T_jc) + c_out on_j sum_c q_c To_jc, the last sums one
//     m16n8k8 fp16 MMA whose A operand is the T accumulator re-packed in place (same layout).
//   * values: codes -> fp16 by the 0x6400 magic (LOP3) and one FMA that removes it exactly, then
//     scale/zero (HFMA2); P goes from the score accumulator to the B operand by movmatrix.
// One CTA per (batch*kv head, split); each warp walks its own 32-token groups with its own online
// softmax and writes a partial (o, lse); the combine attends the exact tokens (ring + new) and merges.

#include "decode_common.cuh"

#ifndef NW
#define NW 4
#endif
#define NCH (MS / 32)
#define WPL (MS / 128)
#define NCHO (MO / 32)
#define WPLO (MO / 128)
#define CPL (D / 8)             // value channels per lane group (g)
#define CB (CPL * VB / 8)       // code bytes per lane group and token
#define NT (D / 16)             // value M-tiles
#define EPL (D / 32)            // channels per lane in the exact part


struct Args {
    const u16* q; i64 sqb, sqh, sqt;
    const i64* len;
    const u16* rk; const u16* rv; i64 srb, srh, srt;
    const u16* kn; const u16* vn; i64 snb, snh, snt;
    const u8* kbits; const u16* knorm; const u8* kobits; const u16* konorm; const u8* kidx;
    const u8* vcode; const u16* vscale; const u16* vzero;
    const uint4* sqf;        // (BH, NCH, 32) S q planes in B-fragment order (prep kernel)
    const int* sqsum;        // (BH, 8) sum_k Q_k per row
    const float* sqsig;      // (BH, 8) fixed-point step per row
    const uint4* scol;       // (D, NCH, 4) sketch columns, B-fragment order
    const int* scsum;        // (D) column sums of the quantized sketch
    const uint4* socol;      // (D, NCHO, 4) outlier sketch columns
    const int* socsum;
    const void* mask; i64 smb, smh, smt, sml;
    float* opart; float* lse;
    float sig_s, sig_so, qk_scale, c_in, c_out;
    int H, G, Tq, T, M, LC, chunk, nsplit, mask_kind, causal;
};

// one chunk c of 32 sketch rows for the 16 tokens of a tile: rows g (words wg) and g+8 (w8)
#define AFRAG(wg, w8, c)                                                   \
    const u32 y0 = (c) % 4 ? shr_((wg)[(c) / 4], 2 * ((c) % 4)) : (wg)[(c) / 4];   \
    const u32 y8 = (c) % 4 ? shr_((w8)[(c) / 4], 2 * ((c) % 4)) : (w8)[(c) / 4];   \
    const u32 a0 = y0 & 0x01010101u, a1 = y8 & 0x01010101u;                \
    const u32 a2 = shr_(y0, 1) & 0x01010101u, a3 = shr_(y8, 1) & 0x01010101u;

#ifndef STAGES
#define STAGES 3
#endif
// one 32-token group in shared memory (bytes): signs, outlier signs, norms, outlier channels,
// value codes, scales, zeros, each the contiguous rows of the global buffer
#define ST_BITS 0
#define ST_OBITS (ST_BITS + 32 * (MS / 8))
#define ST_NORM (ST_OBITS + 32 * (MO / 8))
#define ST_ONORM (ST_NORM + 64)
#define ST_IDX (ST_ONORM + 64)
#define ST_CODE (ST_IDX + 16)
#define ST_SCALE (ST_CODE + 32 * (D * VB / 8))
#define ST_ZERO (ST_SCALE + 64 * (D / VG))
#define ST_SIZE (ST_ZERO + 64 * (D / VG))

// the cp.async streams of a group (decode_common.cuh CpStream), positioned at token row `row` (b, h, position)
struct Streams {
    CpStream<MS / 8, ST_BITS, NW> bits;
    CpStream<2, ST_NORM, NW> norm;
#if MO > 0
    CpStream<MO / 8, ST_OBITS, NW> obits;
    CpStream<2, ST_ONORM, NW> onorm;
#endif
    const u8* idx;          // the group's NO outlier channels (NO bytes a group)
    CpStream<D * VB / 8, ST_CODE, NW> code;
    CpStream<2 * (D / VG), ST_SCALE, NW> scale;
    CpStream<2 * (D / VG), ST_ZERO, NW> zero;
    __device__ __forceinline__ Streams(const Args& a, i64 row, int lane)
        : bits(a.kbits, row, lane), norm(a.knorm, row, lane),
#if MO > 0
          obits(a.kobits, row, lane), onorm(a.konorm, row, lane),
#endif
          idx(a.kidx + row / 32 * NO), code(a.vcode, row, lane), scale(a.vscale, row, lane), zero(a.vzero, row, lane) {}
    __device__ __forceinline__ void issue(u32 st, int lane) const {
        bits.issue(st, lane); norm.issue(st, lane);
#if MO > 0
        obits.issue(st, lane); onorm.issue(st, lane);
#endif
#if NO == 8
        if (lane == 0) cp8s(st + ST_IDX, idx);
#elif NO > 0
        // not 4-byte aligned: a plain copy (st: this lane's address, 16 lane past the stage)
        if (lane < NO) asm volatile("st.shared.u8 [%0], %1;" :: "r"(st - 15 * lane + ST_IDX), "h"((u16)idx[lane]));
#endif
        code.issue(st, lane); scale.issue(st, lane); zero.issue(st, lane);
    }
    __device__ __forceinline__ void step() {
        bits.step(); norm.step();
#if MO > 0
        obits.step(); onorm.step();
#endif
        idx += NW * NO;
        code.step(); scale.step(); zero.step();
    }
};

#ifndef MINB
#define MINB 1
#endif
#ifndef SQ_SMEM
#define SQ_SMEM 1
#endif
// PK=1 (at most 4 query rows per kv head, e.g. GQA 4 at decode): both 8-bit planes of S q in one B
// operand, high plane in columns 0-3, low plane (signed) in columns 4-7, so one MMA per chunk and
// tile instead of two; the low half comes back from lane + 2 by one shuffle. Fragments are 8 bytes.
#ifndef PK
#define PK 0
#endif
#if PK
typedef uint2 SQT;
#define QMAX 32639              // hi = (Q + 128) >> 8 stays in s8
#else
typedef uint4 SQT;
#define QMAX 32767
#endif
extern "C" __global__ void __launch_bounds__(NW * 32, MINB) qjl_split(const Args a) {
    const int bh = blockIdx.x, sp = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int b = bh / a.H, h = bh % a.H;
    const int n = (int)a.len[0];
    const int c1 = n / RR * RR;
    const int cl = min(c1, n - a.T);
    const int lo = sp * a.chunk;
    const int hi = min(lo + a.chunk, cl);
    const i64 tb = (i64)bh * a.LC;                  // this (b, h)'s rows of every buffer
    TLM(2);
    griddep_launch();                               // qjl_combine's exact part needs nothing of this kernel

    __shared__ float qf[8][D];
    __shared__ u16 qhs[8][D];
#if STAGES
    extern __shared__ __align__(16) u8 dsm[];       // max(NW * STAGES * ST_SIZE, NW * 8 * D * 4) bytes (launcher)
    // each warp streams its groups through STAGES shared-memory buffers (cp.async), so the loads of
    // the next groups are in flight while this one is computed; the first ones before anything of
    // qjl_prep's is waited for (PDL)
    u8* wst = dsm + warp * (STAGES * ST_SIZE);
    const u32 sb = smem_addr(wst) + 16 * lane;
    Streams cps(a, tb + lo + warp * 32, lane);
    stream_prologue<STAGES, NW, ST_SIZE>(cps, sb, lo, hi, warp, lane);
#endif
    for (int i = threadIdx.x; i < 8 * D; i += NW * 32) {
        const int r = i / D, d = i % D;
        float v = 0.f;
        if (r < a.M) v = q2f(a.q[b * a.sqb + (h * a.G + r / a.Tq) * a.sqh + (r % a.Tq) * a.sqt + d]);
        qf[r][d] = v;
        qhs[r][d] = f2h(v);
    }
    griddep_wait();                                 // sqf, sqsig: qjl_prep's
    TLM(3);
#if SQ_SMEM
    // S q fragments of this (b, h), shared by the CTA's warps (registers otherwise: SQ_SMEM=0)
    __shared__ SQT sqs[NCH][32];
    for (int i = threadIdx.x; i < NCH * 32; i += NW * 32) sqs[i / 32][i % 32] = ((const SQT*)a.sqf)[(i64)bh * NCH * 32 + i];
#endif
    // sum_k Q_k per query row, from the fragments (row r = lanes 4r .. 4r + 3 of every chunk)
#if NO > 0
    // column sums of the sketches at the outlier channels: read per group, so kept on chip
    __shared__ int scs[D], socs[D];
    for (int i = threadIdx.x; i < D; i += NW * 32) { scs[i] = a.scsum[i]; socs[i] = MO > 0 ? a.socsum[i] : 0; }
#endif
    __shared__ int qsum[8];
#if SQ_SMEM
    __syncthreads();                                // sqs
#endif
    if (threadIdx.x < 32) {
        const int r = threadIdx.x >> 2;
        int sum = 0;
#pragma unroll
        for (int c = 0; c < NCH; ++c) {
#if PK
            // row r < 4: high plane at lanes 4r + tt, low plane (signed) at lanes 16 + 4r + tt
            if (r >= 4) break;
#if SQ_SMEM
            const SQT fh = sqs[c][threadIdx.x], fl = sqs[c][threadIdx.x + 16];
#else
            const SQT fh = ((const SQT*)a.sqf)[((i64)bh * NCH + c) * 32 + threadIdx.x];
            const SQT fl = ((const SQT*)a.sqf)[((i64)bh * NCH + c) * 32 + threadIdx.x + 16];
#endif
            const u32 hw[2] = {fh.x, fh.y}, lw[2] = {fl.x, fl.y};
#pragma unroll
            for (int w = 0; w < 2; ++w)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    sum += 256 * (int)(signed char)((hw[w] >> (8 * e)) & 255) + (int)(signed char)((lw[w] >> (8 * e)) & 255);
#else
#if SQ_SMEM
            const SQT f = sqs[c][threadIdx.x];
#else
            const SQT f = ((const SQT*)a.sqf)[((i64)bh * NCH + c) * 32 + threadIdx.x];
#endif
            const u32 hw[2] = {f.x, f.y}, lw[2] = {f.z, f.w};
#pragma unroll
            for (int w = 0; w < 2; ++w)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    sum += 256 * (int)(signed char)((hw[w] >> (8 * e)) & 255) + (int)((lw[w] >> (8 * e)) & 255);
#endif
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        if ((threadIdx.x & 3) == 0) qsum[r] = sum;
    }
    __syncthreads();
    TLM(4);

    // every warp leaves its (m, l, unnormalized acc) here; the CTA merges them into one partial
    __shared__ float wm[NW][8], wl[NW][8];
#if STAGES
    float (*wo)[8][D] = (float (*)[8][D])dsm;       // the stages are free by then (launcher sizes dsm for both)
#else
    __shared__ float wo[NW][8][D];
#endif
    const int nslot = a.nsplit;

    {
    // ---- compressed tokens [lo, hi) of this split ----
    float m_r[2] = {-INFINITY, -INFINITY}, mu_r[2] = {0.f, 0.f}, l_r[2] = {0.f, 0.f};
    float acc[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

    if (lo + warp * 32 < hi) {
#if SQ_SMEM
#define SQF(c) sqs[c][lane]
#else
        SQT sqf[NCH];
#pragma unroll
        for (int c = 0; c < NCH; ++c) sqf[c] = ((const SQT*)a.sqf)[((i64)bh * NCH + c) * 32 + lane];
#define SQF(c) sqf[c]
#endif
        const int sq0 = qsum[2 * t], sq1 = qsum[2 * t + 1];
        const float sg0 = a.sqsig[bh * 8 + 2 * t], sg1 = a.sqsig[bh * 8 + 2 * t + 1];
#if NO > 0
        const uint4* scol = a.scol + t;
#if MO > 0
        const uint4* socol = a.socol + t;
#endif
#endif
        const int vgrp = (CPL * g) / VG;                // this lane group's value scale group
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

#if STAGES
        int it = 0;
#endif
        for (int g0 = lo + warp * 32; g0 < hi; g0 += NW * 32) {
            const bool tail = g0 + 32 > hi;             // warp-uniform: only the last group is partial
#if STAGES
            const u8* gst = wst + (it % STAGES) * ST_SIZE;
            {
                const int gg = g0 + (STAGES - 1) * NW * 32;
                if (gg < hi) cps.issue(sb + ((it + STAGES - 1) % STAGES) * ST_SIZE, lane);
                cps.step();
                cp_commit();
                cp_wait<STAGES - 1>();
                __syncwarp();
            }
            ++it;
            const u8* G_BITS = gst + ST_BITS;
            const u8* G_OBITS = gst + ST_OBITS;
            const u16* G_NORM = (const u16*)(gst + ST_NORM);
            const u16* G_ONORM = (const u16*)(gst + ST_ONORM);
            const u8* G_IDX = gst + ST_IDX;
            const u8* G_CODE = gst + ST_CODE;
            const u16* G_SCALE = (const u16*)(gst + ST_SCALE);
            const u16* G_ZERO = (const u16*)(gst + ST_ZERO);
#else
            const u8* G_BITS = a.kbits + (tb + g0) * (MS / 8);
            const u8* G_OBITS = a.kobits + (tb + g0) * (MO / 8);
            const u16* G_NORM = a.knorm + tb + g0;
            const u16* G_ONORM = a.konorm + tb + g0;
            const u8* G_IDX = a.kidx + (tb + g0) / 32 * NO;
            const u8* G_CODE = a.vcode + (tb + g0) * (D * VB / 8);
            const u16* G_SCALE = a.vscale + (tb + g0) * (D / VG);
            const u16* G_ZERO = a.vzero + (tb + g0) * (D / VG);
#endif
            // value codes and scales of both tiles first, so their latency overlaps the scoring.
            // This lane's tokens p+2t, p+2t+1, p+2t+8, p+2t+9: code bytes of lane group g
            u32 cwt[2][4][(CB + 3) / 4], sct[2][2], zrt[2][2];
#pragma unroll
            for (int tt = 0; tt < 2; ++tt) {
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    const u8* cp = G_CODE + (16 * tt + 2 * t + (k & 1) + 8 * (k >> 1)) * (D * VB / 8) + CB * g;
                    if constexpr (CB == 2) cwt[tt][k][0] = *(const u16*)cp;
                    else if constexpr (CB == 4) cwt[tt][k][0] = *(const u32*)cp;
                    else { const uint2 v = *(const uint2*)cp; cwt[tt][k][0] = v.x; cwt[tt][k][1] = v.y; }
                }
#pragma unroll
                for (int k = 0; k < 2; ++k) {
                    const int o = (16 * tt + 2 * t + 8 * k) * (D / VG) + vgrp;
                    sct[tt][k] = (u32)G_SCALE[o] | ((u32)G_SCALE[o + D / VG] << 16);
                    zrt[tt][k] = (u32)G_ZERO[o] | ((u32)G_ZERO[o + D / VG] << 16);
                }
            }
#if NO > 0
            u64 idx8;
            if constexpr (NO == 8) idx8 = *(const u64*)G_IDX;
            else { idx8 = 0;
#pragma unroll
                for (int o = 0; o < NO; ++o) idx8 |= (u64)G_IDX[o] << (8 * o); }
            const int col = (int)((idx8 >> (8 * g)) & 255);          // B operand column n = g
            const int ch0 = (int)((idx8 >> (16 * t)) & 255), ch1 = (int)((idx8 >> (16 * t + 8)) & 255);
            // q at the group's outlier channels: B of the m16n8k8 (k = slots 2t, 2t+1; n = row g)
            const u32 qsel = (u32)(2 * t < NO ? qhs[g][ch0] : (u16)0) | ((u32)(2 * t + 1 < NO ? qhs[g][ch1] : (u16)0) << 16);
            const int cs0 = scs[ch0], cs1 = scs[ch1];
#if MO > 0
            const int co0 = socs[ch0], co1 = socs[ch1];
#endif
#endif
            // both 16-token tiles per sketch chunk: each chunk's S q and sketch-column fragments are
            // loaded once and feed 4 (8 with outliers) MMAs
            u32 wg[2][WPL], w8[2][WPL];
            float n0s[2], n8s[2];
            int rh[2][4], rl[2][4];
#if NO > 0
            int th[2][4], tl[2][4];
#endif
#pragma unroll
            for (int tt = 0; tt < 2; ++tt) {
                load_words<WPL>(wg[tt], G_BITS + (16 * tt + g) * (MS / 8) + 4 * WPL * t);
                load_words<WPL>(w8[tt], G_BITS + (16 * tt + g + 8) * (MS / 8) + 4 * WPL * t);
                n0s[tt] = h2f(G_NORM[16 * tt + g]); n8s[tt] = h2f(G_NORM[16 * tt + g + 8]);
#pragma unroll
                for (int e = 0; e < 4; ++e) { rh[tt][e] = rl[tt][e] = 0;
#if NO > 0
                    th[tt][e] = tl[tt][e] = 0;
#endif
                }
            }
            // main products first (their operands are in shared memory), then the outlier parts, whose
            // sketch-column fragments come from L1/L2 and were issued at the top of the group
#pragma unroll
            for (int c = 0; c < NCH; ++c) {
                const SQT bq = SQF(c);
#pragma unroll
                for (int tt = 0; tt < 2; ++tt) {
                    AFRAG(wg[tt], w8[tt], c)
                    mma_us(rh[tt], a0, a1, a2, a3, bq.x, bq.y);
#if !PK
                    mma_uu(rl[tt], a0, a1, a2, a3, bq.z, bq.w);
#endif
                }
            }
#if NO > 0 && MO > 0
            int oh[2][4], ol[2][4];
            {
                u32 og[2][WPLO], o8[2][WPLO];
#pragma unroll
                for (int tt = 0; tt < 2; ++tt) {
                    load_words<WPLO>(og[tt], G_OBITS + (16 * tt + g) * (MO / 8) + 4 * WPLO * t);
                    load_words<WPLO>(o8[tt], G_OBITS + (16 * tt + g + 8) * (MO / 8) + 4 * WPLO * t);
#pragma unroll
                    for (int e = 0; e < 4; ++e) oh[tt][e] = ol[tt][e] = 0;
                }
#pragma unroll
                for (int c = 0; c < NCHO; ++c) {
                    const uint4 bs = socol[(col * NCHO + c) * 4];
#pragma unroll
                    for (int tt = 0; tt < 2; ++tt) {
                        AFRAG(og[tt], o8[tt], c)
                        mma_us(oh[tt], a0, a1, a2, a3, bs.x, bs.y);
                        mma_uu(ol[tt], a0, a1, a2, a3, bs.z, bs.w);
                    }
                }
            }
#endif
#if NO > 0
#pragma unroll
            for (int c = 0; c < NCH; ++c) {
                const uint4 bs = scol[(col * NCH + c) * 4];
#pragma unroll
                for (int tt = 0; tt < 2; ++tt) {
                    AFRAG(wg[tt], w8[tt], c)
                    mma_us(th[tt], a0, a1, a2, a3, bs.x, bs.y);
                    mma_uu(tl[tt], a0, a1, a2, a3, bs.z, bs.w);
                }
            }
#endif
#if PK
            // columns 4-7 (lanes t = 2, 3) hold the low plane of rows 0-3 (lanes t = 0, 1); lanes t >= 2
            // are left with finite junk in rows 4-7, which no one reads (rows >= M)
#pragma unroll
            for (int tt = 0; tt < 2; ++tt)
#pragma unroll
                for (int e = 0; e < 4; ++e) rl[tt][e] = __shfl_down_sync(0xffffffffu, rh[tt][e], 2);
#endif
            float s[2][4];
#pragma unroll
            for (int tt = 0; tt < 2; ++tt) {
                const int p = g0 + 16 * tt;
                const float n0 = n0s[tt], n8 = n8s[tt];
                float corr[4] = {0.f, 0.f, 0.f, 0.f};
#if NO > 0
                float W[4];
                const float ci0 = -a.c_in * a.sig_s * n0, ci8 = -a.c_in * a.sig_s * n8;
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    W[e] = (e < 2 ? ci0 : ci8) * (float)(2 * (th[tt][e] * 256 + tl[tt][e]) - ((e & 1) ? cs1 : cs0));
#if MO > 0
                {
                    const float co_0 = a.c_out * a.sig_so * h2f(G_ONORM[16 * tt + g]), co_8 = a.c_out * a.sig_so * h2f(G_ONORM[16 * tt + g + 8]);
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        W[e] += (e < 2 ? co_0 : co_8) * (float)(2 * (oh[tt][e] * 256 + ol[tt][e]) - ((e & 1) ? co1 : co0));
                }
#endif
                mma_h8(corr, pack2(W[0], W[1]), pack2(W[2], W[3]), qsel);
#endif
                const float f00 = a.c_in * a.qk_scale * n0 * sg0, f01 = a.c_in * a.qk_scale * n0 * sg1;
                const float f80 = a.c_in * a.qk_scale * n8 * sg0, f81 = a.c_in * a.qk_scale * n8 * sg1;
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float f = e == 0 ? f00 : e == 1 ? f01 : e == 2 ? f80 : f81;
                    s[tt][e] = f * (float)(2 * (rh[tt][e] * 256 + rl[tt][e]) - ((e & 1) ? sq1 : sq0)) + corr[e] * a.qk_scale;
                }
#if MK == 3 || MK == 4
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
                if (tail) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) if (p + g + 8 * (e >> 1) >= hi) s[tt][e] = -INFINITY;
                }
            }
            // online softmax over the group's 32 tokens; rows 2t + j live on the 8 lanes of equal t
            float pr[2][4];
            softmax_step<NT>(s, m_r, mu_r, l_r, pr, acc);
            // values: out^T (D x rows) += V^T (D x tokens) P^T (tokens x rows), per 16-token tile
#pragma unroll
            for (int tt = 0; tt < 2; ++tt) {
                const int p = g0 + 16 * tt;
                const u32 b0 = movt(pack2(pr[tt][0], pr[tt][1]));   // tokens 2t, 2t+1 of row g
                const u32 b1 = movt(pack2(pr[tt][2], pr[tt][3]));   // tokens 2t+8, 2t+9
                const u32 (&cw)[4][(CB + 3) / 4] = cwt[tt];
                const u32 (&sc2)[2] = sct[tt];
                const u32 (&zr2)[2] = zrt[tt];
                u32 af[NT][4];   // A fragments: [tile][a0a1 (ch row g, tok 2t..), a2a3 (row g+8), a4a5 (g, tok 2t+8..), a6a7]
#pragma unroll
                for (int beta = 0; beta < CB; ++beta) {
                    const u32 sel = (beta & 3) | ((beta & 3) << 4) | ((4 + (beta & 3)) << 8) | ((4 + (beta & 3)) << 12);
#pragma unroll
                    for (int k = 0; k < 2; ++k) {       // token pair k: (2t, 2t+1) + 8k
                        const u32 x = prmt(cw[2 * k][beta / 4], cw[2 * k + 1][beta / 4], sel);
#pragma unroll
                        for (int j = 0; j < 8 / VB; ++j) {
                            const u32 msk = (((1u << VB) - 1) << (VB * j)) * 0x00010001u;
                            const u32 hv = (x & msk) | 0x64006400u;          // 1024 + c * 2^(VB j)
                            // c = hv * 2^-(VB j) - 1024 * 2^-(VB j), exact (one rounding of an fp16 integer)
                            const u32 kmul = (u32)(0x3C00 - 0x400 * VB * j) * 0x00010001u;
                            const u32 kadd = (u32)(0xE400 - 0x400 * VB * j) * 0x00010001u;
                            const u32 cv = hfma2(hv, kmul, kadd);
                            const u32 v = hfma2(cv, sc2[k], zr2[k]);
                            const int u = beta * (8 / VB) + j;         // channel CPL g + u
                            af[u / 2][(u & 1) + 2 * k] = v;
                        }
                    }
                }
#pragma unroll
                for (int i = 0; i < NT; ++i) mma_h16(acc[i], af[i][0], af[i][1], af[i][2], af[i][3], b0, b1);
            }
#if STAGES
            __syncwarp();                               // this stage is refilled STAGES - 1 groups later
#endif
        }
#if STAGES
        cp_wait<0>();
#endif
    }
#if STAGES
    __syncthreads();                                // wo aliases the stages
    TLM(5);
#endif
    store_warp<NT, CPL, D, NW>(wo, wm, wl, warp, g, t, m_r, l_r, acc);
    }  // compressed split
    __syncthreads();
    merge_warps<D, NW>(a.opart + ((i64)bh * nslot + sp) * 8 * D, a.lse + ((i64)bh * nslot + sp) * 8, wo, wm, wl);
    TLM(6);
}

// S q per query row in the K order of the key fragments, as 16-bit fixed point split into an s8
// high plane and a u8 low plane, written in B-fragment order: (BH, NCH, 32 lanes) x 16 bytes (PK=1: x 8
// bytes, lane 4r + t the high plane of row r, lane 16 + 4r + t its signed low plane)
// (b0 hi, b1 hi, b0 lo, b1 lo). Sp = the sketch rows in that K order (qjl.py sketch_rows). Every sketch row has
// norm sqrt(D), so |S q|_k <= sqrt(D) |q|: the step sqrt(D) |q| / 32767 needs no pass over S q, and
// one CTA per (b, h, chunk of 32 positions) runs independently. Grid (B * H, NCH), 256 threads.
extern "C" __global__ void __launch_bounds__(256) qjl_prep(
        const u16* q, i64 sqb, i64 sqh, i64 sqt, const float* Sp,
        u8* sqf, float* sqsig, int H, int G, int Tq, int M) {
    TLM(0);
    griddep_launch();                               // qjl_split's cp.async prologue needs nothing of this kernel
    const int bh = blockIdx.x, c = blockIdx.y, b = bh / H, h = bh % H;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __shared__ float qs[8][D];
    __shared__ float srows[32][D + 1];      // +1: thread kk reads row kk, conflict-free
    __shared__ float sig[8];
    for (int i = threadIdx.x; i < 8 * D; i += 256) {
        const int r = i / D, d = i % D;
        qs[r][d] = r < M ? q2f(q[b * sqb + (h * G + r / Tq) * sqh + (r % Tq) * sqt + d]) : 0.f;
    }
    // the chunk's 32 sketch rows, coalesced (a row per thread from global would be 32 sectors per load)
    for (int i = threadIdx.x; i < 32 * (D / 4); i += 256) {
        const int kk = i / (D / 4), d4 = (i % (D / 4)) * 4;
        const float4 v = *(const float4*)(Sp + (i64)(c * 32 + kk) * D + d4);
        srows[kk][d4] = v.x; srows[kk][d4 + 1] = v.y; srows[kk][d4 + 2] = v.z; srows[kk][d4 + 3] = v.w;
    }
    __syncthreads();
    {   // warp r: the step of row r
        float ss = 0.f;
        for (int d = lane; d < D; d += 32) ss += qs[warp][d] * qs[warp][d];
#pragma unroll
        for (int o = 16; o; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        const float st = sqrtf((float)D * ss) * (1.f / QMAX) * 1.0001f;
        if (lane == 0) { sig[warp] = st > 0.f ? st : 1.f; if (c == 0) sqsig[bh * 8 + warp] = st > 0.f ? st : 1.f; }
    }
    const int r = warp, kk = lane;                        // thread: row r, position c*32 + kk
    float acc4[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int d = 0; d < D; d += 4) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc4[e] += srows[kk][d + e] * qs[r][d + e];
    }
    __syncthreads();
    const float acc = (acc4[0] + acc4[1]) + (acc4[2] + acc4[3]);
    const int Q = max(-QMAX, min(QMAX, __float2int_rn(acc / sig[r])));
    const int tt = (kk % 16) / 4, e = kk % 4, half = kk / 16;
#if PK
    if (r < 4) {
        const int qh = (Q + 128) >> 8, ql = Q - 256 * qh;          // ql in [-128, 127]
        u8* base = sqf + (((i64)bh * NCH + c) * 32 + 4 * r + tt) * 8;
        base[half * 4 + e] = (u8)qh;
        base[16 * 8 + half * 4 + e] = (u8)ql;                      // lane + 16: column n = r + 4
    }
#else
    u8* base = sqf + (((i64)bh * NCH + c) * 32 + 4 * r + tt) * 16;
    base[half * 4 + e] = (u8)(Q >> 8);
    base[8 + half * 4 + e] = (u8)(Q & 255);
#endif
    TLM(1);
}

// Per (b, kv head, query row): the exact tokens merged with the split partials (decode_common.cuh)
extern "C" __global__ void __launch_bounds__(D) qjl_combine(const Args a, u16* out, i64 sob, i64 soh, i64 sot) {
    combine_body<Args, false>(a, out, sob, soh, sot, nullptr);
}
