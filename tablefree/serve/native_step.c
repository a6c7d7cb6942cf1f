/* The body of a GPT-NeoX-shaped model's decode step with int8 block weights, in one call, and its int8 head
 * (tablefree/serve/native.py builds and loads it; docs/architecture.md, "The native body").
 *
 * A decode step of a small model spends most of its body's time between operations, not in them: each tensor
 * operation called from Python costs microseconds whatever its size, and a step makes about 20 per layer. Here the
 * same arithmetic runs as plain loops, once per step:
 *
 *   per layer: layer norm, the fused query-key-value product, rotary embedding of the query and key, the key and
 *   value written into each row's slot at its position, attention of each row over its slot's positions 0..its own,
 *   the output product, the MLP (up, activation, down) and the residual sums, in GPT-NeoX's order (parallel or not);
 *   then the final layer norm.
 *
 * Every row's arithmetic is the same whatever the other rows are (each product sums one row's values in a fixed
 * order), so a row's hidden state does not depend on its batch: the engine's greedy text stays batch-invariant.
 * Weights are int8 with one float32 scale per output channel; activations, the cache and all sums are float32.
 *
 * Then the int8 output head: rows quantised to uint8 codes, and their exact integer product with int8 weights.
 */

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#ifndef PARALLEL_PRODUCT
#define PARALLEL_PRODUCT 65536  /* multiply-adds from which a product is split between the threads */
#endif
#ifndef PARALLEL_ATTENTION
#define PARALLEL_ATTENTION 16384  /* and attention */
#endif

enum { ACT_GELU = 0, ACT_GELU_TANH = 1, ACT_RELU = 2, ACT_SILU = 3 };
enum {
    T_NORM1_W, T_NORM1_B, T_NORM2_W, T_NORM2_B,
    T_QKV_W, T_QKV_S, T_QKV_B, T_DENSE_W, T_DENSE_S, T_DENSE_B,
    T_UP_W, T_UP_S, T_UP_B, T_DOWN_W, T_DOWN_S, T_DOWN_B,
    T_KEYS, T_VALUES, T_PER_LAYER
};

/* The model's shape (tf_body's `shape`). */
enum {
    S_LAYERS, S_WIDTH, S_HEADS, S_SIZE, S_ROTARY, S_INNER, S_PARALLEL, S_ACT, S_SLOTS, S_CAPACITY, S_TABLE_LEN, S_COUNT
};

/* Vectors of LANES floats: x86's own types where it has them (GCC and Clang give them arithmetic operators, and
 * their widening of bytes is one instruction), else GCC's and Clang's vector extensions. */
