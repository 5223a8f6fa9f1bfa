/* The live task-arithmetic merge (ties, dare, dare_ties) of one key's elements as one pass on a CPU.
 *
 * ``_sparse_live.LiveTaskArithmetic`` computes, per element, the same IEEE float32 operations in the
 * same order through about twenty torch passes over each chunk; this file does them in one pass, eight
 * elements at a time (AVX2, F16C), the tail one at a time with the same operations. It is built with
 * -ffp-contract=off and without any fast-math flag: no fused multiply-add, no reassociation, signed
 * zeros kept, so every result is the torch path's bits (``tests/merge/test_fused_cpu.py`` compares
 * them). Per element, with C the base, M_i the models, w_i their weights:
 *
 *   d_i = M_i − C;  top_k: keep_i = place_i < k;  drop: d_i = d_i / density, keep_i = bits(u_i) < t
 *   kept_i = keep_i ? d_i : +0;  kept_i = kept_i · w_i (w_i ≠ 1)
 *   elect:  S = Σ kept_i (model order), e = sign(S), a_i = max(kept_i · e, +0) (+0 unless > 0)
 *           T = Σ a_i, W = Σ [a_i > 0] · v_i, merged = T / max(W, tiny) · e
 *   else:   merged = Σ kept_i
 *   out = C + merged · α  (rounded once to the output's dtype); ``merged_out`` ← merged when given.
 *
 * ``fused_weighted_mean`` is the weighted average, (Σ x_i·w_i) / Σ w_i, in the same way.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define MAX_MODELS 64

enum { F16 = 0, F32 = 1 };

typedef struct {
    int64_t n;               /* elements */
    int32_t models;          /* M ≤ MAX_MODELS */
    int32_t in_dtype;        /* F16 or F32: base and models */
    int32_t out_dtype;       /* F16 or F32 */
    int32_t drop;            /* 0: top-k by place, 1: by draw */
    int32_t elect;
    int32_t weighted;        /* multiply kept_i by weights[i] */
    int32_t unit_agree;      /* every v_i is 1: W = Σ [a_i > 0] */
    int32_t divide;          /* drop: divide d_i by density */
    int32_t k;               /* top-k: keep place < k; drop: keep bits(u) < k */
    float density, alpha, tiny;
    const void *base;
    const void *const *sources;       /* M pointers */
    const int32_t *const *statistics; /* M pointers: places, or the draws' bits */
    const float *weights;             /* w_i */
    const float *agree;               /* v_i */
    void *out;
    float *merged_out;                /* or NULL */
} fused_args;

static inline __m256 load8(const void *p, int64_t j, int dtype) {
    if (dtype == F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + j)));
    return _mm256_loadu_ps((const float *)p + j);
}

static inline void store8(void *p, int64_t j, __m256 x, int dtype) {
    if (dtype == F16)
        _mm_storeu_si128((__m128i *)((uint16_t *)p + j), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
    else
        _mm256_storeu_ps((float *)p + j, x);
}

static inline float load1(const void *p, int64_t j, int dtype) {
    if (dtype == F16) return _cvtsh_ss(((const uint16_t *)p)[j]);
    return ((const float *)p)[j];
}

static inline void store1(void *p, int64_t j, float x, int dtype) {
    if (dtype == F16) ((uint16_t *)p)[j] = _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT);
    else ((float *)p)[j] = x;
}

static void vector_part(const fused_args *a, int64_t stop) {
    const int m = a->models;
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f), minus = _mm256_set1_ps(-1.0f);
    const __m256 density = _mm256_set1_ps(a->density), alpha = _mm256_set1_ps(a->alpha);
    const __m256 tiny = _mm256_set1_ps(a->tiny);
    const __m256i k = _mm256_set1_epi32(a->k);
    __m256 kept[MAX_MODELS], w[MAX_MODELS], v[MAX_MODELS];
    for (int i = 0; i < m; i++) {
        w[i] = _mm256_set1_ps(a->weights[i]);
        v[i] = _mm256_set1_ps(a->agree[i]);
    }
    for (int64_t j = 0; j + 8 <= stop; j += 8) {
        const __m256 c = load8(a->base, j, a->in_dtype);
        for (int i = 0; i < m; i++) {
            __m256 d = _mm256_sub_ps(load8(a->sources[i], j, a->in_dtype), c);
            if (a->divide) d = _mm256_div_ps(d, density);
            const __m256i stat = _mm256_loadu_si256((const __m256i *)(a->statistics[i] + j));
            const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(k, stat)); /* stat < k */
            d = _mm256_and_ps(d, keep);
            if (a->weighted) d = _mm256_mul_ps(d, w[i]);
            kept[i] = d;
        }
        __m256 merged = kept[0];
        for (int i = 1; i < m; i++) merged = _mm256_add_ps(merged, kept[i]);
        if (a->elect) {
            const __m256 e = _mm256_or_ps(_mm256_and_ps(_mm256_cmp_ps(merged, zero, _CMP_GT_OQ), one),
                                          _mm256_and_ps(_mm256_cmp_ps(merged, zero, _CMP_LT_OQ), minus));
            __m256 t = zero, weight = zero;
            for (int i = 0; i < m; i++) {
                const __m256 x = _mm256_mul_ps(kept[i], e);
                const __m256 agrees = _mm256_cmp_ps(x, zero, _CMP_GT_OQ);
                const __m256 ai = _mm256_and_ps(x, agrees);
                const __m256 si = _mm256_and_ps(agrees, one);
                t = i == 0 ? ai : _mm256_add_ps(t, ai);
                if (a->unit_agree) weight = i == 0 ? si : _mm256_add_ps(weight, si);
                else weight = i == 0 ? _mm256_mul_ps(si, v[i]) : _mm256_add_ps(weight, _mm256_mul_ps(si, v[i]));
            }
            merged = _mm256_mul_ps(_mm256_div_ps(t, _mm256_max_ps(weight, tiny)), e);
        }
        if (a->merged_out) _mm256_storeu_ps(a->merged_out + j, merged);
        store8(a->out, j, _mm256_add_ps(c, _mm256_mul_ps(merged, alpha)), a->out_dtype);
    }
}

