/* The fused epilogue (y = dot * scale + shift, then the op chain, in the tile's rows), its vectorised
 * exp / sigmoid / tanh, the channel mix after a conv, and the same op chains as one pass over a float
 * map (bz_pointwise) and the GRU state update. */
#include "bitconv.h"

/* exp, sigmoid and tanh for the gate epilogues, vectorised (8 lanes) with a scalar twin that does
 * the same operations.  exp: Cody-Waite reduction x = n ln2 + r and the degree-6 polynomial of
 * Cephes' expf (S. L. Moshier, Cephes Mathematical Library); tanh: Cephes' tanhf (odd polynomial
 * below |x| = 0.625, 1 - 2 / (exp(2|x|) + 1) above).  Within ~2 ulp of libm / PyTorch. */
#define BZ_EXP_POLY(r, z) \
    (((((((1.9875691500e-4f * (r) + 1.3981999507e-3f) * (r) + 8.3334519073e-3f) * (r) + 4.1665795894e-2f) * \
         (r) + 1.6666665459e-1f) * (r) + 5.0000001201e-1f) * (z) + (r)) + 1.0f)
#define BZ_TANH_POLY(z) \
    ((((-5.70498872745e-3f * (z) + 2.06390887954e-2f) * (z) - 5.37397155531e-2f) * (z) + 1.33314422036e-1f) * \
         (z) - 3.33332819422e-1f)

