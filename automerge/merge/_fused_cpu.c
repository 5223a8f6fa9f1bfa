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
 * ``fused_weighted_mean`` is the weighted average, (Σ x_i·w_i) / Σ w_i, in the same way. The export
 * also takes TIES's top-k cuts here (``fused_top_k_cuts``), a run of small keys in one call
 * (``fused_task_run``, ``fused_stock_run``), DELLA (``fused_della_*``: the same per-element
 * operations, models outside, ranks by the radix sort ``fused_places``) and Model Stock (``fused_stock_*``: its float32 element
 * operations as ``model_stock.py`` orders them, its squared norms summed in float64) and the
 * geometric median (``fused_geometric_median*``: Weiszfeld's loop, its norms ``grid_norm``'s integer
 * sums, which any order gives alike).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
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

/* out ← (Σ_i x_i·w_i) / divisor over ``models`` sources of one dtype, the sum left to right, each
 * product rounded before it is added, the quotient rounded once to the output's dtype: weighted_mean's
 * whole loop, its division and the cast of the result in one call. It goes block by block (2048
 * elements: the block's sums stay in L1), each source read in turn through the block, so that a
 * hundred sources are a hundred sequential streams, not a hundred interleaved (30 % faster at 100
 * sources); up to 8 sources are read interleaved (15 % faster at 5). */
#define MEAN_BLOCK 2048
#define INTERLEAVED_MODELS 8
#define MEAN_GROUP 8

/* acc[j] = Σ_i x_i[begin + j]·w_i over j < length, left to right from the first product, each
 * product rounded first: the block's sums pass through registers once per MEAN_GROUP sources. */
static void block_weighted_sum(float *acc, const void *const *sources, int32_t models, int32_t dtype,
                               const float *weights, int64_t begin, int64_t length) {
    const int64_t vectorized = length - length % 8;
    for (int first = 0; first < models; first += MEAN_GROUP) {
        const int count = models - first < MEAN_GROUP ? models - first : MEAN_GROUP;
        const void *const *group = sources + first;
        const float *w = weights + first;
        for (int64_t j = 0; j < vectorized; j += 8) {
            __m256 total = first == 0 ? _mm256_mul_ps(load8(group[0], begin + j, dtype), _mm256_set1_ps(w[0]))
                                      : _mm256_add_ps(_mm256_loadu_ps(acc + j),
                                                      _mm256_mul_ps(load8(group[0], begin + j, dtype), _mm256_set1_ps(w[0])));
            for (int i = 1; i < count; i++)
                total = _mm256_add_ps(total, _mm256_mul_ps(load8(group[i], begin + j, dtype), _mm256_set1_ps(w[i])));
            _mm256_storeu_ps(acc + j, total);
        }
        for (int64_t j = vectorized; j < length; j++) {
            float total = load1(group[0], begin + j, dtype) * w[0];
            if (first) total = acc[j] + total;
            for (int i = 1; i < count; i++) total = total + load1(group[i], begin + j, dtype) * w[i];
            acc[j] = total;
        }
    }
}

int fused_weighted_mean(void *out, int32_t out_dtype, const void *const *sources, int32_t dtype,
                        const float *weights, int32_t models, int64_t n, float divisor) {
    if ((dtype != F16 && dtype != F32) || (out_dtype != F16 && out_dtype != F32) || n < 0 || models < 1)
        return 1;
    const __m256 d = _mm256_set1_ps(divisor);
    if (models <= INTERLEAVED_MODELS) { /* few streams: the sum in registers, one store per element */
        const int64_t vectorized = n - n % 8;
        for (int64_t j = 0; j < vectorized; j += 8) {
            __m256 total = _mm256_mul_ps(load8(sources[0], j, dtype), _mm256_set1_ps(weights[0]));
            for (int i = 1; i < models; i++)
                total = _mm256_add_ps(total, _mm256_mul_ps(load8(sources[i], j, dtype), _mm256_set1_ps(weights[i])));
            store8(out, j, _mm256_div_ps(total, d), out_dtype);
        }
        for (int64_t j = vectorized; j < n; j++) {
            float total = load1(sources[0], j, dtype) * weights[0];
            for (int i = 1; i < models; i++) total = total + load1(sources[i], j, dtype) * weights[i];
            store1(out, j, total / divisor, out_dtype);
        }
        return 0;
    }
    float acc[MEAN_BLOCK];
    for (int64_t begin = 0; begin < n; begin += MEAN_BLOCK) {
        const int64_t length = begin + MEAN_BLOCK < n ? MEAN_BLOCK : n - begin;
        block_weighted_sum(acc, sources, models, dtype, weights, begin, length);
        const int64_t vectorized = length - length % 8;
        for (int64_t j = 0; j < vectorized; j += 8)
            store8(out, begin + j, _mm256_div_ps(_mm256_loadu_ps(acc + j), d), out_dtype);
        for (int64_t j = vectorized; j < length; j++) store1(out, begin + j, acc[j] / divisor, out_dtype);
    }
    return 0;
}

/* ---- the export's task arithmetic (ties, dare, dare_ties) over any number of models ------------
 *
 * Per element, the operations of ``TaskArithmetic`` as the export runs it (``_task_core``), in its
 * order: d_i = M_i − C (float32); drop: d_i = d_i / density; kept_i = keep_i ? d_i : +0; kept_i ·= w_i;
 * then the sum or the sign election as ``vector_part`` computes it, and out = C + merged·α rounded once.
 * keep_i: top-k, |d_i|'s bits > t_i, or = t_i at a position < cut_i (the first ties in index order);
 * drop, bits(u_i) < the draw threshold, u_i = counter_uniform's draw (``_task_core``).
 * The models are read block by block (TASK_BLOCK elements: the block's sums stay in L1), each in
 * turn and once, so any number of models streams: the election's sums for either sign are kept in
 * the same sweep as S, and the sign picks one pair at the end.
 * Returns 2, with ``out`` partly written, when some d_i or kept_i is not finite: the caller's torch
 * path then names the source (or the overflow). */
enum { KEEP_TOP_K = 0, KEEP_DRAWS = 1 };
#define TASK_BLOCK 1024
#define NOT_FINITE 0x7F800000

typedef struct {
    int64_t start, stop;         /* this call's elements of the key */
    int32_t models, in_dtype, out_dtype, keep_mode;
    int32_t elect, weighted, unit_agree, divide;
    int32_t draw_threshold;      /* drop: keep bits(u) < it */
    float density, alpha, tiny;
    const void *base;
    const void *const *sources;
    const int32_t *thresholds;   /* top-k: t_i */
    const int64_t *cuts;         /* top-k: cut_i */
    const uint32_t *draw_keys;   /* drop: (k0, k1) of each model */
    const float *weights, *agree;
    void *out;
} task_args;

static inline __m256i mix32x8(__m256i x) {
    const __m256i multiplier = _mm256_set1_epi32(0x45D9F3B);
    x = _mm256_mullo_epi32(_mm256_xor_si256(_mm256_srli_epi32(x, 16), x), multiplier);
    x = _mm256_mullo_epi32(_mm256_xor_si256(_mm256_srli_epi32(x, 16), x), multiplier);
    return _mm256_xor_si256(_mm256_srli_epi32(x, 16), x);
}

static inline uint32_t mix32(uint32_t x) {
    x = ((x >> 16) ^ x) * 0x45D9F3Bu;
    x = ((x >> 16) ^ x) * 0x45D9F3Bu;
    return (x >> 16) ^ x;
}

/* bits of counter_uniform's draw for element ``index``: (mix32(mix32(index + k0) ^ k1) >> 8) · 2^−24 */
static inline __m256i draw_bits8(__m256i index, uint32_t k0, uint32_t k1) {
    const __m256i x = mix32x8(_mm256_xor_si256(mix32x8(_mm256_add_epi32(index, _mm256_set1_epi32((int)k0))),
                                               _mm256_set1_epi32((int)k1)));
    const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(x, 8)), _mm256_set1_ps(1.0f / 16777216.0f));
    return _mm256_castps_si256(u);
}

static inline int32_t draw_bits1(int64_t index, uint32_t k0, uint32_t k1) {
    const float u = (float)(mix32(mix32((uint32_t)index + k0) ^ k1) >> 8) * (1.0f / 16777216.0f);
    int32_t bits;
    memcpy(&bits, &u, 4);
    return bits;
}

/* kept_i of 8 elements at ``j`` (``bad`` ORs in the elements whose d_i is not finite) */
static inline __m256 kept8(const task_args *a, int i, int64_t j, __m256 c, __m256i *bad) {
    const __m256i magnitude_mask = _mm256_set1_epi32(0x7FFFFFFF);
    __m256 d = _mm256_sub_ps(load8(a->sources[i], j, a->in_dtype), c);
    const __m256i bits = _mm256_and_si256(_mm256_castps_si256(d), magnitude_mask);
    *bad = _mm256_or_si256(*bad, _mm256_cmpgt_epi32(bits, _mm256_set1_epi32(NOT_FINITE - 1)));
    __m256i keep;
    const __m256i index = _mm256_add_epi32(_mm256_set1_epi32((int32_t)j), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    if (a->keep_mode == KEEP_TOP_K) {
        const __m256i t = _mm256_set1_epi32(a->thresholds[i]);
        const __m256i before_cut = _mm256_cmpgt_epi32(_mm256_set1_epi32((int32_t)a->cuts[i]), index);
        keep = _mm256_or_si256(_mm256_cmpgt_epi32(bits, t), _mm256_and_si256(_mm256_cmpeq_epi32(bits, t), before_cut));
    } else {
        if (a->divide) d = _mm256_div_ps(d, _mm256_set1_ps(a->density));
        const __m256i u = draw_bits8(index, a->draw_keys[2 * i], a->draw_keys[2 * i + 1]);
        keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(a->draw_threshold), u);
    }
    d = _mm256_and_ps(d, _mm256_castsi256_ps(keep));
    if (a->weighted) d = _mm256_mul_ps(d, _mm256_set1_ps(a->weights[i]));
    if (a->divide || a->weighted) { /* a kept value that overflowed */
        const __m256i kept_bits = _mm256_and_si256(_mm256_castps_si256(d), magnitude_mask);
        *bad = _mm256_or_si256(*bad, _mm256_cmpgt_epi32(kept_bits, _mm256_set1_epi32(NOT_FINITE - 1)));
    }
    return d;
}