#if defined(__AVX512F__)
#define LANES 16
typedef __m512 vec;
static inline vec load(const float *p) { return _mm512_loadu_ps(p); }
static inline void store(float *p, vec v) { _mm512_storeu_ps(p, v); }
static inline vec splat(float value) { return _mm512_set1_ps(value); }
static inline vec madd(vec acc, vec a, vec b) { return _mm512_fmadd_ps(a, b, acc); }  /* acc + a b, rounded once */
static inline vec widen(const int8_t *p) {  /* LANES int8 values as floats, exactly */
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
#elif defined(__AVX2__)
#define LANES 8
typedef __m256 vec;
static inline vec load(const float *p) { return _mm256_loadu_ps(p); }
static inline void store(float *p, vec v) { _mm256_storeu_ps(p, v); }
static inline vec splat(float value) { return _mm256_set1_ps(value); }
#ifdef __FMA__
static inline vec madd(vec acc, vec a, vec b) { return _mm256_fmadd_ps(a, b, acc); }
#else
static inline vec madd(vec acc, vec a, vec b) { return acc + a * b; }
#endif
static inline vec widen(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
#else
#define LANES 16
typedef float vec __attribute__((vector_size(LANES * sizeof(float))));
static inline vec load(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void store(float *p, vec v) { memcpy(p, &v, sizeof v); }
static inline vec splat(float value) {
    vec out;
    for (int l = 0; l < LANES; l++) out[l] = value;
    return out;
}
static inline vec widen(const int8_t *p) {
    vec out;
    for (int l = 0; l < LANES; l++) out[l] = (float)p[l];
    return out;
}
static inline vec madd(vec acc, vec a, vec b) { return acc + a * b; }  /* two roundings: contraction is off */
#endif

/* Outputs per block of the weight layout (`linear`). */
int tf_lanes(void) { return LANES; }

/* The LANES partial sums of `v`, added pairwise in one fixed order. */
static inline float sum_lanes(vec v) {
#if defined(__AVX512F__)
    return _mm512_reduce_add_ps(v);
#else
    float t[LANES];
    store(t, v);
    for (int width = LANES / 2; width > 1; width /= 2)
        for (int l = 0; l < width; l++) t[l] += t[l + width];
    return t[0] + t[1];
#endif
}

/* Sum of a[i] * b[i], i < n, in one fixed order: LANES partial sums, then the rest one at a time. */
static inline float dot(const float *a, const float *b, int n) {
    vec acc = {0};
    int i = 0;
    for (; i + LANES <= n; i += LANES) acc += load(a + i) * load(b + i);
    float total = sum_lanes(acc);
    for (; i < n; i++) total += a[i] * b[i];
    return total;
}

#if defined(__AVX512F__)
/* e^t for t <= 0, LANES at a time: e^t = 2^k e^r, k = round(t / ln 2), r = t - k ln 2 in [-ln 2 / 2, ln 2 / 2],
 * e^r by its Taylor polynomial to degree 6 (relative error below 3e-7 where e^t is a normal float32); exactly 0
 * from t = -104 down (where e^t rounds to 0 anyway), for -inf and for NaN. */
static inline __m512 exp_vec(__m512 t) {
    const __m512 lowest = _mm512_set1_ps(-104.0f), one = _mm512_set1_ps(1.0f);
    __mmask16 above = _mm512_cmp_ps_mask(t, lowest, _CMP_GT_OQ);
    t = _mm512_max_ps(t, lowest);
    __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(t, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.42860682030941723e-6f),
                                _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145751953125f), t));
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, one);
    p = _mm512_fmadd_ps(p, r, one);
    return _mm512_maskz_mov_ps(above, _mm512_scalef_ps(p, k));
}

static inline __mmask16 first_lanes(int count) {
    return count >= LANES ? (__mmask16)0xFFFF : (__mmask16)((1u << count) - 1);
}
#endif

/* x[i] = exp((x[i] - shift) / divisor) for i < n, in place, with their sum (in one fixed order for a given n);
 * (x[i] - shift) / divisor <= 0. Always inlined: attention's divisor of 1 then costs no division (x / 1 is x
 * exactly, so the compiler drops it), and a caller that ignores the sum costs no additions. */
static inline __attribute__((always_inline)) float exp_shifted(float *x, int n, float shift, float divisor) {
#if defined(__AVX512F__)
    const __m512 s = _mm512_set1_ps(shift), d = _mm512_set1_ps(divisor);
    __m512 total = _mm512_setzero_ps();
    for (int i = 0; i < n; i += LANES) {
        __mmask16 live = first_lanes(n - i);
        __m512 e = exp_vec(_mm512_div_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, x + i), s), d));
        e = _mm512_maskz_mov_ps(live, e);
        _mm512_mask_storeu_ps(x + i, live, e);
        total = _mm512_add_ps(total, e);
    }
    return _mm512_reduce_add_ps(total);
#else
    float total = 0.0f;
    for (int i = 0; i < n; i++) {
        x[i] = expf((x[i] - shift) / divisor);
        total += x[i];
    }
    return total;
#endif
}

/* exp_shifted for callers outside (the tests hold it to torch.exp). */
float tf_exp_shifted(float *x, int n, float shift, float divisor) { return exp_shifted(x, n, shift, divisor); }

/* Attention of one query over `seen` positions of one head: keys and values of position p at keys + p * stride
 * (and values + p * stride), `size` values each; the softmax of the scaled scores (in `scores`, room for `seen`)
 * weighs the values into `out`. */