static inline float bz_expf(float x) {
    x = x > 88.3762626647949f ? 88.3762626647949f : (x < -87.3365447504f ? -87.3365447504f : x);
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    const float z = r * r;
    const float y = BZ_EXP_POLY(r, z);
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

static inline float bz_sigmoidf(float x) { return 1.0f / (1.0f + bz_expf(-x)); }

static inline float bz_tanhf(float x) {
    const float ax = fabsf(x);
    if (ax < 0.625f) {
        const float z = x * x;
        return BZ_TANH_POLY(z) * z * x + x;
    }
    const float t = 1.0f - 2.0f / (bz_expf(2.0f * ax) + 1.0f);
    return x < 0.0f ? -t : t;
}

#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi" /* the 8-lane helpers are always inlined */
BZ_INLINE bz_v8f bz_v8_select(bz_v8i keep, bz_v8f a, bz_v8f b) {
    return (bz_v8f)(((bz_v8i)a & keep) | ((bz_v8i)b & ~keep));
}

BZ_INLINE bz_v8f bz_v8_exp(bz_v8f x) {
    const bz_v8f hi = x * 0.0f + 88.3762626647949f, lo = x * 0.0f - 87.3365447504f;
    x = bz_v8_select(x > hi, hi, x);
    x = bz_v8_select(x < lo, lo, x);
    bz_v8f t = x * 1.44269504088896341f + 0.5f;
    /* floor of t: truncate, then step down where truncation went up (negative non-integers) */
    bz_v8f n = __builtin_convertvector(__builtin_convertvector(t, bz_v8i), bz_v8f);
    n = bz_v8_select(n > t, n - 1.0f, n);
    bz_v8f r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    const bz_v8f z = r * r;
    const bz_v8f y = BZ_EXP_POLY(r, z);
    const bz_v8i bits = (__builtin_convertvector(n, bz_v8i) + 127) << 23;
    return y * (bz_v8f)bits;
}

BZ_INLINE bz_v8f bz_v8_sigmoid(bz_v8f x) { return 1.0f / (1.0f + bz_v8_exp(-x)); }

BZ_INLINE bz_v8f bz_v8_tanh(bz_v8f x) {
    const bz_v8i sign = (bz_v8i)x & (int32_t)0x80000000;
    const bz_v8f ax = (bz_v8f)((bz_v8i)x & (int32_t)0x7fffffff);
    const bz_v8f z = x * x;
    const bz_v8f small = BZ_TANH_POLY(z) * z * x + x;
    const bz_v8f t = 1.0f - 2.0f / (bz_v8_exp(2.0f * ax) + 1.0f);
    const bz_v8f large = (bz_v8f)((bz_v8i)t | sign);
    return bz_v8_select(ax < 0.625f, small, large);
}
#endif

/* y = y >= 0 ? y : y * slope, in place.  Written as a bitwise select of both results: compilers
 * leave the plain conditional as a (mispredicted) branch, which made PReLU 20x slower than an add. */
BZ_INLINE void prelu_run(float *y, int64_t np, float slope) {
    int64_t i = 0;
#if defined(__GNUC__)
    for (; i + 8 <= np; i += 8) {
        bz_v8f v, n;
        memcpy(&v, y + i, sizeof v);
        n = v * slope;
        const bz_v8i keep = v >= 0.0f;
        const bz_v8i r = ((bz_v8i)v & keep) | ((bz_v8i)n & ~keep);
        memcpy(y + i, &r, sizeof r);
    }
#endif
    for (; i < np; ++i) { const float n = y[i] * slope; y[i] = y[i] >= 0.0f ? y[i] : n; }
}

/* one op over a row of np floats, in place (vectorised; the scalar tail does the same
 * operations, so every element rounds the same way) */
BZ_INLINE void op_run(int op, float cv, float *y, int np, const float *res) {
    int i = 0;
#if defined(__GNUC__)
#define BZ_OP_LOOP(expr)                                  \
    for (; i + 8 <= np; i += 8) {                         \
        bz_v8f v;                                         \
        memcpy(&v, y + i, sizeof v);                      \
        v = (expr);                                       \
        memcpy(y + i, &v, sizeof v);                      \
    }
    switch (op) {
    case BZ_OP_ADD: BZ_OP_LOOP(v + cv) break;
    case BZ_OP_MUL: BZ_OP_LOOP(v * cv) break;
    case BZ_OP_PRELU: BZ_OP_LOOP(bz_v8_select(v >= 0.0f, v, v * cv)) break;
    case BZ_OP_RELU: BZ_OP_LOOP((bz_v8f)((bz_v8i)v & (v > 0.0f))) break;
    case BZ_OP_RESIDUAL:
        for (; i + 8 <= np; i += 8) {
            bz_v8f v, r;
            memcpy(&v, y + i, sizeof v);
            memcpy(&r, res + i, sizeof r);
            v = v + r;
            memcpy(y + i, &v, sizeof v);
        }
        break;
    case BZ_OP_SIGMOID: BZ_OP_LOOP(bz_v8_sigmoid(v)) break;
    case BZ_OP_TANH: BZ_OP_LOOP(bz_v8_tanh(v)) break;
    default: break;
    }
#undef BZ_OP_LOOP
#endif
    for (; i < np; ++i) {
        float v = y[i];
        switch (op) {
        case BZ_OP_ADD: v = v + cv; break;
        case BZ_OP_MUL: v = v * cv; break;
        case BZ_OP_PRELU: { const float n = v * cv; v = v >= 0.0f ? v : n; break; }
        case BZ_OP_RELU: v = v > 0.0f ? v : 0.0f; break;
        case BZ_OP_RESIDUAL: v = v + res[i]; break;
        case BZ_OP_SIGMOID: v = bz_sigmoidf(v); break;
        case BZ_OP_TANH: v = bz_tanhf(v); break;
        default: break;
        }
        y[i] = v;
    }
}

/* the op chains BiMatting's layers end with, run in one pass with the value in registers (the
 * same operations in the same order as the op passes, so the same roundings).  sigmoid / tanh
 * stay separate passes: inlined into the conversion loop they ran ~10% slower (register pressure). */
enum { BZ_CHAIN_NONE, BZ_CHAIN_PRELU, BZ_CHAIN_RELU, BZ_CHAIN_SHORTCUT };

int chain_kind(const conv_args *a) {
    if (a->nops == 1) {
        switch (a->ops[0]) {
        case BZ_OP_PRELU: return BZ_CHAIN_PRELU;
        case BZ_OP_RELU: return BZ_CHAIN_RELU;
        default: return BZ_CHAIN_NONE;
        }
    }
    /* residual, shift, PReLU, shift: the end of every BiMobileNet block stage */
    if (a->nops == 4 && a->ops[0] == BZ_OP_RESIDUAL && a->ops[1] == BZ_OP_ADD && a->ops[2] == BZ_OP_PRELU &&
        a->ops[3] == BZ_OP_ADD)
        return BZ_CHAIN_SHORTCUT;
    return BZ_CHAIN_NONE;
}

/* epilogue of one output channel over np <= TP pixels: y = (base - 2*popc) * scale + shift, then
 * the ops one after another over the row, which stays in L1 (a loop over the ops inside the pixel
 * loop keeps the value on the stack: a store-to-load chain of several cycles per op and vector).
 * res: the residual operand's values at these pixels (BZ_OP_RESIDUAL). */
BZ_CLONES void epilogue_row(const conv_args *a, int64_t oc, const int32_t *popc, const int32_t *base,
                                   int np, float *y, const float *res) {
    const float sc = a->scale ? a->scale[oc] : 1.0f;
    const float sh = a->shift ? a->shift[oc] : 0.0f;
    int i = 0;
#if defined(__GNUC__)
    float cv[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int q = 0; q < a->nops && q < 4; ++q) cv[q] = a->op_args[q] ? a->op_args[q][oc] : 0.0f;
#define BZ_EPILOGUE_LOOP(CHAIN)                                                      \
    for (; i + 8 <= np; i += 8) {                                                    \
        bz_v8i b, p;                                                                 \
        memcpy(&b, base + i, sizeof b);                                              \
        memcpy(&p, popc + i, sizeof p);                                              \
        bz_v8f v = __builtin_convertvector(b - 2 * p, bz_v8f) * sc;                  \
        v = v + sh;                                                                  \
        CHAIN;                                                                       \
        memcpy(y + i, &v, sizeof v);                                                 \
    }
    switch (a->chain) {
    case BZ_CHAIN_PRELU: BZ_EPILOGUE_LOOP(v = bz_v8_select(v >= 0.0f, v, v * cv[0])) break;
    case BZ_CHAIN_RELU: BZ_EPILOGUE_LOOP(v = (bz_v8f)((bz_v8i)v & (v > 0.0f))) break;
    case BZ_CHAIN_SHORTCUT:
        BZ_EPILOGUE_LOOP({
            bz_v8f r;
            memcpy(&r, res + i, sizeof r);
            v = v + r;
            v = v + cv[1];
            v = bz_v8_select(v >= 0.0f, v, v * cv[2]);
            v = v + cv[3];
        })
        break;
    default: BZ_EPILOGUE_LOOP((void)0) break; /* the ops run as passes below */
    }
#undef BZ_EPILOGUE_LOOP
#endif
    /* the pixels past the last full vector (all of them without vector extensions) */
    const int done = a->chain == BZ_CHAIN_NONE ? 0 : i; /* pixels whose ops the one-pass loop ran */
    for (; i < np; ++i) {
        const float v = (float)(base[i] - 2 * popc[i]) * sc;
        y[i] = v + sh;
    }
    for (int q = 0; q < a->nops; ++q)
        op_run(a->ops[q], a->op_args[q] ? a->op_args[q][oc] : 0.0f, y + done, np - done, res ? res + done : NULL);
}

#if defined(BZ_X86) && (defined(__GNUC__) || defined(__clang__))
/* channel mix of one tile with FMA: out[o][i] = [relu](b[o] + sum_c w[o][c] * y[c][i]), 8 pixels
 * per vector and 4 vectors (32 pixels) per pass, so each weight broadcast feeds four FMAs */
__attribute__((target("avx2,fma"))) static void mix_tile_fma(const conv_args *a, const float *y, int np,
                                                             float *out, int64_t ld_out) {
    const int64_t C = a->O;
    for (int64_t o = 0; o < a->mix_out; ++o) {
        const float *w = a->mix_w + o * C;
        const __m256 b = _mm256_set1_ps(a->mix_b[o]);
        int i = 0;
        for (; i + 32 <= np; i += 32) {
            __m256 s0 = b, s1 = b, s2 = b, s3 = b;
            for (int64_t c = 0; c < C; ++c) {
                const __m256 wc = _mm256_set1_ps(w[c]);
                const float *row = y + c * TP + i;
                s0 = _mm256_fmadd_ps(wc, _mm256_loadu_ps(row), s0);
                s1 = _mm256_fmadd_ps(wc, _mm256_loadu_ps(row + 8), s1);
                s2 = _mm256_fmadd_ps(wc, _mm256_loadu_ps(row + 16), s2);
                s3 = _mm256_fmadd_ps(wc, _mm256_loadu_ps(row + 24), s3);
            }
            if (a->mix_relu) {
                const __m256 z = _mm256_setzero_ps();
                s0 = _mm256_max_ps(s0, z); s1 = _mm256_max_ps(s1, z);
                s2 = _mm256_max_ps(s2, z); s3 = _mm256_max_ps(s3, z);
            }
            float *dst = out + o * ld_out + i;
            _mm256_storeu_ps(dst, s0); _mm256_storeu_ps(dst + 8, s1);
            _mm256_storeu_ps(dst + 16, s2); _mm256_storeu_ps(dst + 24, s3);
        }
        for (; i < np; ++i) {
            float acc = a->mix_b[o];
            for (int64_t c = 0; c < C; ++c) acc = fmaf(w[c], y[c * TP + i], acc);
            out[o * ld_out + i] = a->mix_relu && !(acc > 0.0f) ? 0.0f : acc;
        }
    }
}
#endif

static void mix_tile_plain(const conv_args *a, const float *y, int np, float *out, int64_t ld_out) {
    for (int64_t o = 0; o < a->mix_out; ++o) {
        const float *w = a->mix_w + o * a->O;
        for (int i = 0; i < np; ++i) {
            float acc = a->mix_b[o];
            for (int64_t c = 0; c < a->O; ++c) acc += w[c] * y[c * TP + i];
            out[o * ld_out + i] = a->mix_relu && !(acc > 0.0f) ? 0.0f : acc;
        }
    }
}

/* the channel mix of a tile whose epilogue outputs y [O][TP] are done */
void mix_tile(const conv_args *a, const float *y, int np, float *out, int64_t ld_out) {
#if defined(BZ_X86) && (defined(__GNUC__) || defined(__clang__))
    if (a->mix_fma) {
        mix_tile_fma(a, y, np, out, ld_out);
        return;
    }
#endif
    mix_tile_plain(a, y, np, out, ld_out);
}

/* ------------------------------------------------------------------------------------------ */
/* Per-channel elementwise chains (shift, scale, PReLU, ReLU) in one pass over a float map      */
/* ------------------------------------------------------------------------------------------ */

BZ_CLONES static void pointwise_row(const float *src, float *dst, int64_t np, int nops, const int *ops,
                                    const float *const *args, int64_t c) {
    if (dst != src) memcpy(dst, src, sizeof(float) * (size_t)np);
    for (int q = 0; q < nops; ++q) {
        const float v = args[q] ? args[q][c] : 0.0f;
        switch (ops[q]) {
        case BZ_OP_ADD: for (int64_t i = 0; i < np; ++i) dst[i] = dst[i] + v; break;
        case BZ_OP_MUL: for (int64_t i = 0; i < np; ++i) dst[i] = dst[i] * v; break;
        case BZ_OP_PRELU: prelu_run(dst, np, v); break;
        case BZ_OP_RELU: for (int64_t i = 0; i < np; ++i) dst[i] = dst[i] > 0.0f ? dst[i] : 0.0f; break;
        case BZ_OP_SIGMOID: for (int64_t i = 0; i < np; ++i) dst[i] = bz_sigmoidf(dst[i]); break;
        case BZ_OP_TANH: for (int64_t i = 0; i < np; ++i) dst[i] = bz_tanhf(dst[i]); break;
        default: break;
        }
    }
}

/* out = (1 - z) * h + z * c over n contiguous floats (a GRU's state update), each product and sum
 * rounded as PyTorch's separate operations round them (no fused multiply-add) */
BZ_CLONES static void gru_update_run(const float *h, const float *z, const float *c, float *out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        const float keep = (1.0f - z[i]) * h[i];
        const float take = z[i] * c[i];
        out[i] = keep + take;
    }
}