static inline float kept1(const task_args *a, int i, int64_t j, float c, int *bad) {
    float d = load1(a->sources[i], j, a->in_dtype) - c;
    int32_t bits;
    memcpy(&bits, &d, 4);
    bits &= 0x7FFFFFFF;
    *bad |= bits >= NOT_FINITE;
    int keep;
    if (a->keep_mode == KEEP_TOP_K) {
        const int32_t t = a->thresholds[i];
        keep = bits > t || (bits == t && j < a->cuts[i]);
    } else {
        if (a->divide) d = d / a->density;
        keep = draw_bits1(j, a->draw_keys[2 * i], a->draw_keys[2 * i + 1]) < a->draw_threshold;
    }
    if (!keep) d = 0.0f;
    if (a->weighted) d = d * a->weights[i];
    memcpy(&bits, &d, 4);
    *bad |= (bits & 0x7FFFFFFF) >= NOT_FINITE;
    return d;
}

/* The election's sums at a run of elements (``fused_task_export``): S = Σ kept_i, and for either sign
 * P = Σ max(kept_i, +0), Q = Σ max(−kept_i, +0), WP = Σ [kept_i > 0]·v_i, WQ = Σ [kept_i < 0]·v_i, each
 * left to right in model order (the first model's value stored, not added to +0: −0 stays −0). */
typedef struct {
    float *sums, *plus, *minus, *plus_weights, *minus_weights;
} election_sums;

static inline void add_kept8(election_sums e, int64_t j, __m256 kept, const task_args *a, int i, __m256 v) {
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    const int first = i == 0;
    _mm256_storeu_ps(e.sums + j, first ? kept : _mm256_add_ps(_mm256_loadu_ps(e.sums + j), kept));
    if (!a->elect) return;
    const __m256 above = _mm256_cmp_ps(kept, zero, _CMP_GT_OQ), below = _mm256_cmp_ps(kept, zero, _CMP_LT_OQ);
    const __m256 p = _mm256_and_ps(kept, above), q = _mm256_and_ps(_mm256_xor_ps(kept, sign), below);
    const __m256 wp = a->unit_agree ? _mm256_and_ps(above, one) : _mm256_mul_ps(_mm256_and_ps(above, one), v);
    const __m256 wq = a->unit_agree ? _mm256_and_ps(below, one) : _mm256_mul_ps(_mm256_and_ps(below, one), v);
    _mm256_storeu_ps(e.plus + j, first ? p : _mm256_add_ps(_mm256_loadu_ps(e.plus + j), p));
    _mm256_storeu_ps(e.minus + j, first ? q : _mm256_add_ps(_mm256_loadu_ps(e.minus + j), q));
    _mm256_storeu_ps(e.plus_weights + j, first ? wp : _mm256_add_ps(_mm256_loadu_ps(e.plus_weights + j), wp));
    _mm256_storeu_ps(e.minus_weights + j, first ? wq : _mm256_add_ps(_mm256_loadu_ps(e.minus_weights + j), wq));
}

static inline void add_kept1(election_sums e, int64_t j, float kept, const task_args *a, int i) {
    const int first = i == 0;
    e.sums[j] = first ? kept : e.sums[j] + kept;
    if (!a->elect) return;
    const float p = kept > 0.0f ? kept : 0.0f, q = kept < 0.0f ? -kept : 0.0f;
    const float sp = kept > 0.0f ? 1.0f : 0.0f, sq = kept < 0.0f ? 1.0f : 0.0f;
    const float wp = a->unit_agree ? sp : sp * a->agree[i], wq = a->unit_agree ? sq : sq * a->agree[i];
    e.plus[j] = first ? p : e.plus[j] + p;
    e.minus[j] = first ? q : e.minus[j] + q;
    e.plus_weights[j] = first ? wp : e.plus_weights[j] + wp;
    e.minus_weights[j] = first ? wq : e.minus_weights[j] + wq;
}

/* out = C + merged·α at elements begin … begin + length − 1, merged = S, or with the election
 * e = sign(S), merged = T / max(W, tiny) · e where T, W = P, WP (S > 0), Q, WQ (S < 0), +0 (S = 0):
 * kept_i·e is kept_i or −kept_i exactly, so these are Σ max(kept_i·e, +0) and Σ [kept_i·e > 0]·v_i.
 * ``e``'s arrays start at element ``begin``. */
static void elect_and_store(const task_args *a, const election_sums *e, int64_t begin, int64_t length) {
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f), minus = _mm256_set1_ps(-1.0f);
    const __m256 tiny = _mm256_set1_ps(a->tiny), alpha = _mm256_set1_ps(a->alpha);
    const int64_t vectorized = length - length % 8;
    float *sums = e->sums;
    if (a->elect) {
        for (int64_t j = 0; j < vectorized; j += 8) {
            const __m256 s = _mm256_loadu_ps(sums + j);
            const __m256 positive = _mm256_cmp_ps(s, zero, _CMP_GT_OQ), negative = _mm256_cmp_ps(s, zero, _CMP_LT_OQ);
            const __m256 sign = _mm256_or_ps(_mm256_and_ps(positive, one), _mm256_and_ps(negative, minus));
            const __m256 t = _mm256_or_ps(_mm256_and_ps(positive, _mm256_loadu_ps(e->plus + j)),
                                          _mm256_and_ps(negative, _mm256_loadu_ps(e->minus + j)));
            const __m256 w = _mm256_or_ps(_mm256_and_ps(positive, _mm256_loadu_ps(e->plus_weights + j)),
                                          _mm256_and_ps(negative, _mm256_loadu_ps(e->minus_weights + j)));
            _mm256_storeu_ps(sums + j, _mm256_mul_ps(_mm256_div_ps(t, _mm256_max_ps(w, tiny)), sign));
        }
        for (int64_t j = vectorized; j < length; j++) {
            const float s = sums[j], sign = s > 0.0f ? 1.0f : (s < 0.0f ? -1.0f : 0.0f);
            const float t = s > 0.0f ? e->plus[j] : (s < 0.0f ? e->minus[j] : 0.0f);
            const float w = s > 0.0f ? e->plus_weights[j] : (s < 0.0f ? e->minus_weights[j] : 0.0f);
            sums[j] = (t / (w > a->tiny ? w : a->tiny)) * sign;
        }
    }
    for (int64_t j = 0; j < vectorized; j += 8) {
        const __m256 c = load8(a->base, begin + j, a->in_dtype);
        store8(a->out, begin + j, _mm256_add_ps(c, _mm256_mul_ps(_mm256_loadu_ps(sums + j), alpha)), a->out_dtype);
    }
    for (int64_t j = vectorized; j < length; j++)
        store1(a->out, begin + j, load1(a->base, begin + j, a->in_dtype) + sums[j] * a->alpha, a->out_dtype);
}

int fused_task_export(const task_args *a) {
    if (a->models < 1 || a->start < 0 || a->stop > INT32_MAX || a->start > a->stop) return 1;
    if ((a->in_dtype != F16 && a->in_dtype != F32) || (a->out_dtype != F16 && a->out_dtype != F32)) return 1;
    const int m = a->models;
    float sums[TASK_BLOCK], plus[TASK_BLOCK], minus[TASK_BLOCK], plus_weights[TASK_BLOCK], minus_weights[TASK_BLOCK];
    const election_sums e = {sums, plus, minus, plus_weights, minus_weights};
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    __m256i bad = _mm256_setzero_si256();
    int bad1 = 0;
    for (int64_t begin = a->start; begin < a->stop; begin += TASK_BLOCK) {
        const int64_t length = begin + TASK_BLOCK < a->stop ? TASK_BLOCK : a->stop - begin;
        const int64_t vectorized = length - length % 8;
        for (int i = 0; i < m; i++) {
            const __m256 v = _mm256_set1_ps(a->agree[i]);
            for (int64_t j = 0; j < vectorized; j += 8) { /* add_kept8 by hand: as a call, 0.60 → 0.75 ns */
                const __m256 kept = kept8(a, i, begin + j, load8(a->base, begin + j, a->in_dtype), &bad);
                _mm256_storeu_ps(sums + j, i == 0 ? kept : _mm256_add_ps(_mm256_loadu_ps(sums + j), kept));
                if (!a->elect) continue;
                const __m256 above = _mm256_cmp_ps(kept, zero, _CMP_GT_OQ), below = _mm256_cmp_ps(kept, zero, _CMP_LT_OQ);
                const __m256 p = _mm256_and_ps(kept, above), q = _mm256_and_ps(_mm256_xor_ps(kept, sign), below);
                const __m256 wp = a->unit_agree ? _mm256_and_ps(above, one) : _mm256_mul_ps(_mm256_and_ps(above, one), v);
                const __m256 wq = a->unit_agree ? _mm256_and_ps(below, one) : _mm256_mul_ps(_mm256_and_ps(below, one), v);
                _mm256_storeu_ps(plus + j, i == 0 ? p : _mm256_add_ps(_mm256_loadu_ps(plus + j), p));
                _mm256_storeu_ps(minus + j, i == 0 ? q : _mm256_add_ps(_mm256_loadu_ps(minus + j), q));
                _mm256_storeu_ps(plus_weights + j, i == 0 ? wp : _mm256_add_ps(_mm256_loadu_ps(plus_weights + j), wp));
                _mm256_storeu_ps(minus_weights + j, i == 0 ? wq : _mm256_add_ps(_mm256_loadu_ps(minus_weights + j), wq));
            }
            for (int64_t j = vectorized; j < length; j++)
                add_kept1(e, j, kept1(a, i, begin + j, load1(a->base, begin + j, a->in_dtype), &bad1), a, i);
        }
        elect_and_store(a, &e, begin, length);
    }
    return (_mm256_movemask_epi8(bad) || bad1) ? 2 : 0;
}

/* ---- top-k's cut of each model's delta: t_i, the k-th largest |d_i|'s bits, and cut_i, so that
 * "bits > t_i, or = t_i at a position < cut_i" keeps exactly k elements, equal |d_i| taken in index
 * order (as ``_top_k``). A radix select over |d_i|'s 31 bits computed on the fly: a histogram of the
 * top digit (11 bits up to SMALL_KEY elements, a histogram that stays in L1; else LARGE_DIGIT), then the
 * elements of the bucket that holds t_i gathered with their positions (when there are at most
 * ``gather_limit``, or all of a small key) and the rest of the select and the cut done on them in cache: two passes over the
 * data. A bucket too large to gather is selected by further passes over the data. A key of at least
 * ``sample_from`` elements first tries one pass bracketed by a sample (``sampled_cut``). 1 ≤ k < n (the
 * caller keeps all or none itself). Non-finite d give some t_i: the task pass that follows refuses
 * them. */
