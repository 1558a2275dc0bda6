/* Sparse gather: the full-precision conv at a list of output positions (a masked branch's float 3x3)
 * and the scatter-add of a sparse-assisted pair's masked sum. */
#include "bitconv.h"

/* ------------------------------------------------------------------------------------------ */
/* Sparse full-precision convolution (stride 1, zero padding) at a list of output positions     */
/* ------------------------------------------------------------------------------------------ */

/* One output position: acc[o] = bias[o] + sum over channels and valid taps of w * x, with the
 * weight laid out [C][KH][KW][O] so the inner loop over output channels is contiguous.  Up to 32
 * output channels (a multiple of 8) stay in vector registers. */
BZ_CLONES static void sparse_fconv_point(const float *restrict x, int64_t C, int64_t H, int64_t W,
                                         const float *restrict w, const float *restrict bias, int64_t O,
                                         int64_t KH, int64_t KW, int64_t PH, int64_t PW, int64_t DH, int64_t DW,
                                         int64_t oh, int64_t ow, float *restrict acc) {
#if defined(__GNUC__)
    if (O % 8 == 0 && O <= 32) {
        const int nv = (int)(O / 8);
        bz_v8f a[4];
        for (int v = 0; v < nv; ++v) memcpy(&a[v], bias + 8 * v, sizeof a[v]);
        for (int64_t kh = 0; kh < KH; ++kh) {
            const int64_t ih = oh - PH + kh * DH;
            if (ih < 0 || ih >= H) continue;
            for (int64_t kw = 0; kw < KW; ++kw) {
                const int64_t iw = ow - PW + kw * DW;
                if (iw < 0 || iw >= W) continue;
                const float *src = x + ih * W + iw;
                const float *wt = w + (kh * KW + kw) * O;
                for (int64_t c = 0; c < C; ++c) {
                    const float v = src[c * H * W];
                    const float *wc = wt + c * KH * KW * O;
                    for (int q = 0; q < nv; ++q) {
                        bz_v8f wv;
                        memcpy(&wv, wc + 8 * q, sizeof wv);
                        a[q] += wv * v;
                    }
                }
            }
        }
        for (int v = 0; v < nv; ++v) memcpy(acc + 8 * v, &a[v], sizeof a[v]);
        return;
    }
#endif
    for (int64_t o = 0; o < O; ++o) acc[o] = bias[o];
    for (int64_t c = 0; c < C; ++c) {
        const float *plane = x + c * H * W;
        for (int64_t kh = 0; kh < KH; ++kh) {
            const int64_t ih = oh - PH + kh * DH;
            if (ih < 0 || ih >= H) continue;
            for (int64_t kw = 0; kw < KW; ++kw) {
                const int64_t iw = ow - PW + kw * DW;
                if (iw < 0 || iw >= W) continue;
                const float v = plane[ih * W + iw];
                const float *wt = w + ((c * KH + kh) * KW + kw) * O;
                for (int64_t o = 0; o < O; ++o) acc[o] += wt[o] * v;
            }
        }
    }
}

#if defined(BZ_X86) && (defined(__GNUC__) || defined(__clang__))
/* Four positions whose windows lie inside the map, 8 or 16 output channels (nv = O / 8): each
 * weight vector loaded once feeds four positions' fused multiply-adds, with all accumulators in
 * registers.  src[i] points at position i's window origin in channel 0. */
