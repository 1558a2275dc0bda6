/* Resampling of float maps: 2x2 average pooling, 2x bilinear up-sampling and the Deep Guided Filter's
 * full-resolution step. */
#include "bitconv.h"


/* One output row of a 2x2 / stride-2 average pool with ceil mode and no padding: each window's
 * valid values are summed in PyTorch's order (row by row, left to right) and divided by their
 * count, so the result equals torch's avg_pool2d bit for bit.  r1 is NULL on a last, odd row. */
BZ_CLONES static void avgpool_row(const float *r0, const float *r1, float *dst, int64_t W) {
    const int64_t full = W / 2;
    if (r1) {
        for (int64_t o = 0; o < full; ++o) {
            float s = r0[2 * o];
            s += r0[2 * o + 1];
            s += r1[2 * o];
            s += r1[2 * o + 1];
            dst[o] = s / 4.0f;
        }
        if (W & 1) { float s = r0[W - 1]; s += r1[W - 1]; dst[full] = s / 2.0f; }
    } else {
        for (int64_t o = 0; o < full; ++o) {
            float s = r0[2 * o];
            s += r0[2 * o + 1];
            dst[o] = s / 2.0f;
        }
        if (W & 1) dst[full] = r0[W - 1];
    }
}

/* out [NC][ceil(H/2)][ceil(W/2)] = 2x2 average of x [NC][H][W] (ceil mode, padding excluded) */
BZ_EXPORT int bz_avgpool2x2(const float *x, float *out, int64_t NC, int64_t H, int64_t W, int nthreads) {
    if (NC < 0 || H < 1 || W < 1) return -1;
    const int64_t OH = (H + 1) / 2, OW = (W + 1) / 2;
    const int parallel = nthreads > 1 && NC * H * W >= BZ_PACK_PARALLEL_MIN;
    (void)parallel;
    int64_t job;
#pragma omp parallel for schedule(static) num_threads(clamp_threads(nthreads)) if (parallel)
    for (job = 0; job < NC * OH; ++job) {
        const int64_t plane = job / OH, oh = job % OH;
        const float *r0 = x + (plane * H + 2 * oh) * W;
        avgpool_row(r0, 2 * oh + 1 < H ? r0 + W : NULL, out + job * OW, W);
    }
    return 0;
}

/* Source rows h0, h1 and weights of output row oh of a 2x bilinear up-sampling of H rows
 * (align_corners=False: 0.25 / 0.75, the first row copies row 0, the last row is clamped). */
void upsample_source_rows(int64_t oh, int64_t H, int64_t *h0, int64_t *h1, float *lh0, float *lh1) {
    if (oh == 0) { *h0 = 0; *lh0 = 1.0f; *lh1 = 0.0f; }
    else if (oh & 1) { *h0 = oh / 2; *lh0 = 0.75f; *lh1 = 0.25f; }
    else { *h0 = oh / 2 - 1; *lh0 = 0.25f; *lh1 = 0.75f; }
    *h1 = *h0 + (*h0 < H - 1 ? 1 : 0);
}

/* One output row of the 2x bilinear up-sampling (align_corners=False): the weights of a 2x
 * scale are 0.25 / 0.75 (1 / 0 on the first row and column), computed as PyTorch does:
 * lh0 * (lw0 * a + lw1 * b) + lh1 * (lw0 * c + lw1 * d). */
BZ_CLONES void upsample_row(const float *r0, const float *r1, float lh0, float lh1, float *dst,
                                   int64_t W) {
    /* first output column: source column 0 with weights (1, 0) */
    dst[0] = lh0 * (1.0f * r0[0] + 0.0f * r0[W > 1 ? 1 : 0]) + lh1 * (1.0f * r1[0] + 0.0f * r1[W > 1 ? 1 : 0]);
    for (int64_t i = 0; i + 1 < W; ++i) {
        /* output 2i+1: columns (i, i+1) weights (0.75, 0.25); output 2i+2: same columns, (0.25, 0.75) */
        const float a = r0[i], b = r0[i + 1], c = r1[i], d = r1[i + 1];
        dst[2 * i + 1] = lh0 * (0.75f * a + 0.25f * b) + lh1 * (0.75f * c + 0.25f * d);
        dst[2 * i + 2] = lh0 * (0.25f * a + 0.75f * b) + lh1 * (0.25f * c + 0.75f * d);
    }
    /* last output column: source column W-1 twice, weights (0.75, 0.25) */
    const float a = r0[W - 1], c = r1[W - 1];
    dst[2 * W - 1] = lh0 * (0.75f * a + 0.25f * a) + lh1 * (0.75f * c + 0.25f * c);
}