#define SMALL_KEY 65536
#define LARGE_DIGIT 12
#define HISTOGRAM_BITS 14 /* the histogram's entries: the first digit's four copies at LARGE_DIGIT bits */

static inline int32_t magnitude_bits1(const void *model, const void *base, int64_t j, int dtype) {
    const float d = load1(model, j, dtype) - load1(base, j, dtype);
    int32_t bits;
    memcpy(&bits, &d, 4);
    return bits & 0x7FFFFFFF;
}

static inline __m256i magnitude_bits8(const void *model, const void *base, int64_t j, int dtype) {
    const __m256 d = _mm256_sub_ps(load8(model, j, dtype), load8(base, j, dtype));
    return _mm256_and_si256(_mm256_castps_si256(d), _mm256_set1_epi32(0x7FFFFFFF));
}

/* the bucket, counted from the top, that holds the k-th largest entry; *above: the entries above it.
 * Groups of 8 buckets whose sum keeps the count below k are passed whole (a histogram of 2048
 * buckets is mostly empty above the data's largest value). */
static int bucket_of(const uint32_t *histogram, int buckets, int64_t k, int64_t *above) {
    int64_t total = 0;
    int b = buckets - 1;
    for (; b >= 8; b -= 8) { /* buckets b − 7 … b, all above bucket 0 */
        const __m256i counts = _mm256_loadu_si256((const __m256i *)(histogram + b - 7));
        const __m256i wide = _mm256_add_epi64(_mm256_cvtepu32_epi64(_mm256_castsi256_si128(counts)),
                                              _mm256_cvtepu32_epi64(_mm256_extracti128_si256(counts, 1)));
        int64_t lanes[4];
        _mm256_storeu_si256((__m256i *)lanes, wide);
        const int64_t group = lanes[0] + lanes[1] + lanes[2] + lanes[3];
        if (total + group >= k) break;
        total += group;
    }
    for (; b > 0; b--) {
        if (total + histogram[b] >= k) {
            *above = total;
            return b;
        }
        total += histogram[b];
    }
    *above = total;
    return 0;
}

/* The select's state: the bits decided so far (``prefix``, at the places ``known``), how many
 * elements lie above them, how many equal them, and how many bits remain below (``undecided``). */
typedef struct {
    uint32_t prefix, known;
    int64_t above, ties;
    int undecided;
} select_state;

static void decide(select_state *st, const uint32_t *histogram, int width, int64_t k) {
    const int shift = st->undecided - width;
    int64_t higher;
    const int b = bucket_of(histogram, 1 << width, k - st->above, &higher);
    st->above += higher;
    st->ties = histogram[b];
    st->prefix |= (uint32_t)b << shift;
    st->known |= ((1u << width) - 1) << shift;
    st->undecided = shift;
}

/* The first digit's histogram (nothing known yet) counted into four copies, lane l into copy l % 4,
 * then summed into the first: the data's |d| crowd into a few buckets, and one copy's increments of
 * the same bucket wait on each other (~0.85 → ~0.55 ns an element at 11–12 bits). ``histogram``
 * holds the four copies: 4 · 2^width entries. */
#define FOUR_COPIES_FROM 16384
static void first_digit_four_copies(const void *model, const void *base, int dtype, int64_t n, int width,
                                    uint32_t *histogram) {
    const int shift = 31 - width;
    const int64_t buckets = (int64_t)1 << width, vectorized = n - n % 8;
    uint32_t *c0 = histogram, *c1 = histogram + buckets, *c2 = histogram + 2 * buckets, *c3 = histogram + 3 * buckets;
    int32_t lanes[8];
    memset(histogram, 0, sizeof(uint32_t) * 4 * (size_t)buckets);
    for (int64_t j = 0; j < vectorized; j += 8) {
        _mm256_storeu_si256((__m256i *)lanes, _mm256_srli_epi32(magnitude_bits8(model, base, j, dtype), shift));
        c0[lanes[0]]++, c1[lanes[1]]++, c2[lanes[2]]++, c3[lanes[3]]++;
        c0[lanes[4]]++, c1[lanes[5]]++, c2[lanes[6]]++, c3[lanes[7]]++;
    }
    for (int64_t j = vectorized; j < n; j++) c0[(uint32_t)magnitude_bits1(model, base, j, dtype) >> shift]++;
    for (int64_t b = 0; b < buckets; b++) c0[b] += c1[b] + c2[b] + c3[b];
}

/* one digit of the select over the data: a histogram of the elements that match the prefix */
static void digit_over_data(select_state *st, const void *model, const void *base, int dtype, int64_t n,
                            int64_t k, int digit, uint32_t *histogram) {
    const int width = st->undecided < digit ? st->undecided : digit, shift = st->undecided - width;
    const uint32_t mask = (1u << width) - 1;
    if (!st->known && n >= FOUR_COPIES_FROM && 4 << width <= 1 << HISTOGRAM_BITS) {
        first_digit_four_copies(model, base, dtype, n, width, histogram);
        decide(st, histogram, width, k);
        return;
    }
    const int64_t vectorized = n - n % 8;
    int32_t lanes[8];
    memset(histogram, 0, sizeof(uint32_t) << width);
    const __m256i known8 = _mm256_set1_epi32((int32_t)st->known), prefix8 = _mm256_set1_epi32((int32_t)st->prefix);
    for (int64_t j = 0; j < vectorized; j += 8) {
        const __m256i bits = magnitude_bits8(model, base, j, dtype);
        const int hits = st->known ? _mm256_movemask_ps(_mm256_castsi256_ps(
                                         _mm256_cmpeq_epi32(_mm256_and_si256(bits, known8), prefix8)))
                                   : 0xFF;
        if (!hits) continue;
        _mm256_storeu_si256((__m256i *)lanes, bits);
        for (int l = 0; l < 8; l++)
            if (hits >> l & 1) histogram[((uint32_t)lanes[l] >> shift) & mask]++;
    }
    for (int64_t j = vectorized; j < n; j++) {
        const uint32_t bits = (uint32_t)magnitude_bits1(model, base, j, dtype);
        if ((bits & st->known) == st->prefix) histogram[(bits >> shift) & mask]++;
    }
    decide(st, histogram, width, k);
}

/* Left-packing 8 lanes: PACKED_LANES[mask] lists the lanes set in mask, in order (then lane 0 again). */
static int32_t PACKED_LANES[256][8];

__attribute__((constructor)) static void fill_packed_lanes(void) {
    for (int mask = 0; mask < 256; mask++) {
        int count = 0;
        for (int lane = 0; lane < 8; lane++)
            if (mask >> lane & 1) PACKED_LANES[mask][count++] = lane;
        while (count < 8) PACKED_LANES[mask][count++] = 0;
    }
}

/* The scratch of the gathers: ``bits`` then ``positions``, each ``capacity`` + GATHER_SLACK entries
 * (``append_hits`` stores all 8 lanes and keeps those it counts). */
#define GATHER_SLACK 8
static inline int32_t *positions_of(int32_t *gathered, int64_t capacity) { return gathered + capacity + GATHER_SLACK; }

/* the lanes of ``b`` set in ``hits`` appended to bits/positions (position j + lane), without a
 * branch (one taken at an element's few-per-cent odds cost as much as the pass); the new count */
static inline int64_t append_hits(__m256i b, int hits, int64_t j, int32_t *bits, int32_t *positions, int64_t count) {
    const __m256i lanes = _mm256_loadu_si256((const __m256i *)PACKED_LANES[hits]);
    _mm256_storeu_si256((__m256i *)(bits + count), _mm256_permutevar8x32_epi32(b, lanes));
    _mm256_storeu_si256((__m256i *)(positions + count), _mm256_add_epi32(_mm256_set1_epi32((int32_t)j), lanes));
    return count + __builtin_popcount((unsigned)hits);
}

/* the elements that match the prefix, their bits and positions in index order; returns the count */
static int64_t gather(const select_state *st, const void *model, const void *base, int dtype, int64_t n,
                      int32_t *bits_out, int32_t *positions) {
    const int64_t vectorized = n - n % 8;
    const __m256i known8 = _mm256_set1_epi32((int32_t)st->known), prefix8 = _mm256_set1_epi32((int32_t)st->prefix);
    int64_t count = 0;
    for (int64_t j = 0; j < vectorized; j += 8) {
        const __m256i bits = magnitude_bits8(model, base, j, dtype);
        const int hits = _mm256_movemask_ps(_mm256_castsi256_ps(
            _mm256_cmpeq_epi32(_mm256_and_si256(bits, known8), prefix8)));
        count = append_hits(bits, hits, j, bits_out, positions, count);
    }
    for (int64_t j = vectorized; j < n; j++) {
        const uint32_t bits = (uint32_t)magnitude_bits1(model, base, j, dtype);
        if ((bits & st->known) == st->prefix) {
            bits_out[count] = (int32_t)bits;
            positions[count++] = (int32_t)j;
        }
    }
    return count;
}

/* the rest of the select on elements held in memory (their bits in ``bits``): digits of 11 bits */
static void select_held(select_state *st, const int32_t *bits, int64_t count, int64_t k, uint32_t *histogram) {
    while (st->undecided > 0) {
        const int width = st->undecided < 11 ? st->undecided : 11, shift = st->undecided - width;
        const uint32_t mask = (1u << width) - 1;
        memset(histogram, 0, sizeof(uint32_t) << width);
        for (int64_t g = 0; g < count; g++)
            if (((uint32_t)bits[g] & st->known) == st->prefix) histogram[((uint32_t)bits[g] >> shift) & mask]++;
        decide(st, histogram, width, k);
    }
}

/* The k-th smallest of a[0..n) by quickselect (Hoare's partition, median-of-three pivot); a is
 * reordered. */