static void attend(const float *q, const float *keys, const float *values, size_t stride, int seen, int size,
                   float scaling, float *scores, float *out) {
    float most = -INFINITY;
    const int blocks = size / LANES;
    if (size % LANES == 0 && blocks <= 4) {  /* the head in registers */
        vec query[4], acc[4];
        for (int b = 0; b < blocks; b++) query[b] = load(q + b * LANES);
        for (int p = 0; p < seen; p++) {
            const float *k = keys + (size_t)p * stride;
            vec sum = query[0] * load(k);
            for (int b = 1; b < blocks; b++) sum = madd(sum, query[b], load(k + b * LANES));
            scores[p] = sum_lanes(sum) * scaling;
            most = scores[p] > most ? scores[p] : most;
        }
        float total = exp_shifted(scores, seen, most, 1.0f);
        for (int b = 0; b < blocks; b++) acc[b] = splat(0.0f);
        for (int p = 0; p < seen; p++) {
            const float *v = values + (size_t)p * stride;
            vec weight = splat(scores[p]);
            for (int b = 0; b < blocks; b++) acc[b] = madd(acc[b], weight, load(v + b * LANES));
        }
        vec inverse = splat(1.0f / total);
        for (int b = 0; b < blocks; b++) store(out + b * LANES, acc[b] * inverse);
        return;
    }
    for (int p = 0; p < seen; p++) {
        scores[p] = dot(q, keys + (size_t)p * stride, size) * scaling;
        most = scores[p] > most ? scores[p] : most;
    }
    float total = exp_shifted(scores, seen, most, 1.0f);
    for (int i = 0; i < size; i++) out[i] = 0.0f;
    for (int p = 0; p < seen; p++) {
        const float *v = values + (size_t)p * stride;
        for (int i = 0; i < size; i++) out[i] += scores[p] * v[i];
    }
    for (int i = 0; i < size; i++) out[i] *= 1.0f / total;
}

/* Output blocks, and rows, one pass of `linear` computes together: independent sums, so their products overlap, and
 * each block's weights are widened once for all the rows. */
enum { GROUP = 4, ROWS = 4 };

/* GROUP blocks of outputs (or `count` < GROUP) for `rows` <= ROWS rows: acc[r][c][j] = sum over k of w[c][k][j] *
 * x[r][k], k in order, whatever `rows` and `count` are. */
static inline void block_sums(const float *x, int rows, int in, const int8_t *w, int count, vec acc[ROWS][GROUP]) {
    const size_t stride = (size_t)in * LANES;
    if (count == GROUP && rows == 1) {  /* one row: the sums alone in registers */
        vec a0 = splat(0.0f), a1 = a0, a2 = a0, a3 = a0;
        for (int k = 0; k < in; k++) {
            const int8_t *at = w + (size_t)k * LANES;
            vec xk = splat(x[k]);
            a0 = madd(a0, widen(at), xk);
            a1 = madd(a1, widen(at + stride), xk);
            a2 = madd(a2, widen(at + 2 * stride), xk);
            a3 = madd(a3, widen(at + 3 * stride), xk);
        }
        acc[0][0] = a0, acc[0][1] = a1, acc[0][2] = a2, acc[0][3] = a3;
        return;
    }
    for (int r = 0; r < ROWS; r++)
        for (int c = 0; c < GROUP; c++) acc[r][c] = splat(0.0f);
    for (int k = 0; k < in; k++) {
        vec weights[GROUP];
        for (int c = 0; c < GROUP; c++) weights[c] = c < count ? widen(w + c * stride + (size_t)k * LANES) : splat(0);
        for (int r = 0; r < ROWS; r++) {
            if (r >= rows) break;
            vec xk = splat(x[(size_t)r * in + k]);
            for (int c = 0; c < GROUP; c++) acc[r][c] = madd(acc[r][c], weights[c], xk);
        }
    }
}

/* y[r][o] = (sum_k w[o][k] x[r][k]) * scale[o] + bias[o] for rows r < n. `w` is in blocks of LANES outputs (block b:
 * for each input k, the weights of outputs b*LANES..b*LANES+LANES-1), `out` a multiple of LANES. Each output's sum
 * runs over k in order (one fused multiply-add a term), so a row's outputs do not depend on the other rows or on how
 * the outputs are split among threads. */