__attribute__((target("avx2,fma"))) static void sparse_fconv_quad(const float *const src[4], int64_t HW,
                                                                   int64_t C, const float *restrict w,
                                                                   const float *restrict bias, int nv,
                                                                   int64_t KH, int64_t KW, int64_t step_h,
                                                                   int64_t step_w, float acc[4][16]) {
    __m256 a00 = _mm256_loadu_ps(bias), a10 = a00, a20 = a00, a30 = a00;
    __m256 a01 = nv > 1 ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps(), a11 = a01, a21 = a01, a31 = a01;
    const int64_t O = 8 * nv;
    for (int64_t kh = 0; kh < KH; ++kh)
        for (int64_t kw = 0; kw < KW; ++kw) {
            const int64_t off = kh * step_h + kw * step_w;
            const float *p0 = src[0] + off, *p1 = src[1] + off, *p2 = src[2] + off, *p3 = src[3] + off;
            const float *wt = w + (kh * KW + kw) * O;
            const int64_t wstep = KH * KW * O;
            if (nv == 2) {
                for (int64_t c = 0; c < C; ++c, wt += wstep) {
                    const __m256 w0 = _mm256_loadu_ps(wt), w1 = _mm256_loadu_ps(wt + 8);
                    const int64_t e = c * HW;
                    __m256 v = _mm256_broadcast_ss(p0 + e);
                    a00 = _mm256_fmadd_ps(w0, v, a00); a01 = _mm256_fmadd_ps(w1, v, a01);
                    v = _mm256_broadcast_ss(p1 + e);
                    a10 = _mm256_fmadd_ps(w0, v, a10); a11 = _mm256_fmadd_ps(w1, v, a11);
                    v = _mm256_broadcast_ss(p2 + e);
                    a20 = _mm256_fmadd_ps(w0, v, a20); a21 = _mm256_fmadd_ps(w1, v, a21);
                    v = _mm256_broadcast_ss(p3 + e);
                    a30 = _mm256_fmadd_ps(w0, v, a30); a31 = _mm256_fmadd_ps(w1, v, a31);
                }
            } else {
                for (int64_t c = 0; c < C; ++c, wt += wstep) {
                    const __m256 w0 = _mm256_loadu_ps(wt);
                    const int64_t e = c * HW;
                    a00 = _mm256_fmadd_ps(w0, _mm256_broadcast_ss(p0 + e), a00);
                    a10 = _mm256_fmadd_ps(w0, _mm256_broadcast_ss(p1 + e), a10);
                    a20 = _mm256_fmadd_ps(w0, _mm256_broadcast_ss(p2 + e), a20);
                    a30 = _mm256_fmadd_ps(w0, _mm256_broadcast_ss(p3 + e), a30);
                }
            }
        }
    _mm256_storeu_ps(acc[0], a00); _mm256_storeu_ps(acc[1], a10);
    _mm256_storeu_ps(acc[2], a20); _mm256_storeu_ps(acc[3], a30);
    if (nv == 2) {
        _mm256_storeu_ps(acc[0] + 8, a01); _mm256_storeu_ps(acc[1] + 8, a11);
        _mm256_storeu_ps(acc[2] + 8, a21); _mm256_storeu_ps(acc[3] + 8, a31);
    }
}

#endif

/* one position's O outputs (+ ReLU) into dst (stride OHW between channels): stored, or with a weight
 * (acc_weight) added as (y * weight) + dst, rounded as the two torch operations */
BZ_INLINE void fconv_store(float *dst, int64_t OHW, const float *acc, int64_t O, int relu, const float *acc_weight,
                           int64_t pos) {
    if (acc_weight) {
        const float wv = acc_weight[pos];
        for (int64_t o = 0; o < O; ++o) {
            const float product = (relu && !(acc[o] > 0.0f) ? 0.0f : acc[o]) * wv;
            dst[o * OHW] = product + dst[o * OHW];
        }
    } else {
        for (int64_t o = 0; o < O; ++o) dst[o * OHW] = relu && !(acc[o] > 0.0f) ? 0.0f : acc[o];
    }
}

/* out[n][o][p] (zeroed by the caller) = conv(x)[n][o][p] (+ ReLU) at the flattened positions
 * n*OH*OW + p; x [N][C][H][W], w [C][KH][KW][O].  acc_weight (nullable, [N][OH*OW]): add instead,
 * out = conv * acc_weight + out (a sparse-assisted pair's masked sum). */