static int32_t kth_smallest(int32_t *a, int64_t n, int64_t index) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        const int32_t x = a[lo], y = a[lo + (hi - lo) / 2], z = a[hi];
        const int32_t pivot = x < y ? (y < z ? y : (x < z ? z : x)) : (x < z ? x : (y < z ? z : y));
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] < pivot) i++;
            while (a[j] > pivot) j--;
            if (i <= j) {
                const int32_t swap = a[i];
                a[i++] = a[j];
                a[j--] = swap;
            }
        }
        if (index <= j) hi = j;
        else if (index >= i) lo = i;
        else return pivot; /* between the parts: equal to the pivot */
    }
    return a[index];
}

/* The rest of the select on gathered elements, all matching the prefix, the k-th largest among them:
 * up to FEW_GATHERED by quickselect on a copy in ``work`` (the digits' histograms cost ~1 µs each to
 * clear and scan, more than the select of a few hundred), else by digits of 11 bits. */
#define FEW_GATHERED 2048
static void select_gathered(select_state *st, const int32_t *bits, int64_t count, int64_t k, uint32_t *work) {
    if (count > FEW_GATHERED) {
        select_held(st, bits, count, k, work);
        return;
    }
    int32_t *copy = (int32_t *)work;
    memcpy(copy, bits, sizeof(int32_t) * (size_t)count);
    const int32_t t = kth_smallest(copy, count, count - (k - st->above)); /* above < k ≤ above + count */
    int64_t above = 0, ties = 0;
    for (int64_t g = 0; g < count; g++) {
        above += bits[g] > t;
        ties += bits[g] == t;
    }
    st->above += above, st->ties = ties;
    st->prefix = (uint32_t)t, st->known = 0x7FFFFFFFu, st->undecided = 0;
}

/* t and the cut from a finished select over gathered elements (all those equal to t among them, in
 * index order) */
static void cut_of_held(const select_state *st, const int32_t *bits, const int32_t *positions, int64_t count,
                        int64_t n, int64_t k, int32_t *threshold, int64_t *cut) {
    const int32_t t = (int32_t)st->prefix;
    const int64_t room = k - st->above;
    *threshold = t;
    *cut = n;
    if (st->ties == room) return;
    int64_t seen = 0; /* the position after the room-th element equal to t */
    for (int64_t g = 0; g < count; g++)
        if (bits[g] == t && ++seen == room) {
            *cut = (int64_t)positions[g] + 1;
            return;
        }
}

/* The k-th largest of a key in one pass, when a sample brackets it: SAMPLE_RUNS runs of SAMPLE_RUN
 * elements spread over the key, their order statistics around rank k·s/n ± (4σ + 16) give
 * [lo, hi]; one pass counts the elements above hi and gathers those in [lo, hi] (in index order), and
 * the select finishes on them in cache. Returns 0, with nothing decided, when the bracket missed t or
 * held more than ``capacity`` elements: the caller then runs the radix select over the data. */
#define SAMPLE_RUNS 512
#define SAMPLE_RUN 32
static int sampled_cut(const void *model, const void *base, int dtype, int64_t n, int64_t k, uint32_t *histogram,
                       int32_t *gathered, int64_t capacity, int32_t *threshold, int64_t *cut) {
    const int64_t s = SAMPLE_RUNS * SAMPLE_RUN;
    if (n < 4 * s || capacity < s) return 0;
    int32_t *sample = gathered;
    for (int64_t r = 0; r < SAMPLE_RUNS; r++) {
        const int64_t start = r * (n - SAMPLE_RUN) / (SAMPLE_RUNS - 1);
        for (int64_t j = 0; j < SAMPLE_RUN; j++) sample[r * SAMPLE_RUN + j] = magnitude_bits1(model, base, start + j, dtype);
    }
    const double expected = (double)k * (double)s / (double)n, p = (double)k / (double)n;
    const double spread = 4.0 * _mm_cvtsd_f64(_mm_sqrt_sd(_mm_setzero_pd(), _mm_set_sd(expected * (1.0 - p)))) + 16.0;
    const int64_t rank_hi = (int64_t)(expected - spread), rank_lo = (int64_t)(expected + spread) + 1; /* wider, not narrower */
    uint32_t hi = 0x7FFFFFFFu, lo = 0;
    if (rank_hi >= 1) {
        select_state st = {0, 0, 0, 0, 31};
        select_held(&st, sample, s, rank_hi, histogram);
        hi = st.prefix;
    }
    if (rank_lo <= s) {
        select_state st = {0, 0, 0, 0, 31};
        select_held(&st, sample, s, rank_lo, histogram);
        lo = st.prefix;
    }
    const int64_t vectorized = n - n % 8;
    const __m256i hi8 = _mm256_set1_epi32((int32_t)hi), below_lo8 = _mm256_set1_epi32((int32_t)lo - 1);
    int32_t *bits = gathered, *positions = positions_of(gathered, capacity);
    int64_t above = 0, count = 0;
    for (int64_t j = 0; j < vectorized; j += 8) {
        const __m256i b = magnitude_bits8(model, base, j, dtype);
        const __m256i over = _mm256_cmpgt_epi32(b, hi8);
        above += __builtin_popcount(_mm256_movemask_ps(_mm256_castsi256_ps(over)));
        const int hits = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_andnot_si256(over, _mm256_cmpgt_epi32(b, below_lo8))));
        if (count + __builtin_popcount((unsigned)hits) > capacity) return 0;
        count = append_hits(b, hits, j, bits, positions, count);
    }
    for (int64_t j = vectorized; j < n; j++) {
        const uint32_t b = (uint32_t)magnitude_bits1(model, base, j, dtype);
        if (b > hi) above++;
        else if (b >= lo) {
            if (count >= capacity) return 0;
            bits[count] = (int32_t)b;
            positions[count++] = (int32_t)j;
        }
    }
    if (above >= k || above + count < k) return 0; /* t is not in [lo, hi] */
    select_state st = {0, 0, above, 0, 31};
    select_gathered(&st, bits, count, k, histogram);
    cut_of_held(&st, bits, positions, count, n, k, threshold, cut);
    return 1;
}

/* t and the cut of a key of at most SMALL_SELECT elements: their bits held, t by quickselect on a
 * copy, the cut by one scan (a histogram's fixed cost, ~0.35 µs, would be most of the work; at 256
 * elements the radix select is ~1.8× faster, at 128 equal: 100 models, one thread). ``scratch``: 2n. */
#define SMALL_SELECT 128
static void small_cut(const void *model, const void *base, int dtype, int64_t n, int64_t k, int32_t *scratch,
                      int32_t *threshold, int64_t *cut) {
    int32_t *bits = scratch, *work = scratch + n;
    for (int64_t j = 0; j < n; j++) work[j] = bits[j] = magnitude_bits1(model, base, j, dtype);
    const int32_t t = kth_smallest(work, n, n - k);
    int64_t above = 0, ties = 0;
    for (int64_t j = 0; j < n; j++) {
        above += bits[j] > t;
        ties += bits[j] == t;
    }
    const int64_t room = k - above;
    *threshold = t;
    *cut = n;
    if (ties == room) return;
    int64_t seen = 0;
    for (int64_t j = 0; j < n; j++)
        if (bits[j] == t && ++seen == room) {
            *cut = j + 1;
            return;
        }
}

static void top_k_cut(const void *model, const void *base, int dtype, int64_t n, int64_t k, uint32_t *histogram,
                      int32_t *gathered, int64_t capacity, int64_t sample_from, int32_t *threshold, int64_t *cut) {
    if (n <= SMALL_SELECT) {
        small_cut(model, base, dtype, n, k, gathered, threshold, cut);
        return;
    }
    if (n >= sample_from && sampled_cut(model, base, dtype, n, k, histogram, gathered, capacity, threshold, cut))
        return;
    const int digit = n <= SMALL_KEY ? 11 : LARGE_DIGIT;
    select_state st = {0, 0, 0, 0, 31};
    digit_over_data(&st, model, base, dtype, n, k, digit, histogram);
    while (st.undecided > 0 && st.ties > capacity) digit_over_data(&st, model, base, dtype, n, k, digit, histogram);
    *cut = n;
    if (st.undecided == 0) { /* the threshold is known; the cut, if needed, by one more pass */
        *threshold = (int32_t)st.prefix;
        const int64_t room = k - st.above;
        if (st.ties == room) return;
        int64_t seen = 0;
        for (int64_t j = 0; j < n; j++)
            if (magnitude_bits1(model, base, j, dtype) == (int32_t)st.prefix && ++seen == room) {
                *cut = j + 1;
                return;
            }
        return;
    }
    int32_t *bits = gathered, *positions = positions_of(gathered, capacity);
    const int64_t count = gather(&st, model, base, dtype, n, bits, positions);
    select_gathered(&st, bits, count, k, histogram);
    cut_of_held(&st, bits, positions, count, n, k, threshold, cut);
}

/* Returns 3 when the scratch (8 bytes per element gathered) cannot be allocated. */
int fused_top_k_cuts(const void *const *models, int32_t count, const void *base, int32_t dtype, int64_t n,
                     int64_t k, int64_t gather_limit, int64_t sample_from, int32_t *thresholds, int64_t *cuts) {
    if ((dtype != F16 && dtype != F32) || k < 1 || k >= n || n > INT32_MAX || count < 0 || gather_limit < 1)
        return 1;
    const int64_t capacity = n <= SMALL_KEY ? n : (gather_limit < n ? gather_limit : n);
    uint32_t *histogram = malloc(sizeof(uint32_t) << HISTOGRAM_BITS);
    int32_t *gathered = malloc(sizeof(int32_t) * 2 * (size_t)(capacity + GATHER_SLACK));
    if (!histogram || !gathered) {
        free(histogram);
        free(gathered);
        return 3;
    }
    for (int i = 0; i < count; i++)
        top_k_cut(models[i], base, dtype, n, k, histogram, gathered, capacity, sample_from, thresholds + i,
                  cuts + i);
    free(histogram);
    free(gathered);
    return 0;
}

/* ---- a run's key of n elements from its element ``first`` on: ``rule`` with its buffers moved there,
 * the models' pointers written into ``sources`` (``rule->models`` of them). */
static task_args key_of_run(const task_args *rule, int64_t first, int64_t n, const void **sources) {
    const size_t size = rule->in_dtype == F16 ? 2 : 4, out_size = rule->out_dtype == F16 ? 2 : 4;
    task_args key = *rule;
    for (int i = 0; i < rule->models; i++) sources[i] = (const char *)rule->sources[i] + first * size;
    key.start = 0, key.stop = n;
    key.base = (const char *)rule->base + first * size;
    key.out = (char *)rule->out + first * out_size;
    key.sources = sources;
    return key;
}