static void linear(const float *x, int n, int in, const int8_t *w, const float *scale, const float *bias, int out,
                   float *y) {
    const int blocks = out / LANES, groups = (blocks + GROUP - 1) / GROUP;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if ((long)n * out * in >= PARALLEL_PRODUCT)
#endif
    for (int g = 0; g < groups; g++) {
        int first = g * GROUP, count = blocks - first < GROUP ? blocks - first : GROUP;
        const int8_t *wg = w + (size_t)first * in * LANES;
        for (int r0 = 0; r0 < n; r0 += ROWS) {
            int rows = n - r0 < ROWS ? n - r0 : ROWS;
            vec acc[ROWS][GROUP];
            block_sums(x + (size_t)r0 * in, rows, in, wg, count, acc);
            for (int r = 0; r < rows; r++)
                for (int c = 0; c < count; c++) {
                    int o = (first + c) * LANES;
                    vec result = acc[r][c] * load(scale + o);
                    if (bias) result += load(bias + o);
                    store(y + (size_t)(r0 + r) * out + o, result);
                }
        }
    }
}

static void layer_norm(const float *x, int n, int width, const float *w, const float *b, float eps, float *y) {
    for (int r = 0; r < n; r++) {
        const float *row = x + (size_t)r * width;
        float *out = y + (size_t)r * width;
        float mean = 0.0f, var = 0.0f;
        for (int i = 0; i < width; i++) mean += row[i];
        mean /= (float)width;
        for (int i = 0; i < width; i++) {
            float d = row[i] - mean;
            var += d * d;
        }
        float inv = 1.0f / sqrtf(var / (float)width + eps);
        for (int i = 0; i < width; i++) out[i] = (row[i] - mean) * inv * w[i] + b[i];
    }
}

static void activate(float *x, size_t count, int act) {
    for (size_t i = 0; i < count; i++) {
        float v = x[i];
        switch (act) {
        case ACT_GELU: x[i] = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f)); break;
        case ACT_GELU_TANH:
            x[i] = 0.5f * v * (1.0f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
            break;
        case ACT_RELU: x[i] = v > 0.0f ? v : 0.0f; break;
        default: x[i] = v / (1.0f + expf(-v)); break;
        }
    }
}

/* GPT-NeoX's rotary embedding of one head's first `rotary` values: t * cos + cat(t2, t1) * sin, sin signed. */
static void rotate(float *t, int rotary, const float *cos, const float *sin) {
    int half = rotary / 2;
    float turned[rotary];
    for (int i = 0; i < rotary; i++) turned[i] = t[i] * cos[i] + t[i < half ? i + half : i - half] * sin[i];
    memcpy(t, turned, sizeof(float) * rotary);
}

/* Floats of scratch tf_body needs for n rows. */
long tf_scratch_floats(const int64_t *shape, int n) {
    long width = shape[S_WIDTH], inner = shape[S_INNER], capacity = shape[S_CAPACITY];
    long widest = inner > 3 * width ? inner : 3 * width;
    return n * (3 * width + widest + shape[S_HEADS] * capacity);
}

/* One step's body for n rows. x: (n, width) input vectors, overwritten by the final layer norm's output.
 * slots, positions: each row's slot and where its new token is written (it then reads positions 0..its own).
 * scratch: room for tf_scratch_floats(shape, n) floats. Returns 0, or -1 for a slot or position outside the cache
 * (or a position outside the rotary table), before anything is written. */