/* out [NC][2H][2W] = bilinear 2x up-sampling of x [NC][H][W] (align_corners=False, scale 2);
 * out may have a larger plane stride (out_plane >= 4HW) to write into a concatenation. */
BZ_EXPORT int bz_upsample2x(const float *x, float *out, int64_t NC, int64_t H, int64_t W, int64_t out_plane,
                            int nthreads) {
    if (NC < 0 || H < 1 || W < 1 || out_plane < 4 * H * W) return -1;
    const int64_t OH = 2 * H, OW = 2 * W;
    const int parallel = nthreads > 1 && NC * OH * OW >= BZ_PACK_PARALLEL_MIN;
    (void)parallel;
    int64_t job;
#pragma omp parallel for schedule(static) num_threads(clamp_threads(nthreads)) if (parallel)
    for (job = 0; job < NC * OH; ++job) {
        const int64_t plane = job / OH, oh = job % OH;
        int64_t h0, h1;
        float lh0, lh1;
        upsample_source_rows(oh, H, &h0, &h1, &lh0, &lh1);
        const float *src = x + plane * H * W;
        upsample_row(src + h0 * W, src + h1 * W, lh0, lh1, out + plane * out_plane + oh * OW, W);
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Guided filter's full-resolution step: up-sample the coefficients and apply them in one pass   */
/* ------------------------------------------------------------------------------------------ */

/* Source indices and weights of PyTorch's bilinear resize (align_corners=False, output size given)
 * along one axis, in its float arithmetic (ATen UpSample.h: area_pixel_compute_source_index,
 * guard_index_and_lambda), so the resized values are bit-identical to F.interpolate's. */
static void linear_resize_table(int64_t in, int64_t out, int64_t *i0, int64_t *i1, float *l0, float *l1) {
    const float ratio = (float)in / (float)out;
    for (int64_t o = 0; o < out; ++o) {
        if (in == out) { i0[o] = i1[o] = o; l0[o] = 1.0f; l1[o] = 0.0f; continue; }
        float real = ratio * ((float)o + 0.5f) - 0.5f;
        if (real < 0.0f) real = 0.0f;
        int64_t index = (int64_t)floorf(real);
        if (index > in - 1) index = in - 1;
        float lambda = real - (float)index;
        lambda = lambda < 0.0f ? 0.0f : (lambda > 1.0f ? 1.0f : lambda);
        i0[o] = index;
        i1[o] = index + (index < in - 1 ? 1 : 0);
        l1[o] = lambda;
        l0[o] = 1.0f - lambda;
    }
}

/* one low-resolution row resized along the width: dst[x] = row[i0[x]] * l0[x] + row[i1[x]] * l1[x] */
BZ_CLONES static void resize_row(const float *restrict row, const int64_t *i0, const int64_t *i1, const float *l0,
                                 const float *l1, float *restrict dst, int64_t W) {
    for (int64_t x = 0; x < W; ++x) {
        const float a = row[i0[x]] * l0[x];
        const float b = row[i1[x]] * l1[x];
        dst[x] = a + b;
    }
}

/* out = (t0 * lh0 + t1 * lh1) * guide + (u0 * lh0 + u1 * lh1) over a row: the slope and offset rows
 * resized along the height, times the guide, plus the offset (each operation rounded as in torch) */
BZ_CLONES static void guided_row(const float *restrict t0, const float *restrict t1, const float *restrict u0,
                                 const float *restrict u1, float lh0, float lh1, const float *restrict guide,
                                 float *restrict out, int64_t W) {
    for (int64_t x = 0; x < W; ++x) {
        const float s0 = t0[x] * lh0, s1 = t1[x] * lh1;
        const float o0 = u0[x] * lh0, o1 = u1[x] * lh1;
        const float slope = s0 + s1, offset = o0 + o1;
        const float product = slope * guide[x];
        out[x] = product + offset;
    }
}

/* out [N][C][H][W] = resize(slope) * guide + resize(offset): slope, offset [N][C][h][w] resized
 * bilinearly to H x W as F.interpolate(..., mode="bilinear", align_corners=False) does; the guide's
 * channel c < C - 1 is src[n][c] ([N][C-1][H][W]) and channel C - 1 is last[n] ([N][1][H][W]).
 * The Deep Guided Filter's full-resolution step without the resized maps or the concatenated guide. */
BZ_EXPORT int bz_guided_apply(const float *slope, const float *offset, int64_t N, int64_t C, int64_t h, int64_t w,
                              const float *src, const float *last, int64_t H, int64_t W, float *out, int nthreads) {
    if (N < 1 || C < 1 || h < 1 || w < 1 || H < 1 || W < 1) return -1;
    int64_t *xi = (int64_t *)malloc(sizeof(int64_t) * (size_t)(2 * W + 2 * H));
    float *xl = (float *)malloc(sizeof(float) * (size_t)(2 * W + 2 * H));
    if (!xi || !xl) { free(xi); free(xl); return -2; }
    int64_t *xi0 = xi, *xi1 = xi + W, *yi0 = xi + 2 * W, *yi1 = yi0 + H;
    float *xl0 = xl, *xl1 = xl + W, *yl0 = xl + 2 * W, *yl1 = yl0 + H;
    linear_resize_table(w, W, xi0, xi1, xl0, xl1);
    linear_resize_table(h, H, yi0, yi1, yl0, yl1);
    const int parallel = nthreads > 1 && N * C * H * W >= BZ_PACK_PARALLEL_MIN;
    (void)parallel;
    int status = 0;
#pragma omp parallel num_threads(clamp_threads(nthreads)) if (parallel)
    {
        /* width-resized rows of the 2C maps for two source rows, reused by the output rows that
         * read them (each source row serves about H / h consecutive output rows) */
        float *rows = (float *)malloc(sizeof(float) * (size_t)(2 * 2 * C * W));
        int64_t held[2] = {-1, -1}; /* n * h + source row held by each slot */
        if (!rows) {
#pragma omp atomic write
            status = -2;
        } else {
            int64_t job;
#pragma omp for schedule(static)
            for (job = 0; job < N * H; ++job) {
                const int64_t n = job / H, y = job % H;
                const int64_t want[2] = {n * h + yi0[y], n * h + yi1[y]};
                float *slot[2];
                for (int k = 0; k < 2; ++k) {
                    int found = held[0] == want[k] ? 0 : (held[1] == want[k] ? 1 : -1);
                    if (found < 0) { /* fill the slot that does not hold the other wanted row */
                        found = held[0] == want[1 - k] ? 1 : 0;
                        const int64_t r = want[k] - n * h;
                        for (int64_t c = 0; c < C; ++c) {
                            float *dst = rows + (size_t)found * 2 * C * W + 2 * c * W;
                            resize_row(slope + ((n * C + c) * h + r) * w, xi0, xi1, xl0, xl1, dst, W);
                            resize_row(offset + ((n * C + c) * h + r) * w, xi0, xi1, xl0, xl1, dst + W, W);
                        }
                        held[found] = want[k];
                    }
                    slot[k] = rows + (size_t)found * 2 * C * W;
                }
                for (int64_t c = 0; c < C; ++c) {
                    const float *guide = c < C - 1 ? src + ((n * (C - 1) + c) * H + y) * W : last + (n * H + y) * W;
                    guided_row(slot[0] + 2 * c * W, slot[1] + 2 * c * W, slot[0] + 2 * c * W + W,
                               slot[1] + 2 * c * W + W, yl0[y], yl1[y], guide, out + ((n * C + c) * H + y) * W, W);
                }
            }
            free(rows);
        }
    }
    free(xi);
    free(xl);
    return status;
}
