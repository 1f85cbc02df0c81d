/* CPU kernels for the norms of the model, built and loaded by cpu_kernels.py (ops in cpu_rms_norm.py
 * and cpu_sdd_swiglu.py, each with a PyTorch path computing the same):
 *  - rms_norm_forward / _backward: y = w * x * rstd over groups of d features, for eager mode
 *    (compiled graphs keep the PyTorch norm, which inductor fuses with its neighbours);
 *  - sdd_swiglu_forward / _backward: h = silu(gate) * up, where [up | gate] = w * rms(x) and x is
 *    the [rows, 2 * hidden] output of the SDD feed-forward's input projection (one norm over the row,
 *    or one per half with groups = 2), eager and compiled.
 * Each thread takes a contiguous range of rows (results do not depend on scheduling) and works
 * through one row at a time while it is in L1, so a backward reads x and the output gradient once
 * and writes dx once; the gain's gradient is summed per thread. Statistics and arithmetic are fp32;
 * bf16 values are stored as uint16 and rounded to nearest even. */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t v) {
    const uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    return (uint16_t)(((bits & 0x7fffffffu) > 0x7f800000u) ? ((bits >> 16) | 0x40u) : rounded);
}

/* exp(x) by Cephes' range reduction and polynomial (within 1.5 ulp of expf), written so that the
 * compiler vectorises it: glibc's expf has no vector variant without -ffast-math. Saturates at
 * exp(+-87/88), which is what a sigmoid needs; a NaN argument gives NaN (r is NaN). */
