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

static inline float dot(const float *a, const float *b, long d) {
    long j = 0;
    float t = 0.f;
#ifdef __AVX512F__
    __m512 acc = _mm512_setzero_ps();
    for (; j + 16 <= d; j += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + j), _mm512_loadu_ps(b + j), acc);
    t = _mm512_reduce_add_ps(acc);
#endif
    for (; j < d; j++) t += a[j] * b[j];
    return t;
}

/* Attention of a few query rows (a decode or verify step) over a cache, in one call instead of
 * ~8 torch ops whose small batched matmuls cost 30-60 us each on a CPU:
 *   out[b, h, t] = softmax(scale * q[b, h, t] . k[b, h / g, s] + mask[b, t, s]) . v[b, h / g, s]
 * q, out contiguous [B, H, T, d]; k, v [B, Hkv, S, d] with unit stride along d and the given strides
 * (cache views); mask additive (0 / -inf) with strides over b, t, s (0 where broadcast); `work`
 * holds S floats. A row that sees no key comes out as zeros. */
void attend_few(const float *q, const float *k, const float *v, const float *mask, float *out, float *work,
                long B, long H, long Hkv, long T, long S, long d, float scale,
                long ksb, long ksh, long kss, long vsb, long vsh, long vss, long msb, long mst, long mss) {
    long g = H / Hkv;
    for (long b = 0; b < B; b++)
        for (long h = 0; h < H; h++)
            for (long t = 0; t < T; t++) {
                const float *qi = q + ((b * H + h) * T + t) * d;
                const float *kb = k + b * ksb + (h / g) * ksh, *vb = v + b * vsb + (h / g) * vsh;
                const float *mi = mask + b * msb + t * mst;
                float *oi = out + ((b * H + h) * T + t) * d;
                float top = -INFINITY;
                for (long s = 0; s < S; s++) {
                    float m = mi[s * mss];
                    float x = m == -INFINITY ? -INFINITY : dot(qi, kb + s * kss, d) * scale + m;
                    work[s] = x;
                    if (x > top) top = x;
                }
                for (long j = 0; j < d; j++) oi[j] = 0.f;
                if (top == -INFINITY) continue;
                float total = 0.f;
                for (long s = 0; s < S; s++) {
                    float p = work[s] == -INFINITY ? 0.f : expf(work[s] - top);
                    work[s] = p;
                    total += p;
                }
                for (long s = 0; s < S; s++) {
                    float p = work[s];
                    if (p == 0.f) continue;
                    const float *vs = vb + s * vss;
                    long j = 0;
#ifdef __AVX512F__
                    __m512 pv = _mm512_set1_ps(p);
                    for (; j + 16 <= d; j += 16)
                        _mm512_storeu_ps(oi + j, _mm512_fmadd_ps(pv, _mm512_loadu_ps(vs + j), _mm512_loadu_ps(oi + j)));
#endif
                    for (; j < d; j++) oi[j] += p * vs[j];
                }
                float inv = 1.f / total;
                for (long j = 0; j < d; j++) oi[j] *= inv;
            }
}

/* Rotate-half RoPE: y[r, h, :] = x[r, h, :] * cos[r, :] + rotate_half(x[r, h, :]) * sin[r, :], with
 * rotate_half(x) = (-x[d/2:], x[:d/2]); x, y [R, heads, d] contiguous, cos, sin [R, d]. Built with
 * -ffp-contract=off: the products are rounded before the sum, as torch's two multiplies and an add. */
void rope(const float *x, const float *cos, const float *sin, float *y, long R, long heads, long d) {
    long half = d / 2;
    for (long r = 0; r < R; r++)
        for (long h = 0; h < heads; h++) {
            const float *xi = x + (r * heads + h) * d, *c = cos + r * d, *s = sin + r * d;
            float *yi = y + (r * heads + h) * d;
            for (long j = 0; j < half; j++) yi[j] = xi[j] * c[j] + -xi[j + half] * s[j];
            for (long j = half; j < d; j++) yi[j] = xi[j] * c[j] + xi[j - half] * s[j];
        }
}