int tf_body(const int64_t *shape, void *const *tensors, const float *floats, int n, const int32_t *slots,
            const int32_t *positions, float *x, float *scratch) {
    const int layers = (int)shape[S_LAYERS], width = (int)shape[S_WIDTH], heads = (int)shape[S_HEADS];
    const int size = (int)shape[S_SIZE], rotary = (int)shape[S_ROTARY], inner = (int)shape[S_INNER];
    const int parallel = (int)shape[S_PARALLEL], act = (int)shape[S_ACT];
    const long capacity = shape[S_CAPACITY], table_len = shape[S_TABLE_LEN], slot_count = shape[S_SLOTS];
    const float eps = floats[0], scaling = floats[1], final_eps = floats[2];
    const float *cos_table = tensors[0], *sin_table = tensors[1];
    const float *final_w = tensors[2], *final_b = tensors[3];
    void *const *per_layer = tensors + 4;

    for (int r = 0; r < n; r++)
        if (positions[r] < 0 || positions[r] >= capacity || positions[r] >= table_len || slots[r] < 0 ||
            slots[r] >= slot_count)
            return -1;

    const int widest = inner > 3 * width ? inner : 3 * width;
    float *normed = scratch;                         /* n x width */
    float *attended = normed + (size_t)n * width;    /* n x width */
    float *wide = attended + (size_t)n * width;      /* n x widest: qkv, then the MLP's inner values */
    float *mixed = wide + (size_t)n * widest;        /* n x width: the output product, then the MLP's */
    float *scores = mixed + (size_t)n * width;       /* n x heads x capacity: each (row, head)'s own */

    for (int l = 0; l < layers; l++) {
        void *const *t = per_layer + (size_t)l * T_PER_LAYER;
        float *keys = t[T_KEYS], *values = t[T_VALUES];
        layer_norm(x, n, width, t[T_NORM1_W], t[T_NORM1_B], eps, normed);
        linear(normed, n, width, t[T_QKV_W], t[T_QKV_S], t[T_QKV_B], 3 * width, wide);
        /* qkv per row is (heads, 3, size): rotate q and k, then write k and v into the row's slot. */
        for (int r = 0; r < n; r++) {
            const float *cos = cos_table + (size_t)positions[r] * rotary;
            const float *sin = sin_table + (size_t)positions[r] * rotary;
            size_t at = ((size_t)slots[r] * capacity + positions[r]) * heads * size;
            for (int h = 0; h < heads; h++) {
                float *q = wide + (size_t)r * 3 * width + (size_t)h * 3 * size;
                rotate(q, rotary, cos, sin);
                rotate(q + size, rotary, cos, sin);
                memcpy(keys + at + (size_t)h * size, q + size, sizeof(float) * size);
                memcpy(values + at + (size_t)h * size, q + 2 * size, sizeof(float) * size);
            }
        }
        /* Each row attends over its slot's positions 0..its own, after every row wrote its key and value; the
         * (row, head) pairs are independent, each with scores of its own. */
        long work = 0;
        for (int r = 0; r < n; r++) work += (long)(positions[r] + 1) * heads * size;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic) if (work >= PARALLEL_ATTENTION)
#endif
        for (int pair = 0; pair < n * heads; pair++) {
            int r = pair / heads, h = pair % heads, seen = positions[r] + 1;
            size_t slot = (size_t)slots[r] * capacity * heads * size + (size_t)h * size;
            attend(wide + (size_t)r * 3 * width + (size_t)h * 3 * size, keys + slot, values + slot,
                   (size_t)heads * size, seen, size, scaling, scores + (size_t)pair * capacity,
                   attended + (size_t)r * width + (size_t)h * size);
        }
        linear(attended, n, width, t[T_DENSE_W], t[T_DENSE_S], t[T_DENSE_B], width, mixed);
        if (parallel) {
            /* x = mlp(norm2(x)) + attended + x */
            layer_norm(x, n, width, t[T_NORM2_W], t[T_NORM2_B], eps, normed);
            for (size_t i = 0; i < (size_t)n * width; i++) attended[i] = mixed[i];
        } else {
            for (size_t i = 0; i < (size_t)n * width; i++) x[i] = x[i] + mixed[i];
            layer_norm(x, n, width, t[T_NORM2_W], t[T_NORM2_B], eps, normed);
        }
        linear(normed, n, width, t[T_UP_W], t[T_UP_S], t[T_UP_B], inner, wide);
        activate(wide, (size_t)n * inner, act);
        linear(wide, n, inner, t[T_DOWN_W], t[T_DOWN_S], t[T_DOWN_B], width, mixed);
        if (parallel)
            for (size_t i = 0; i < (size_t)n * width; i++) x[i] = mixed[i] + attended[i] + x[i];
        else
            for (size_t i = 0; i < (size_t)n * width; i++) x[i] = x[i] + mixed[i];
    }
    layer_norm(x, n, width, final_w, final_b, final_eps, normed);
    memcpy(x, normed, sizeof(float) * (size_t)n * width);
    return 0;
}