BZ_EXPORT int bz_gru_update(const float *h, const float *z, const float *c, float *out, int64_t n, int nthreads) {
    if (n < 0) return -1;
    const int64_t chunk = 16384;
    const int64_t nchunks = (n + chunk - 1) / chunk;
    const int parallel = nthreads > 1 && n >= BZ_PACK_PARALLEL_MIN;
    (void)parallel;
    int64_t k;
#pragma omp parallel for schedule(static) num_threads(clamp_threads(nthreads)) if (parallel)
    for (k = 0; k < nchunks; ++k) {
        const int64_t start = k * chunk, len = (n - start) < chunk ? (n - start) : chunk;
        gru_update_run(h + start, z + start, c + start, out + start, len);
    }
    return 0;
}

/* out[n][c][p] = ops(x[n][c][p]) for a contiguous [N][C][P] float tensor (out may equal x) */
BZ_EXPORT int bz_pointwise(const float *x, float *out, int64_t N, int64_t C, int64_t P, int nops,
                           const int *ops, const float *const *args, int nthreads) {
    if (nops < 0 || nops > BZ_MAX_OPS) return -1;
    const int64_t chunk = 4096;
    const int64_t chunks = (P + chunk - 1) / chunk;
    const int parallel = nthreads > 1 && N * C * P >= BZ_PACK_PARALLEL_MIN;
    (void)parallel; /* unused without OpenMP */
    int64_t job;
#pragma omp parallel for schedule(static) num_threads(clamp_threads(nthreads)) if (parallel)
    for (job = 0; job < N * C * chunks; ++job) {
        const int64_t row = job / chunks, p0 = (job % chunks) * chunk;
        const int64_t np = (P - p0) < chunk ? (P - p0) : chunk;
        pointwise_row(x + row * P + p0, out + row * P + p0, np, nops, ops, args, row % C);
    }
    return 0;
}