/* A run of small keys laid back to back (one view of each source's run): each key's top-k cuts
 * (or its draws' keys) and its merge, key after key, in one call: at a small width the per-key calls
 * cost more than the merge. ``rule``: the run's merge (its start, stop, thresholds, cuts and draw_keys
 * are set here for each key; its base, sources and out point at the run's first element); key j holds
 * elements offsets[j] … offsets[j + 1] − 1 of the run. Top-k: keep_counts[j] is its k (0 ≤ k ≤ n);
 * drop: draw_keys[2·(j·models + i)] … are model i's (k0, k1) for key j. Returns 0, 2 when a key has a
 * non-finite delta or kept value (the keys after it are not merged), 1 for arguments it does not take,
 * 3 when its scratch cannot be allocated. */
int fused_task_run(const task_args *rule, int32_t keys, const int64_t *offsets, const int64_t *keep_counts,
                   const uint32_t *draw_keys, int64_t sample_from) {
    if (keys < 1 || rule->models < 1 || offsets[0] < 0) return 1;
    if (rule->in_dtype != F16 && rule->in_dtype != F32) return 1;
    const int m = rule->models;
    int64_t capacity = 1;
    for (int32_t j = 0; j < keys; j++) {
        const int64_t n = offsets[j + 1] - offsets[j];
        if (n < 1 || n > INT32_MAX) return 1;
        if (rule->keep_mode == KEEP_TOP_K && (keep_counts[j] < 0 || keep_counts[j] > n)) return 1;
        if (n > capacity) capacity = n;
    }
    const void **sources = malloc(sizeof(void *) * (size_t)m);
    int32_t *thresholds = malloc(sizeof(int32_t) * (size_t)m);
    int64_t *cuts = malloc(sizeof(int64_t) * (size_t)m);
    uint32_t *histogram = malloc(sizeof(uint32_t) << HISTOGRAM_BITS);
    int32_t *gathered = malloc(sizeof(int32_t) * 2 * (size_t)(capacity + GATHER_SLACK));
    int code = (sources && thresholds && cuts && histogram && gathered) ? 0 : 3;
    for (int32_t j = 0; j < keys && !code; j++) {
        const int64_t n = offsets[j + 1] - offsets[j];
        task_args key = key_of_run(rule, offsets[j], n, sources);
        if (rule->keep_mode == KEEP_TOP_K) {
            const int64_t k = keep_counts[j];
            for (int i = 0; i < m; i++) {
                if (k == n || k == 0) /* all or none: t = −1 keeps every |Δ|, t = INT32_MAX none */
                    thresholds[i] = k == n ? -1 : INT32_MAX, cuts[i] = 0;
                else
                    top_k_cut(sources[i], key.base, rule->in_dtype, n, k, histogram, gathered, capacity,
                              sample_from, thresholds + i, cuts + i);
            }
            key.thresholds = thresholds, key.cuts = cuts;
        } else {
            key.draw_keys = draw_keys + (int64_t)2 * j * m;
        }
        code = fused_task_export(&key);
    }
    free(sources);
    free(thresholds);
    free(cuts);
    free(histogram);
    free(gathered);
    return code;
}

/* ---- Model Stock of one key, in three calls over pieces of it (``model_stock.py`` has the formula):
 * ``fused_stock_sums``: D = Σ Δi (float32, from +0, in model order) into ``delta_sum``, and each
 * model's Σ Δi² (float64) into ``squares``; ``fused_stock_units``: with r_i, U = Σ Δi·r_i (float32,
 * from +0, in model order), ‖U‖² and Σ_i ‖Δi·r_i‖² (float64) into ``norms``; ``fused_stock_apply``:
 * out = C + s·D, rounded once. The float64 sums are over 4 lanes, block after block, the lanes added
 * last: a fixed order for a given piece (the caller's pieces do not depend on its threads). Returns 2
 * when some Δi is not finite (the caller's torch path names the source). */
#define STOCK_BLOCK 1024

static inline __m256d square_add(__m256d sum, __m128 x) {
    const __m256d wide = _mm256_cvtps_pd(x);
    return _mm256_add_pd(sum, _mm256_mul_pd(wide, wide));
}

static inline __m256d square8_add(__m256d sum, __m256 x) {
    return square_add(square_add(sum, _mm256_castps256_ps128(x)), _mm256_extractf128_ps(x, 1));
}

static inline double lanes_sum(__m256d x) {
    double lanes[4];
    _mm256_storeu_pd(lanes, x);
    return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
}

static inline int finite_bits(float x) {
    int32_t bits;
    memcpy(&bits, &x, 4);
    return (bits & 0x7FFFFFFF) < NOT_FINITE;
}

int fused_stock_sums(const void *const *models, int32_t count, const void *base, int32_t dtype, int64_t start,
                     int64_t stop, float *delta_sum, double *squares) {
    if ((dtype != F16 && dtype != F32) || count < 1 || start < 0 || stop < start) return 1;
    double *lanes = calloc((size_t)count * 5, sizeof(double)); /* each model's 4 lanes, then the tails */
    if (!lanes) return 3;
    double *tails = lanes + (size_t)count * 4;
    const __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF), limit = _mm256_set1_epi32(NOT_FINITE - 1);
    __m256i bad = _mm256_setzero_si256();
    int bad1 = 0;
    for (int64_t begin = start; begin < stop; begin += STOCK_BLOCK) {
        const int64_t end = begin + STOCK_BLOCK < stop ? begin + STOCK_BLOCK : stop;
        const int64_t vectorized = end - (end - begin) % 8;
        for (int64_t j = begin; j < vectorized; j += 8) _mm256_storeu_ps(delta_sum + j, _mm256_setzero_ps());
        for (int64_t j = vectorized; j < end; j++) delta_sum[j] = 0.0f;
        for (int i = 0; i < count; i++) {
            __m256d sum = _mm256_setzero_pd();
            for (int64_t j = begin; j < vectorized; j += 8) {
                const __m256 d = _mm256_sub_ps(load8(models[i], j, dtype), load8(base, j, dtype));
                bad = _mm256_or_si256(bad, _mm256_cmpgt_epi32(_mm256_and_si256(_mm256_castps_si256(d), magnitude), limit));
                _mm256_storeu_ps(delta_sum + j, _mm256_add_ps(_mm256_loadu_ps(delta_sum + j), d));
                sum = square8_add(sum, d);
            }
            _mm256_storeu_pd(lanes + 4 * i, _mm256_add_pd(_mm256_loadu_pd(lanes + 4 * i), sum));
            for (int64_t j = vectorized; j < end; j++) {
                const float d = load1(models[i], j, dtype) - load1(base, j, dtype);
                bad1 |= !finite_bits(d);
                delta_sum[j] = delta_sum[j] + d;
                tails[i] += (double)d * (double)d;
            }
        }
    }
    for (int i = 0; i < count; i++) squares[i] = lanes_sum(_mm256_loadu_pd(lanes + 4 * i)) + tails[i];
    free(lanes);
    return (_mm256_movemask_epi8(bad) || bad1) ? 2 : 0;
}

int fused_stock_units(const void *const *models, int32_t count, const void *base, int32_t dtype, int64_t start,
                      int64_t stop, const float *scales, double *norms) {
    if ((dtype != F16 && dtype != F32) || count < 1 || start < 0 || stop < start) return 1;
    float units[STOCK_BLOCK];
    __m256d unit_lanes = _mm256_setzero_pd(), sum_lanes = _mm256_setzero_pd();
    double unit_tail = 0.0, sum_tail = 0.0;
    for (int64_t begin = start; begin < stop; begin += STOCK_BLOCK) {
        const int64_t length = begin + STOCK_BLOCK < stop ? STOCK_BLOCK : stop - begin;
        const int64_t vectorized = length - length % 8;
        for (int64_t j = 0; j < vectorized; j += 8) _mm256_storeu_ps(units + j, _mm256_setzero_ps());
        for (int64_t j = vectorized; j < length; j++) units[j] = 0.0f;
        for (int i = 0; i < count; i++) {
            const __m256 r = _mm256_set1_ps(scales[i]);
            for (int64_t j = 0; j < vectorized; j += 8) {
                const __m256 d = _mm256_sub_ps(load8(models[i], begin + j, dtype), load8(base, begin + j, dtype));
                const __m256 u = _mm256_mul_ps(d, r);
                unit_lanes = square8_add(unit_lanes, u);
                _mm256_storeu_ps(units + j, _mm256_add_ps(_mm256_loadu_ps(units + j), u));
            }
            for (int64_t j = vectorized; j < length; j++) {
                const float u = (load1(models[i], begin + j, dtype) - load1(base, begin + j, dtype)) * scales[i];
                unit_tail += (double)u * (double)u;
                units[j] = units[j] + u;
            }
        }
        for (int64_t j = 0; j < vectorized; j += 8) sum_lanes = square8_add(sum_lanes, _mm256_loadu_ps(units + j));
        for (int64_t j = vectorized; j < length; j++) sum_tail += (double)units[j] * (double)units[j];
    }
    norms[0] = lanes_sum(sum_lanes) + sum_tail;   /* ‖U‖² */
    norms[1] = lanes_sum(unit_lanes) + unit_tail; /* Σ ‖Δi·r_i‖² */
    return 0;
}

int fused_stock_apply(void *out, int32_t out_dtype, const void *base, int32_t dtype, const float *delta_sum,
                      float scale, int64_t start, int64_t stop) {
    if ((dtype != F16 && dtype != F32) || (out_dtype != F16 && out_dtype != F32) || start < 0 || stop < start)
        return 1;
    const __m256 s = _mm256_set1_ps(scale);
    const int64_t vectorized = stop - (stop - start) % 8;
    for (int64_t j = start; j < vectorized; j += 8)
        store8(out, j, _mm256_add_ps(load8(base, j, dtype), _mm256_mul_ps(_mm256_loadu_ps(delta_sum + j), s)), out_dtype);
    for (int64_t j = vectorized; j < stop; j++) store1(out, j, load1(base, j, dtype) + delta_sum[j] * scale, out_dtype);
    return 0;
}

/* r = 1 / max(‖Δ‖, 1e-12) rounded to float32, and s = α·t / N: ``model_stock.unit_scale`` and
 * ``stock_scale``, operation for operation in float64 (the tests compare the bits). */