static void scalar_part(const fused_args *a, int64_t start) {
    const int m = a->models;
    float kept[MAX_MODELS];
    for (int64_t j = start; j < a->n; j++) {
        const float c = load1(a->base, j, a->in_dtype);
        for (int i = 0; i < m; i++) {
            float d = load1(a->sources[i], j, a->in_dtype) - c;
            if (a->divide) d = d / a->density;
            if (!(a->statistics[i][j] < a->k)) d = 0.0f;
            if (a->weighted) d = d * a->weights[i];
            kept[i] = d;
        }
        float merged = kept[0];
        for (int i = 1; i < m; i++) merged = merged + kept[i];
        if (a->elect) {
            const float e = merged > 0.0f ? 1.0f : (merged < 0.0f ? -1.0f : 0.0f);
            float t = 0.0f, weight = 0.0f;
            for (int i = 0; i < m; i++) {
                const float x = kept[i] * e;
                const float ai = x > 0.0f ? x : 0.0f;
                const float si = x > 0.0f ? 1.0f : 0.0f;
                t = i == 0 ? ai : t + ai;
                if (a->unit_agree) weight = i == 0 ? si : weight + si;
                else weight = i == 0 ? si * a->agree[i] : weight + si * a->agree[i];
            }
            merged = (t / (weight > a->tiny ? weight : a->tiny)) * e;
        }
        if (a->merged_out) a->merged_out[j] = merged;
        store1(a->out, j, c + merged * a->alpha, a->out_dtype);
    }
}

/* 0 on success, 1 when the arguments are outside what this kernel does (the caller uses torch). */
int fused_task_arithmetic(const fused_args *a) {
    if (a->models < 1 || a->models > MAX_MODELS || a->n < 0) return 1;
    if ((a->in_dtype != F16 && a->in_dtype != F32) || (a->out_dtype != F16 && a->out_dtype != F32)) return 1;
    const int64_t vectorized = a->n - a->n % 8;
    vector_part(a, vectorized);
    scalar_part(a, vectorized);
    return 0;
}

/* acc ← (Σ_i x_i·w_i) / divisor over ``models`` sources of one dtype, the sum left to right, each
 * product rounded before it is added: weighted_mean's whole loop and its division in one call. It
 * goes block by block (2048 elements: the block's sums stay in L1), each source read in turn through
 * the block, so that a hundred sources are a hundred sequential streams, not a hundred interleaved
 * (30 % faster at 100 sources); up to 8 sources are read interleaved (15 % faster at 5). */
#define MEAN_BLOCK 2048
#define INTERLEAVED_MODELS 8
int fused_weighted_mean(float *acc, const void *const *sources, int32_t dtype, const float *weights,
                        int32_t models, int64_t n, float divisor) {
    if ((dtype != F16 && dtype != F32) || n < 0 || models < 1) return 1;
    const __m256 d = _mm256_set1_ps(divisor);
    if (models <= INTERLEAVED_MODELS) { /* few streams: the sum in registers, one store per element */
        const int64_t vectorized = n - n % 8;
        for (int64_t j = 0; j < vectorized; j += 8) {
            __m256 total = _mm256_mul_ps(load8(sources[0], j, dtype), _mm256_set1_ps(weights[0]));
            for (int i = 1; i < models; i++)
                total = _mm256_add_ps(total, _mm256_mul_ps(load8(sources[i], j, dtype), _mm256_set1_ps(weights[i])));
            _mm256_storeu_ps(acc + j, _mm256_div_ps(total, d));
        }
        for (int64_t j = vectorized; j < n; j++) {
            float total = load1(sources[0], j, dtype) * weights[0];
            for (int i = 1; i < models; i++) total = total + load1(sources[i], j, dtype) * weights[i];
            acc[j] = total / divisor;
        }
        return 0;
    }
    for (int64_t begin = 0; begin < n; begin += MEAN_BLOCK) {
        const int64_t end = begin + MEAN_BLOCK < n ? begin + MEAN_BLOCK : n;
        const int64_t vectorized = begin + (end - begin) / 8 * 8;
        for (int i = 0; i < models; i++) {
            const __m256 w = _mm256_set1_ps(weights[i]);
            for (int64_t j = begin; j < vectorized; j += 8) {
                const __m256 term = _mm256_mul_ps(load8(sources[i], j, dtype), w);
                _mm256_storeu_ps(acc + j, i == 0 ? term : _mm256_add_ps(_mm256_loadu_ps(acc + j), term));
            }
            for (int64_t j = vectorized; j < end; j++) {
                const float term = load1(sources[i], j, dtype) * weights[i];
                acc[j] = i == 0 ? term : acc[j] + term;
            }
        }
        for (int64_t j = begin; j < vectorized; j += 8)
            _mm256_storeu_ps(acc + j, _mm256_div_ps(_mm256_loadu_ps(acc + j), d));
        for (int64_t j = vectorized; j < end; j++) acc[j] = acc[j] / divisor;
    }
    return 0;
}

/* The CPU can run this file's instructions (AVX2 and F16C). */
int fused_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
}

int fused_args_size(void) { return (int)sizeof(fused_args); }