/* One int8 linear layer over n rows, as tf_body computes it (the quality measurement runs the model through it). */
void tf_linear(const float *x, int n, int in, const int8_t *w, const float *scale, const float *bias, int out,
               float *y) {
    linear(x, n, in, w, scale, bias, out, y);
}

/* ---- The int8 output head: rows quantised to int8 codes, an exact integer product, the two scales. ---- */

/* Each row of x (n x in) as uint8 codes with zero point 128 and its scale, max |x| / 127 (at least FLT_MIN): the
 * same arithmetic as tablefree/serve/precision.py's Int8Head, so the same codes. */
void tf_quantize_rows(const float *x, int n, int in, uint8_t *codes, float *scales) {
    for (int r = 0; r < n; r++) {
        const float *row = x + (size_t)r * in;
        float most = 0.0f;
        int nan = 0;
        for (int k = 0; k < in; k++) {
            float a = fabsf(row[k]);
            if (a != a) nan = 1;
            if (a > most) most = a;
        }
        float scale = nan ? NAN : most / 127.0f;
        if (scale < 1.17549435e-38f) scale = 1.17549435e-38f;
        scales[r] = scale;
        /* |row[k] / scale| <= 127 for a finite row; a non-finite one (its scale NaN or infinite, so its logits are
         * too) gets the zero point wherever the quotient is not a code. */
        for (int k = 0; k < in; k++) {
            float q = rintf(row[k] / scale);
            codes[(size_t)r * in + k] = (uint8_t)(q >= -127.0f && q <= 127.0f ? (int)q + 128 : 128);
        }
    }
}

/* y[r][o] = float(sum_k (codes[r][k] - 128) w[o][k]) * w_scale[o] * scales[r] + bias[o]. `w` in blocks of 16
 * outputs by groups of 4 inputs (block b, group g: outputs b*16..b*16+15, each with its 4 weights of inputs 4g..4g+3),
 * `in` a multiple of 4, `out` of 16; `sums[o]` = 128 * sum_k w[o][k], the zero point's share. The integer sums are
 * exact whatever the order, so every path here gives the same logits. */
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
/* HEAD_BLOCKS blocks of 16 outputs for `rows` (<= HEAD_ROWS) rows: each group's weights are loaded once for every
 * row. */
enum { HEAD_BLOCKS = 4, HEAD_ROWS = 4 };
static inline void head_sums(const uint8_t *codes, int rows, int in, const int8_t *w, size_t stride,
                             int32_t total[HEAD_ROWS][HEAD_BLOCKS][16]) {
    __m512i acc[HEAD_ROWS][HEAD_BLOCKS];
    for (int r = 0; r < HEAD_ROWS; r++)
        for (int c = 0; c < HEAD_BLOCKS; c++) acc[r][c] = _mm512_setzero_si512();
    for (int g = 0; g < in / 4; g++) {
        __m512i weights[HEAD_BLOCKS];
        for (int c = 0; c < HEAD_BLOCKS; c++) weights[c] = _mm512_loadu_si512(w + c * stride + (size_t)g * 64);
        for (int r = 0; r < HEAD_ROWS; r++) {
            if (r >= rows) break;
            int32_t four;
            memcpy(&four, codes + (size_t)r * in + 4 * g, 4);
            __m512i x = _mm512_set1_epi32(four);
            for (int c = 0; c < HEAD_BLOCKS; c++) acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], x, weights[c]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < HEAD_BLOCKS; c++) _mm512_storeu_si512(total[r][c], acc[r][c]);
}
#else
enum { HEAD_BLOCKS = 4, HEAD_ROWS = 4 };
static inline void head_sums(const uint8_t *codes, int rows, int in, const int8_t *w, size_t stride,
                             int32_t total[HEAD_ROWS][HEAD_BLOCKS][16]) {
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < HEAD_BLOCKS; c++) {
            const int8_t *block = w + c * stride;
            for (int j = 0; j < 16; j++) {
                int32_t sum = 0;
                for (int k = 0; k < in; k++)
                    sum += (int32_t)codes[(size_t)r * in + k] * block[(size_t)(k / 4) * 64 + 4 * j + k % 4];
                total[r][c][j] = sum;
            }
        }
}
#endif