static float unit_scale(double square_sum) {
    double norm = _mm_cvtsd_f64(_mm_sqrt_sd(_mm_setzero_pd(), _mm_set_sd(square_sum))); /* IEEE sqrt */
    if (norm < 1e-12) norm = 1e-12;
    return (float)(1.0 / norm);
}

static float stock_scale(double unit_sum_square, double unit_squares, int32_t count, double alpha) {
    double cos = (unit_sum_square - unit_squares) / ((double)count * (double)(count - 1));
    cos = cos < -1.0 ? -1.0 : (cos > 1.0 ? 1.0 : cos);
    const double denominator = 1.0 + (double)(count - 1) * cos;
    const double t = denominator > 0 ? (double)count * cos / denominator : 0.0;
    return (float)(alpha * t / (double)count);
}

/* Model Stock of each key of a run laid back to back (key j: elements offsets[j] … offsets[j + 1] − 1),
 * each key's three passes in turn, in one call. Returns 2 when a key has a non-finite delta (the keys
 * after it are not merged), 3 when its scratch cannot be allocated. */
int fused_stock_run(const void *const *models, int32_t count, const void *base, int32_t dtype, void *out,
                    int32_t out_dtype, int32_t keys, const int64_t *offsets, double alpha) {
    if ((dtype != F16 && dtype != F32) || (out_dtype != F16 && out_dtype != F32) || count < 2 || keys < 1)
        return 1;
    int64_t largest = 0;
    for (int32_t j = 0; j < keys; j++) {
        const int64_t n = offsets[j + 1] - offsets[j];
        if (n < 1 || offsets[j] < 0) return 1;
        if (n > largest) largest = n;
    }
    const size_t size = dtype == F16 ? 2 : 4, out_size = out_dtype == F16 ? 2 : 4;
    const void **sources = malloc(sizeof(void *) * (size_t)count);
    double *squares = malloc(sizeof(double) * (size_t)count);
    float *scales = malloc(sizeof(float) * (size_t)count), *delta_sum = malloc(sizeof(float) * (size_t)largest);
    int code = (sources && squares && scales && delta_sum) ? 0 : 3;
    for (int32_t j = 0; j < keys && !code; j++) {
        const int64_t first = offsets[j], n = offsets[j + 1] - first;
        for (int i = 0; i < count; i++) sources[i] = (const char *)models[i] + first * size;
        const void *key_base = (const char *)base + first * size;
        code = fused_stock_sums(sources, count, key_base, dtype, 0, n, delta_sum, squares);
        if (code) break;
        for (int i = 0; i < count; i++) scales[i] = unit_scale(squares[i]);
        double norms[2];
        code = fused_stock_units(sources, count, key_base, dtype, 0, n, scales, norms);
        if (code) break;
        code = fused_stock_apply((char *)out + first * out_size, out_dtype, key_base, dtype, delta_sum,
                                 stock_scale(norms[0], norms[1], count, alpha), 0, n);
    }
    free(sources);
    free(squares);
    free(scales);
    free(delta_sum);
    return code;
}

/* ---- the places of a key's elements (the live engine's top-k, the export's DELLA ranks): each element's position in its key's stable descending order
 * of |d| (ties by position), as ``torch.sort(bits(|d|).neg(), stable=True)`` orders them. An LSD radix
 * sort of k = 0x7FFFFFFF − bits(|d|) over only the bits where the keys differ (from the lowest to the
 * highest such bit: W bits in digits of at most 12 bits, and of at most log2(n) + 1 when n is small:
 * clearing and summing 2^12 counters each costs; fp16 sources' deltas leave the
 * lowest 7-12 bits shared, so 2 digits where fixed 11-bit digits took 3); each scatter is stable, so
 * equal k keep index order; the last scatter writes each element's position straight into
 * ``places``. ``scratch``: 4n uint32. */
#define PLACES_DIGIT 12
#define PLACES_DIGIT_MIN 8
int fused_places(const void *model, const void *base, int32_t dtype, int64_t n, int32_t *places, uint32_t *scratch) {
    if ((dtype != F16 && dtype != F32) || n < 0 || n > INT32_MAX) return 1;
    uint32_t *key_a = scratch, *index_a = scratch + n, *key_b = scratch + 2 * n, *index_b = scratch + 3 * n;
    const int64_t vectorized = n - n % 8;
    const __m256i top = _mm256_set1_epi32(0x7FFFFFFF);
    __m256i all = _mm256_set1_epi32(-1), any = _mm256_setzero_si256();
    for (int64_t j = 0; j < vectorized; j += 8) { /* the keys, and the bits every key has or none has */
        const __m256i k = _mm256_sub_epi32(top, magnitude_bits8(model, base, j, dtype));
        _mm256_storeu_si256((__m256i *)(key_b + j), k);
        all = _mm256_and_si256(all, k);
        any = _mm256_or_si256(any, k);
    }
    uint32_t lanes_all[8], lanes_any[8], every = 0xFFFFFFFFu, some = 0;
    _mm256_storeu_si256((__m256i *)lanes_all, all);
    _mm256_storeu_si256((__m256i *)lanes_any, any);
    for (int l = 0; l < 8; l++) every &= lanes_all[l], some |= lanes_any[l];
    for (int64_t j = vectorized; j < n; j++) {
        const uint32_t k = 0x7FFFFFFFu - (uint32_t)magnitude_bits1(model, base, j, dtype);
        key_b[j] = k;
        every &= k, some |= k;
    }
    const uint32_t varying = some & ~every;
    if (varying == 0) { /* every |d| equal: the order of the elements */
        for (int64_t q = 0; q < n; q++) places[q] = (int32_t)q;
        return 0;
    }
    const int low = __builtin_ctz(varying), width_all = 32 - __builtin_clz(varying) - low;
    int widest = 64 - __builtin_clzll((uint64_t)n); /* digits no wider than ~n buckets: clearing and summing them costs */
    widest = widest < PLACES_DIGIT_MIN ? PLACES_DIGIT_MIN : widest > PLACES_DIGIT ? PLACES_DIGIT : widest;
    const int digits = (width_all + widest - 1) / widest, width = (width_all + digits - 1) / digits;
    const uint32_t mask = (1u << width) - 1;
    int shifts[4];
    uint32_t counts[4 << PLACES_DIGIT], *offsets[4];
    for (int d = 0; d < digits; d++) shifts[d] = low + d * width, offsets[d] = counts + ((int64_t)d << width);
    memset(counts, 0, sizeof(uint32_t) * (size_t)(digits << width));
    if (digits == 1) {
        for (int64_t q = 0; q < n; q++) offsets[0][(key_b[q] >> shifts[0]) & mask]++;
    } else if (digits == 2) {
        for (int64_t q = 0; q < n; q++) {
            const uint32_t k = key_b[q];
            offsets[0][(k >> shifts[0]) & mask]++;
            offsets[1][(k >> shifts[1]) & mask]++;
        }
    } else {
        for (int64_t q = 0; q < n; q++) {
            const uint32_t k = key_b[q];
            for (int d = 0; d < digits; d++) offsets[d][(k >> shifts[d]) & mask]++;
        }
    }
    int same[4]; /* a digit every key shares leaves the order as it is: its pass is skipped */
    for (int d = 0; d < digits; d++) {
        same[d] = offsets[d][(key_b[0] >> shifts[d]) & mask] == n;
        uint32_t total = 0; /* counts → first positions */
        for (uint32_t b = 0; b <= mask; b++) {
            const uint32_t c = offsets[d][b];
            offsets[d][b] = total;
            total += c;
        }
    }
    const uint32_t *keys = key_b, *indices = NULL; /* NULL: the element at q is element q */
    for (int d = 0; d < digits - 1; d++) {
        if (same[d]) continue;
        uint32_t *key_to = keys == key_a ? key_b : key_a, *index_to = keys == key_a ? index_b : index_a;
        const int shift = shifts[d];
        uint32_t *offset = offsets[d];
        for (int64_t q = 0; q < n; q++) {
            const uint32_t k = keys[q];
            const uint32_t p = offset[(k >> shift) & mask]++;
            key_to[p] = k;
            index_to[p] = indices ? indices[q] : (uint32_t)q;
        }
        keys = key_to, indices = index_to;
    }
    const int shift = shifts[digits - 1]; /* the last digit: the final position */
    uint32_t *offset = offsets[digits - 1];
    if (indices == NULL)
        for (int64_t q = 0; q < n; q++) places[q] = (int32_t)offset[(keys[q] >> shift) & mask]++;
    else
        for (int64_t q = 0; q < n; q++) places[indices[q]] = (int32_t)offset[(keys[q] >> shift) & mask]++;
    return 0;
}

/* ---- DELLA over a run of keys (``fused_task_run``'s layout and returns), model after model: each
 * model's places in the stable descending order of |Δ_i| (``fused_places``), its keep probability
 * p_j = density + ε'·(r_j/n − (n+1)/(2n)) with r_j = n − place_j, clamped to [0, 1] (``_della_keep``'s
 * float32 operations in its order), kept_j = w_i·(u_j < p_j ? Δ_j / p_j : +0) with u_j the model's
 * draw (DARE's), added to the election's sums over the whole key (``add_kept8``), then
 * ``elect_and_store``. Per element these are ``fused_task_export``'s operations in its order; only the
 * loops are turned (groups of up to DELLA_GROUP models outside: their places sorted, then added tile by
 * tile), so that the scratch, 36 bytes an element of the largest key and 4 more per model of a group,
 * does not grow with the number of models (a model at a time, the sums went through memory once a
 * model: 8.5 ns an element-model for a key of 1.6 M, 2-3 ns in groups of 8). ``rule``: its density is
 * DELLA's, ``spread`` is ε';
 * draw_keys[2·(j·models + i)] … are model i's (k0, k1) for key j. */