static inline float exp_approx(float x) {
    const float xc = x > 88.0f ? 88.0f : (x < -87.0f ? -87.0f : x);
    const float k = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest */
    const float r = (xc - k * 0.693359375f) + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const uint32_t scale_bits = (uint32_t)((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &scale_bits, sizeof scale);
    return (p * r * r + r + 1.0f) * scale;
}

static inline float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

/* Element j of an fp32 or bf16 array; is_bf16 is a constant wherever these are inlined (see ROWS). */
static inline float load_at(const void *p, int64_t j, int is_bf16) {
    return is_bf16 ? bf16_to_float(((const uint16_t *)p)[j]) : ((const float *)p)[j];
}

static inline void store_at(void *p, int64_t j, float v, int is_bf16) {
    if (is_bf16)
        ((uint16_t *)p)[j] = float_to_bf16(v);
    else
        ((float *)p)[j] = v;
}

/* This thread's share of the rows: contiguous, so the result does not depend on scheduling. */
static void thread_rows(int64_t rows, int64_t *lo, int64_t *hi) {
    const int64_t threads = omp_get_num_threads(), chunk = (rows + threads - 1) / threads;
    *lo = omp_get_thread_num() * chunk;
    *hi = *lo + chunk < rows ? *lo + chunk : rows;
    if (*lo > rows) *lo = rows;
}

/* The per-row functions are inlined into ROWS so that is_bf16 is a constant inside them. */
#define INLINE static inline __attribute__((always_inline))

/* Runs BODY(i, is_bf16) for this thread's rows with is_bf16 a compile-time constant, so that the
 * compiler makes one vectorised loop nest per dtype. */
#define ROWS(rows, is_bf16, BODY)                                      \
    do {                                                               \
        int64_t lo_, hi_;                                              \
        thread_rows(rows, &lo_, &hi_);                                 \
        if (is_bf16)                                                   \
            for (int64_t i_ = lo_; i_ < hi_; i_++) BODY(i_, 1);        \
        else                                                           \
            for (int64_t i_ = lo_; i_ < hi_; i_++) BODY(i_, 0);        \
    } while (0)

/* rstd of each of a row's groups of d features. */
INLINE void row_rstd(const void *x, int64_t xo, int64_t groups, int64_t d, float eps, float *restrict r, int is_bf16) {
    for (int64_t g = 0; g < groups; g++) {
        float sum_sq = 0.0f;
        #pragma omp simd reduction(+ : sum_sq)
        for (int64_t j = g * d; j < (g + 1) * d; j++) {
            const float v = load_at(x, xo + j, is_bf16);
            sum_sq += v * v;
        }
        r[g] = 1.0f / sqrtf(sum_sq / (float)d + eps);
    }
}

/* The norm's backward for one row, y = w x r: dx = r w dy - x r^3 mean(w dy x), dw += dy x r. The
 * output gradient dy is bf16 or fp32 (dy_bf16) at offset dyo: the model's, or the SwiGLU's fp32
 * scratch row. */
INLINE void row_norm_backward(const void *dy, int64_t dyo, int dy_bf16, const void *x, int64_t xo,
                              const float *restrict w, const float *restrict r, int64_t groups, int64_t d,
                              void *dx, float *restrict dw, int is_bf16) {
    for (int64_t g = 0; g < groups; g++) {
        const int64_t start = g * d, end = (g + 1) * d;
        float dot = 0.0f;
        #pragma omp simd reduction(+ : dot)
        for (int64_t j = start; j < end; j++) dot += w[j] * load_at(dy, dyo + j, dy_bf16) * load_at(x, xo + j, is_bf16);
        const float rg = r[g], b = rg * rg * rg * dot / (float)d;
        #pragma omp simd
        for (int64_t j = start; j < end; j++) {
            const float gy = load_at(dy, dyo + j, dy_bf16), xv = load_at(x, xo + j, is_bf16);
            dw[j] += gy * (xv * rg);
            store_at(dx, xo + j, rg * w[j] * gy - b * xv, is_bf16);
        }
    }
}

/* ---------------------------------------------------------------------------- RMSNorm x gain */

INLINE void norm_forward_row(const void *x, const float *restrict w, float eps, void *y, float *restrict r, int64_t i,
                             int64_t groups, int64_t d, int is_bf16) {
    const int64_t xo = i * groups * d;
    row_rstd(x, xo, groups, d, eps, r, is_bf16);
    for (int64_t g = 0; g < groups; g++) {
        const float rg = r[g];
        #pragma omp simd
        for (int64_t j = g * d; j < (g + 1) * d; j++)
            store_at(y, xo + j, load_at(x, xo + j, is_bf16) * rg * w[j], is_bf16);
    }
}

/* y [rows, groups * d] and rstd [rows, groups] from x [rows, groups * d] and the gain w [groups * d]. */
void rms_norm_forward(const void *x, const float *w, float eps, void *y, float *rstd, int64_t rows, int64_t groups,
                      int64_t d, int is_bf16, int nthreads) {
    #pragma omp parallel num_threads(nthreads)
    {
#define NORM_FORWARD_ROW(i, bf16) norm_forward_row(x, w, eps, y, rstd + (i) * groups, i, groups, d, bf16)
        ROWS(rows, is_bf16, NORM_FORWARD_ROW);
    }
}

/* dx [rows, groups * d] and per-thread partial sums of the gain gradient, dw_partial
 * [nthreads, groups * d] (zeroed by the caller), from dy and the forward's x, w, rstd. */
void rms_norm_backward(const void *dy, const void *x, const float *w, const float *rstd, void *dx, float *dw_partial,
                       int64_t rows, int64_t groups, int64_t d, int is_bf16, int nthreads) {
    #pragma omp parallel num_threads(nthreads)
    {
        float *dw = dw_partial + (int64_t)omp_get_thread_num() * groups * d;
#define NORM_BACKWARD_ROW(i, bf16) \
    row_norm_backward(dy, (i) * groups * d, bf16, x, (i) * groups * d, w, rstd + (i) * groups, groups, d, dx, dw, bf16)
        ROWS(rows, is_bf16, NORM_BACKWARD_ROW);
    }
}

/* ---------------------------------------------------------------------------- SDD norm + SwiGLU */

INLINE void swiglu_forward_row(const void *x, const float *restrict w, float eps, void *h, float *restrict r,
                               int64_t i, int64_t hidden, int64_t groups, int is_bf16) {
    const int64_t width = 2 * hidden, xo = i * width, ho = i * hidden;
    row_rstd(x, xo, groups, width / groups, eps, r, is_bf16);
    const float r_up = r[0], r_gate = r[groups - 1];
    #pragma omp simd
    for (int64_t j = 0; j < hidden; j++) {
        const float up = load_at(x, xo + j, is_bf16) * r_up * w[j];
        const float gate = load_at(x, xo + hidden + j, is_bf16) * r_gate * w[hidden + j];
        store_at(h, ho + j, gate * sigmoid(gate) * up, is_bf16);
    }
}

/* h [rows, hidden] and rstd [rows, groups] from x [rows, 2 * hidden] and the gain w [2 * hidden]. */
void sdd_swiglu_forward(const void *x, const float *w, float eps, void *h, float *rstd, int64_t rows,
                        int64_t hidden, int64_t groups, int is_bf16, int nthreads) {
    #pragma omp parallel num_threads(nthreads)
    {
#define SWIGLU_FORWARD_ROW(i, bf16) swiglu_forward_row(x, w, eps, h, rstd + (i) * groups, i, hidden, groups, bf16)
        ROWS(rows, is_bf16, SWIGLU_FORWARD_ROW);
    }
}

INLINE void swiglu_backward_row(const void *dh, const void *x, const float *restrict w, const float *restrict r,
                                void *dx, float *restrict dw, float *restrict dy, int64_t i, int64_t hidden,
                                int64_t groups, int is_bf16) {
    const int64_t width = 2 * hidden, xo = i * width, ho = i * hidden;
    const float r_up = r[0], r_gate = r[groups - 1];
    #pragma omp simd
    for (int64_t j = 0; j < hidden; j++) { /* gradient of h w.r.t. the normalised up and gate */
        const float up = load_at(x, xo + j, is_bf16) * r_up * w[j];
        const float gate = load_at(x, xo + hidden + j, is_bf16) * r_gate * w[hidden + j];
        const float s = sigmoid(gate), g = load_at(dh, ho + j, is_bf16);
        dy[j] = g * gate * s;
        dy[hidden + j] = g * up * s * (1.0f + gate * (1.0f - s));
    }
    row_norm_backward(dy, 0, 0, x, xo, w, r, groups, width / groups, dx, dw, is_bf16);
}

/* dx [rows, 2 * hidden] and per-thread partial sums of the gain gradient, dw_partial
 * [nthreads, 2 * hidden] (zeroed by the caller), from dh [rows, hidden] and the forward's x, w, rstd.
 * scratch: nthreads * 2 * hidden floats (one row of the gradient w.r.t. up and gate). */
void sdd_swiglu_backward(const void *dh, const void *x, const float *w, const float *rstd, void *dx,
                         float *dw_partial, int64_t rows, int64_t hidden, int64_t groups, int is_bf16,
                         float *scratch, int nthreads) {
    #pragma omp parallel num_threads(nthreads)
    {
        const int64_t t = omp_get_thread_num();
        float *dw = dw_partial + t * 2 * hidden, *dy = scratch + t * 2 * hidden;
#define SWIGLU_BACKWARD_ROW(i, bf16) \
    swiglu_backward_row(dh, x, w, rstd + (i) * groups, dx, dw, dy, i, hidden, groups, bf16)
        ROWS(rows, is_bf16, SWIGLU_BACKWARD_ROW);
    }
}