/* Whether tf_head runs on VNNI here (else on plain C loops, exact but slower than oneDNN's product). */
int tf_head_vectorised(void) {
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

/* y[r][o] = float(sum_k (codes[r][k] - 128) w[o][k]) * w_scale[o] * scales[r] + bias[o], o < out. `w` in blocks
 * of 16 outputs by groups of 4 inputs (block b, group g: outputs b*16..b*16+15, each with its 4 weights of inputs
 * 4g..4g+3), `in` a multiple of 4, the outputs padded with zeros to a multiple of 16 * HEAD_BLOCKS (as are `sums`,
 * 128 * sum_k w[o][k], the zero point's share, and `w_scale`). The integer sums are exact whatever the order, so
 * every path here (and oneDNN's) gives the same logits. */
void tf_head(const uint8_t *codes, int n, int in, const int8_t *w, const int32_t *sums, const float *w_scale,
             const float *scales, const float *bias, int out, float *y) {
    const size_t stride = (size_t)in * 16;  /* bytes of one block */
    const int groups = (out + 16 * HEAD_BLOCKS - 1) / (16 * HEAD_BLOCKS);
#ifdef _OPENMP
#pragma omp parallel for schedule(static)
#endif
    for (int g = 0; g < groups; g++) {
        const int8_t *at = w + (size_t)g * HEAD_BLOCKS * stride;
        for (int first = 0; first < n; first += HEAD_ROWS) {
            int rows = n - first < HEAD_ROWS ? n - first : HEAD_ROWS;
            int32_t total[HEAD_ROWS][HEAD_BLOCKS][16];
            head_sums(codes + (size_t)first * in, rows, in, at, stride, total);
            for (int r = 0; r < rows; r++)
                for (int c = 0; c < HEAD_BLOCKS; c++)
                    for (int j = 0; j < 16; j++) {
                        int o = (g * HEAD_BLOCKS + c) * 16 + j;
                        if (o >= out) break;
                        float v = (float)(total[r][c][j] - sums[o]) * w_scale[o] * scales[first + r];
                        y[(size_t)(first + r) * out + o] = bias ? v + bias[o] : v;
                    }
        }
    }
}

/* ---- Drawing a token: temperature alone. ---- */

/* The sum of chunk j (LANES weights from `w`, fewer at the end), in one fixed order. */
static inline float chunk_sum(const float *w, int count) {
#if defined(__AVX512F__)
    return _mm512_reduce_add_ps(_mm512_maskz_loadu_ps(first_lanes(count), w));
#else
    float sum = 0.0f;
    for (int i = 0; i < count && i < LANES; i++) sum += w[i];
    return sum;
#endif
}

/* For each of `count` rows of `logits` (rows[j] of them, V wide): the id drawn with probability proportional to
 * exp((logit - tops[j]) / temps[j]), by the inverse of its cumulative weight at uniforms[j] * total (kept below the
 * total, so an id of weight 0 is never drawn). The row's logits are overwritten by its weights. tops[j] is the row's
 * largest logit, temps[j] > 0. */
void tf_draw(float *logits, int V, int count, const int32_t *rows, const float *tops, const float *temps,
             const float *uniforms, int64_t *out) {
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (count > 1)
#endif
    for (int j = 0; j < count; j++) {
        float *w = logits + (size_t)rows[j] * V;
        exp_shifted(w, V, tops[j], temps[j]);
        float total = 0.0f;
        for (int i = 0; i < V; i += LANES) total += chunk_sum(w + i, V - i);
        float target = uniforms[j] * total;
        if (!(target < total)) target = nextafterf(total, 0.0f);
        int64_t chosen = -1;
        float running = 0.0f;
        for (int i = 0; i < V && chosen < 0; i += LANES) {
            float after = running + chunk_sum(w + i, V - i);
            if (after > target || i + LANES >= V) {  /* the chunk that crosses the target: its ids one by one */
                float inside = running;
                for (int k = i; k < V && k < i + LANES; k++) {
                    if (w[k] > 0.0f) chosen = k;
                    inside += w[k];
                    if (w[k] > 0.0f && inside > target) break;
                }
                if (after > target) break;
            }
            running = after;
        }
        out[j] = chosen;
    }
}