BZ_EXPORT int bz_sparse_fconv(const float *x, int64_t N, int64_t C, int64_t H, int64_t W, const float *w,
                              const float *bias, int64_t O, int64_t KH, int64_t KW, int64_t PH, int64_t PW,
                              int64_t DH, int64_t DW, int64_t OH, int64_t OW, int relu, const int64_t *positions,
                              int64_t npos, const float *acc_weight, float *out, int nthreads) {
    if (N < 1 || C < 1 || O < 1 || O > 4096 || KH < 1 || KW < 1 || OH < 1 || OW < 1) return -1;
    const int parallel = nthreads > 1 && (double)npos * (double)(C * KH * KW * O) >= BZ_CONV_PARALLEL_MIN;
    (void)parallel;
#if defined(BZ_X86) && (defined(__GNUC__) || defined(__clang__))
    const int quad = fma_available();
#else
    const int quad = 0;
#endif
    int status = 0;
#pragma omp parallel num_threads(clamp_threads(nthreads)) if (parallel)
    {
        float *acc = (float *)malloc(sizeof(float) * (size_t)O);
        if (!acc) {
#pragma omp atomic write
            status = -2;
        } else {
            int64_t q;
#pragma omp for schedule(static)
            for (q = 0; q < (npos + 3) / 4; ++q) {
                const int64_t i0 = 4 * q, i1 = (i0 + 4) < npos ? (i0 + 4) : npos;
                int64_t n4[4], pix4[4];
                int inside = i1 - i0 == 4 && quad && O <= 16 && O % 8 == 0;
                for (int64_t i = i0; i < i1; ++i) {
                    const int64_t pos = positions[i], n = pos / (OH * OW), pixel = pos % (OH * OW);
                    const int64_t ih0 = pixel / OW - PH, iw0 = pixel % OW - PW;
                    n4[i - i0] = n;
                    pix4[i - i0] = pixel;
                    inside = inside && n >= 0 && n < N && ih0 >= 0 && ih0 + (KH - 1) * DH < H && iw0 >= 0 &&
                             iw0 + (KW - 1) * DW < W;
                }
#if defined(BZ_X86) && (defined(__GNUC__) || defined(__clang__))
                if (inside) {
                    const float *src[4];
                    float acc4[4][16];
                    for (int i = 0; i < 4; ++i)
                        src[i] = x + n4[i] * C * H * W + (pix4[i] / OW - PH) * W + (pix4[i] % OW - PW);
                    sparse_fconv_quad(src, H * W, C, w, bias, (int)(O / 8), KH, KW, DH * W, DW, acc4);
                    for (int i = 0; i < 4; ++i)
                        fconv_store(out + n4[i] * O * OH * OW + pix4[i], OH * OW, acc4[i], O, relu, acc_weight,
                                    n4[i] * OH * OW + pix4[i]);
                    continue;
                }
#endif
                for (int64_t i = i0; i < i1; ++i) {
                    const int64_t n = n4[i - i0], pixel = pix4[i - i0];
                    if (n < 0 || n >= N) continue;
                    sparse_fconv_point(x + n * C * H * W, C, H, W, w, bias, O, KH, KW, PH, PW, DH, DW, pixel / OW,
                                       pixel % OW, acc);
                    fconv_store(out + n * O * OH * OW + pixel, OH * OW, acc, O, relu, acc_weight, n * OH * OW + pixel);
                }
            }
            free(acc);
        }
    }
    return status;
}

/* out[n][c][p] = vals[c][k] * weights[k] + out[n][c][p] at the K positions n*P + p (each listed
 * once): the masked sum of a sparse-assisted pair, with the float model's rounding (product, then sum).
 * Positions are split into (sample, pixel) once, not once per channel (64-bit divisions are slow). */
BZ_EXPORT int bz_masked_add(float *out, int64_t N, int64_t C, int64_t P, const float *vals, const float *weights,
                            const int64_t *positions, int64_t K, int nthreads) {
    if (N < 1 || C < 1 || P < 1 || K < 0) return -1;
    int64_t *offset = (int64_t *)malloc(sizeof(int64_t) * (size_t)(K + 1));
    if (!offset) return -2;
    for (int64_t k = 0; k < K; ++k) {
        const int64_t pos = positions[k];
        const int64_t n = pos / P;
        offset[k] = (n < 0 || n >= N) ? -1 : n * C * P + pos % P; /* element (n, 0, p) */
    }
    /* channels write disjoint planes: split them over the threads */
    const int parallel = nthreads > 1 && C > 1 && C * K >= BZ_PACK_PARALLEL_MIN;
    (void)parallel;
    int64_t c;
#pragma omp parallel for schedule(static) num_threads(clamp_threads(nthreads)) if (parallel)
    for (c = 0; c < C; ++c) {
        const float *v = vals + c * K;
        float *plane = out + c * P;
        for (int64_t k = 0; k < K; ++k) {
            if (offset[k] < 0) continue;
            float *dst = plane + offset[k];
            const float product = v[k] * weights[k];
            *dst = product + *dst;
        }
    }
    free(offset);
    return 0;
}