static inline __m256 della_kept8(const task_args *a, int i, int64_t j, const int32_t *places, int64_t n,
                                 float spread, __m256i *bad) {
    const __m256i magnitude_mask = _mm256_set1_epi32(0x7FFFFFFF), huge = _mm256_set1_epi32(NOT_FINITE - 1);
    __m256 d = _mm256_sub_ps(load8(a->sources[i], j, a->in_dtype), load8(a->base, j, a->in_dtype));
    *bad = _mm256_or_si256(*bad, _mm256_cmpgt_epi32(_mm256_and_si256(_mm256_castps_si256(d), magnitude_mask), huge));
    const __m256i rank = _mm256_sub_epi32(_mm256_set1_epi32((int32_t)n), _mm256_loadu_si256((const __m256i *)(places + j)));
    const float middle = (float)((double)(n + 1) / (2.0 * (double)n));
    __m256 p = _mm256_div_ps(_mm256_cvtepi32_ps(rank), _mm256_set1_ps((float)n));
    p = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(p, _mm256_set1_ps(middle)), _mm256_set1_ps(spread)),
                      _mm256_set1_ps(a->density));
    p = _mm256_min_ps(_mm256_max_ps(p, _mm256_setzero_ps()), _mm256_set1_ps(1.0f));
    const __m256i index = _mm256_add_epi32(_mm256_set1_epi32((int32_t)j), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256 u = _mm256_castsi256_ps(draw_bits8(index, a->draw_keys[2 * i], a->draw_keys[2 * i + 1]));
    d = _mm256_and_ps(_mm256_div_ps(d, p), _mm256_cmp_ps(u, p, _CMP_LT_OQ));
    if (a->weighted) d = _mm256_mul_ps(d, _mm256_set1_ps(a->weights[i]));
    *bad = _mm256_or_si256(*bad, _mm256_cmpgt_epi32(_mm256_and_si256(_mm256_castps_si256(d), magnitude_mask), huge));
    return d;
}

static inline float della_kept1(const task_args *a, int i, int64_t j, const int32_t *places, int64_t n, float spread,
                                int *bad) {
    float d = load1(a->sources[i], j, a->in_dtype) - load1(a->base, j, a->in_dtype);
    int32_t bits;
    memcpy(&bits, &d, 4);
    *bad |= (bits & 0x7FFFFFFF) >= NOT_FINITE;
    const float middle = (float)((double)(n + 1) / (2.0 * (double)n));
    float p = (float)(int32_t)(n - places[j]) / (float)n;
    p = (p - middle) * spread + a->density;
    p = p > 0.0f ? p : 0.0f;
    p = p < 1.0f ? p : 1.0f;
    int32_t u_bits = draw_bits1(j, a->draw_keys[2 * i], a->draw_keys[2 * i + 1]);
    float u;
    memcpy(&u, &u_bits, 4);
    d = u < p ? d / p : 0.0f;
    if (a->weighted) d = d * a->weights[i];
    memcpy(&bits, &d, 4);
    *bad |= (bits & 0x7FFFFFFF) >= NOT_FINITE;
    return d;
}

/* Models first … first + count − 1's kept values added to the election's sums (5n floats: S, P, Q,
 * WP, WQ) at elements start … stop − 1 of a key of n, model g's places at places[g]: tile by tile
 * (``DELLA_TILE`` elements, whose sums stay in the cache), each tile model after model, so every
 * element's sums add in model order as one model at a time would. Returns 2 when some Δ or kept value
 * is not finite (the sums are then unusable), else 0. */
#define DELLA_TILE 2048
#define DELLA_GROUP 8                      /* models' places held at once, at most */
#define DELLA_GROUP_BYTES (64 << 20) /* and in at most this many bytes (one model's when larger) */
int fused_della_add(const task_args *a, int32_t first, int32_t count, int64_t n, const int32_t *const *places,
                    float spread, float *sums, int64_t start, int64_t stop) {
    if (first < 0 || count < 1 || first + count > a->models || n < 1 || n > INT32_MAX || start < 0 || stop > n ||
        start > stop)
        return 1;
    const election_sums e = {sums, sums + n, sums + 2 * n, sums + 3 * n, sums + 4 * n};
    __m256i bad = _mm256_setzero_si256();
    int bad1 = 0;
    for (int64_t tile = start; tile < stop; tile += DELLA_TILE) {
        const int64_t tile_stop = stop - tile < DELLA_TILE ? stop : tile + DELLA_TILE;
        const int64_t vectorized = tile_stop - (tile_stop - tile) % 8;
        for (int g = 0; g < count; g++) {
            const int i = first + g;
            const __m256 v = _mm256_set1_ps(a->agree[i]);
            for (int64_t j = tile; j < vectorized; j += 8)
                add_kept8(e, j, della_kept8(a, i, j, places[g], n, spread, &bad), a, i, v);
            for (int64_t j = vectorized; j < tile_stop; j++)
                add_kept1(e, j, della_kept1(a, i, j, places[g], n, spread, &bad1), a, i);
        }
    }
    return (_mm256_movemask_epi8(bad) || bad1) ? 2 : 0;
}

/* out at elements start … stop − 1 of a key of n from the election's sums (``elect_and_store``). */
int fused_della_finish(const task_args *a, float *sums, int64_t n, int64_t start, int64_t stop) {
    if (n < 1 || start < 0 || stop > n || start > stop) return 1;
    const election_sums e = {sums + start, sums + n + start, sums + 2 * n + start, sums + 3 * n + start,
                             sums + 4 * n + start};
    elect_and_store(a, &e, start, stop - start);
    return 0;
}

int fused_della_run(const task_args *rule, int32_t keys, const int64_t *offsets, const uint32_t *draw_keys,
                    float spread) {
    if (keys < 1 || rule->models < 1 || offsets[0] < 0) return 1;
    if ((rule->in_dtype != F16 && rule->in_dtype != F32) || (rule->out_dtype != F16 && rule->out_dtype != F32)) return 1;
    const int m = rule->models;
    int64_t largest = 1;
    for (int32_t j = 0; j < keys; j++) {
        const int64_t n = offsets[j + 1] - offsets[j];
        if (n < 1 || n > INT32_MAX) return 1;
        if (n > largest) largest = n;
    }
    int group = (int)(DELLA_GROUP_BYTES / (4 * largest)); /* models whose places are held at once */
    group = group < 1 ? 1 : group > DELLA_GROUP ? DELLA_GROUP : group;
    group = group > m ? m : group;
    const void **sources = malloc(sizeof(void *) * (size_t)m);
    float *sums = malloc(sizeof(float) * 5 * (size_t)largest);
    const int64_t stride = (largest + 15) / 16 * 16 + 16; /* rows 64 bytes off one another's cache sets */
    int32_t *places = malloc(sizeof(int32_t) * (size_t)stride * (size_t)group);
    uint32_t *sort_scratch = malloc(sizeof(uint32_t) * 4 * (size_t)largest);
    int code = (sources && sums && places && sort_scratch) ? 0 : 3;
    const int32_t *rows[DELLA_GROUP];
    for (int g = 0; g < group; g++) rows[g] = places + (int64_t)g * stride;
    for (int32_t j = 0; j < keys && !code; j++) {
        const int64_t n = offsets[j + 1] - offsets[j];
        task_args key = key_of_run(rule, offsets[j], n, sources);
        key.draw_keys = draw_keys + (int64_t)2 * j * m;
        for (int first = 0; first < m && !code; first += group) {
            const int count = m - first < group ? m - first : group;
            for (int g = 0; g < count; g++)
                fused_places(sources[first + g], key.base, key.in_dtype, n, (int32_t *)rows[g], sort_scratch);
            code = fused_della_add(&key, first, count, n, rows, spread, sums, 0, n);
        }
        if (!code) fused_della_finish(&key, sums, n, 0, n);
    }
    free(sources);
    free(sums);
    free(places);
    free(sort_scratch);
    return code;
}

/* ---- the geometric median of one key (``geometric_median.py``): Weiszfeld's loop with
 * ``grid_norm``'s norms (each d_j² on a power-of-two grid below the largest, summed as integers: the
 * same bits in any order, so these loops give the torch path's bits) and ``weighted_mean``'s sums. */
static int ceil_log2(int64_t n) { return n <= 1 ? 0 : 64 - __builtin_clzll((uint64_t)(n - 1)); }

/* the largest of 8 int32 lanes of magnitude bits (non-negative, so ordered as their floats) */
static inline int32_t max_lane(__m256i v) {
    int32_t lanes[8], largest = 0;
    _mm256_storeu_si256((__m256i *)lanes, v);
    for (int l = 0; l < 8; l++) largest = lanes[l] > largest ? lanes[l] : largest;
    return largest;
}

/* Σ_j round(d_j²·scale) as int64 over d = a − b (b NULL: 0), elements start … stop − 1, and in *top
 * max_j |d_j| (float32; −1 when some d_j is not finite). A scale too large for the largest term gives
 * a meaningless sum (the caller checks the largest term's exponent and sums again). */
static int64_t grid_sum(const void *a, int32_t dtype, const float *b, int64_t start, int64_t stop, double scale,
                        float *top) {
    /* d² is exact in float64 and g = 1/scale a power of two, so d² + 2^52·g rounds d² to the grid
     * (ties to even) while d² < 2^52·g, and the sum's bits less 2^52·g's are round(d²/g) */
    const double offset = 4503599627370496.0 / scale;
    const __m256i magnitude_mask = _mm256_set1_epi32(0x7FFFFFFF);
    const __m256d offset4 = _mm256_set1_pd(offset);
    __m256i total4 = _mm256_setzero_si256(), largest8 = _mm256_setzero_si256();
    const int64_t vectorized = stop - (stop - start) % 8;
    for (int64_t j = start; j < vectorized; j += 8) {
        const __m256 d = b ? _mm256_sub_ps(load8(a, j, dtype), _mm256_loadu_ps(b + j)) : load8(a, j, dtype);
        largest8 = _mm256_max_epi32(largest8, _mm256_and_si256(_mm256_castps_si256(d), magnitude_mask));
        const __m256d low = _mm256_cvtps_pd(_mm256_castps256_ps128(d)), high = _mm256_cvtps_pd(_mm256_extractf128_ps(d, 1));
        total4 = _mm256_add_epi64(total4, _mm256_castpd_si256(_mm256_add_pd(_mm256_mul_pd(low, low), offset4)));
        total4 = _mm256_add_epi64(total4, _mm256_castpd_si256(_mm256_add_pd(_mm256_mul_pd(high, high), offset4)));
    }
    int64_t lanes[4];
    const int32_t largest_bits = max_lane(largest8);
    uint64_t offset_bits; /* a meaningless sum may wrap */
    memcpy(&offset_bits, &offset, sizeof offset_bits);
    uint64_t total = (uint64_t)0 - (uint64_t)(vectorized - start) * offset_bits;
    _mm256_storeu_si256((__m256i *)lanes, total4);
    for (int l = 0; l < 4; l++) total += (uint64_t)lanes[l];
    float largest;
    memcpy(&largest, &largest_bits, sizeof largest);
    int bad = largest_bits >= NOT_FINITE;
    for (int64_t j = vectorized; j < stop; j++) {
        const float d = b ? load1(a, j, dtype) - b[j] : load1(a, j, dtype);
        bad |= !finite_bits(d);
        largest = fabsf(d) > largest ? fabsf(d) : largest;
        const double q = (double)d * (double)d * scale;
        total += q < 9.0e18 ? (uint64_t)(int64_t)nearbyint(q) : 0;
    }
    *top = bad ? -1.0f : largest;
    return (int64_t)total;
}

