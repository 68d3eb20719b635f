/* Small CPU kernels for the decode fast path (built and loaded by gemma4/engine/kernels/__init__.py).
 *
 * rms_norm: y = x / sqrt(mean(x^2) + eps) * w, one call instead of the ~8 ops torch's CPU rms_norm
 * runs in eager mode (a decode step of gemma-3-270m has 109 norms: ~2.4 ms of a ~20 ms step). */
#include <math.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

/* x, y [rows, dim] fp32 (y may be x); w [dim] or NULL. The same order as torch: (x * r) * w. */
void rms_norm(const float *x, const float *w, float *y, long rows, long dim, float eps) {
    for (long i = 0; i < rows; i++) {
        const float *xi = x + i * dim;
        float *yi = y + i * dim;
        long j = 0;
        float ss = 0.f;
#ifdef __AVX512F__
        __m512 acc = _mm512_setzero_ps();
        for (; j + 16 <= dim; j += 16) {
            __m512 v = _mm512_loadu_ps(xi + j);
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        ss = _mm512_reduce_add_ps(acc);
#endif
        for (; j < dim; j++) ss += xi[j] * xi[j];
        float r = 1.f / sqrtf(ss / (float)dim + eps);
        if (w) for (j = 0; j < dim; j++) yi[j] = xi[j] * r * w[j];
        else for (j = 0; j < dim; j++) yi[j] = xi[j] * r;
    }
}