/* 1/g of ``grid_norm``'s grid for a largest square of exponent e (2^(e−1) ≤ max d² < 2^e), n terms */
static double grid_scale(int64_t n, int exponent) {
    int steps = (52 < 62 - ceil_log2(n) ? 52 : 62 - ceil_log2(n)) - exponent;
    steps = steps < -1000 ? -1000 : steps > 1000 ? 1000 : steps;
    return ldexp(1.0, steps);
}

/* ``grid_norm`` of a − b (b NULL: 0); −1 when some difference is not finite. *guess: the largest
 * square's exponent expected (the last step's, for the same model), updated: one pass when right,
 * two when not (INT32_MIN: no guess yet). */
static float grid_norm(const void *a, int32_t dtype, const float *b, int64_t n, int *guess) {
    if (n == 0) return 0.0f;
    float top;
    int exponent;
    double scale = grid_scale(n, *guess == INT32_MIN ? 0 : *guess);
    int64_t total = grid_sum(a, dtype, b, 0, n, scale, &top);
    if (top < 0.0f) return -1.0f;
    frexp((double)top * (double)top, &exponent);
    if (exponent != *guess) {
        *guess = exponent;
        scale = grid_scale(n, exponent);
        total = grid_sum(a, dtype, b, 0, n, scale, &top);
    }
    return (float)sqrt((double)total / scale);
}

/* A share of ``grid_norm``s for a key of n split among threads: for each source i, over elements
 * start … stop − 1, its grid sum of d = M_i − b (b NULL: 0) on the grid of exponents[i] (as
 * ``grid_norm`` takes it for a largest square of that exponent) in sums[i], and its largest |d| in
 * tops[i] (−1 when some d is not finite). The integer sums of the shares add up to the whole's. */
int fused_grid_sums(const void *const *sources, int32_t count, int32_t dtype, const float *b, int64_t n, int64_t start,
                    int64_t stop, const int32_t *exponents, int64_t *sums, float *tops) {
    if ((dtype != F16 && dtype != F32) || count < 1 || start < 0 || stop > n || start > stop) return 1;
    for (int i = 0; i < count; i++) sums[i] = grid_sum(sources[i], dtype, b, start, stop, grid_scale(n, exponents[i]), tops + i);
    return 0;
}

/* max_j |a_j − b_j| over elements start … stop − 1 of float32 a and b; −1 when some difference is
 * not finite */
static float largest_difference(const float *a, const float *b, int64_t start, int64_t stop) {
    const __m256i magnitude_mask = _mm256_set1_epi32(0x7FFFFFFF);
    __m256i largest8 = _mm256_setzero_si256();
    const int64_t vectorized = stop - (stop - start) % 8;
    for (int64_t j = start; j < vectorized; j += 8) {
        const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j));
        largest8 = _mm256_max_epi32(largest8, _mm256_and_si256(_mm256_castps_si256(d), magnitude_mask));
    }
    int32_t bits = max_lane(largest8);
    for (int64_t j = vectorized; j < stop; j++) {
        const float d = a[j] - b[j];
        int32_t d_bits;
        memcpy(&d_bits, &d, sizeof d_bits);
        d_bits &= 0x7FFFFFFF;
        bits = d_bits > bits ? d_bits : bits;
    }
    if (bits >= NOT_FINITE) return -1.0f;
    float largest;
    memcpy(&largest, &bits, sizeof largest);
    return largest;
}

/* ``largest_difference`` of a share of a key (the threads' shares of a large key) */
int fused_largest_difference(const float *a, const float *b, int64_t start, int64_t stop, float *largest) {
    if (start < 0 || start > stop) return 1;
    *largest = largest_difference(a, b, start, stop);
    return 0;
}

/* Whether ``grid_norm`` of a d with largest |d_j| ``largest`` (≥ 0) is surely above ``bound`` (a
 * float32): the grid sum is at least its largest term's, rounded down by at most half a step
 * (2^−b of it, b ≥ 22), and √ and float32 lose 2^−24 more, so grid_norm(d) ≥ largest·(1 − 3e-7); a
 * margin of 1e-5 keeps its float32 above the bound. Then the stopping test needs no norm. */
#define LARGEST_TERM_SLACK 1e-5
static int surely_above(float largest, float bound) {
    return largest >= 0.0f && (double)largest * (1.0 - LARGEST_TERM_SLACK) > (double)bound;
}

/* Weiszfeld from ``median`` (the weighted mean, given): up to max_iter steps m ← Σ c_i·M_i / Σ c_i,
 * c_i = (1 / max(‖M_i − m‖, 1e-8))·w_i (float32; Σ c_i from +0, left to right), stopping once
 * ‖m_new − m‖ ≤ 1e-7·‖m_new‖. ``median`` ends as the result; ``scratch``: n floats, ``coefficients``:
 * m, ``guesses``: m + 2 (each norm's largest square's exponent, kept from step to step so that a
 * norm is one pass while it stays). Returns 2 when some difference is not finite (the torch path then
 * gives its inf or nan). */
int fused_geometric_median(const void *const *sources, int32_t models, int32_t dtype, const float *weights, int64_t n,
                           int32_t max_iter, float *median, float *scratch, float *coefficients, int32_t *guesses) {
    if ((dtype != F16 && dtype != F32) || models < 1 || n < 1) return 1;
    float *current = median, *updated = scratch;
    int code = 0;
    for (int i = 0; i < models + 2; i++) guesses[i] = INT32_MIN;
    for (int32_t step = 0; step < max_iter; step++) {
        float coefficient_sum = 0.0f;
        for (int i = 0; i < models; i++) {
            float distance = grid_norm(sources[i], dtype, current, n, guesses + i);
            if (distance < 0.0f) code = 2;
            distance = distance > 1e-8f ? distance : 1e-8f;
            coefficients[i] = (1.0f / distance) * weights[i]; /* torch's w / d: 1/d, then × w */
            coefficient_sum = coefficient_sum + coefficients[i];
        }
        if (code) break;
        fused_weighted_mean(updated, F32, sources, dtype, coefficients, models, n, coefficient_sum);
        /* ‖m_new − m‖ only near the stopping test: its grid's exponent moves each step (2 passes) */
        const float size = grid_norm(updated, F32, NULL, n, guesses + models + 1),
                    largest = largest_difference(updated, current, 0, n);
        float moved = largest;
        if (size < 0.0f || !surely_above(largest, 1e-7f * size)) {
            if (largest > 0.0f) frexp((double)largest * (double)largest, guesses + models);
            moved = grid_norm(updated, F32, current, n, guesses + models);
        }
        float *previous = current;
        current = updated, updated = previous;
        if (moved < 0.0f || size < 0.0f) {
            code = 2;
            break;
        }
        if (moved <= 1e-7f * size) break;
    }
    if (current != median) memcpy(median, current, sizeof(float) * (size_t)n);
    return code;
}

/* ``fused_geometric_median`` of each key of a run laid back to back (key j: elements offsets[j] …
 * offsets[j + 1] − 1 of every source and of ``out``), from ``weighted_mean``'s Σ w_i·M_i / divisor,
 * the result stored in out's dtype (rounded once): one call per thread's share of the run, so that
 * small keys cost no call each. Returns 2 at a key with a difference that is not finite (the caller
 * merges key by key), 3 when the scratch (8 bytes an element of the largest key) cannot be had. */
int fused_geometric_median_run(const void *const *sources, int32_t models, int32_t dtype, const float *weights,
                               float divisor, int32_t keys, const int64_t *offsets, int32_t max_iter, void *out,
                               int32_t out_dtype) {
    if ((dtype != F16 && dtype != F32) || (out_dtype != F16 && out_dtype != F32) || models < 1 || keys < 1 ||
        offsets[0] < 0)
        return 1;
    int64_t largest = 1;
    for (int32_t j = 0; j < keys; j++) {
        const int64_t n = offsets[j + 1] - offsets[j];
        if (n < 1) return 1;
        if (n > largest) largest = n;
    }
    const size_t size = dtype == F16 ? 2 : 4, out_size = out_dtype == F16 ? 2 : 4;
    const void **key_sources = malloc(sizeof(void *) * (size_t)models);
    float *median = malloc(sizeof(float) * 2 * (size_t)largest), *coefficients = malloc(sizeof(float) * (size_t)models);
    int32_t *guesses = malloc(sizeof(int32_t) * ((size_t)models + 2));
    int code = (key_sources && median && coefficients && guesses) ? 0 : 3;
    for (int32_t j = 0; j < keys && !code; j++) {
        const int64_t first = offsets[j], n = offsets[j + 1] - first;
        for (int i = 0; i < models; i++) key_sources[i] = (const char *)sources[i] + first * size;
        fused_weighted_mean(median, F32, key_sources, dtype, weights, models, n, divisor);
        code = fused_geometric_median(key_sources, models, dtype, weights, n, max_iter, median, median + largest,
                                      coefficients, guesses);
        if (code) break;
        void *key_out = (char *)out + first * out_size;
        const int64_t vectorized = n - n % 8;
        for (int64_t q = 0; q < vectorized; q += 8) store8(key_out, q, _mm256_loadu_ps(median + q), out_dtype);
        for (int64_t q = vectorized; q < n; q++) store1(key_out, q, median[q], out_dtype);
    }
    free(key_sources);
    free(median);
    free(coefficients);
    free(guesses);
    return code;
}

/* The CPU can run this file's instructions (AVX2 and F16C). */
int fused_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
}

int fused_args_size(void) { return (int)sizeof(fused_args); }
int task_args_size(void) { return (int)sizeof(task_args); }
