/* Memory access patterns of a float32 decode item, written plainly in C (GCC's vector
 * extension: AVX-512 or AVX2 registers, whichever -march=native has; OpenMP threads): what order of reads lets the hardware stream K/V at the memory's rate while
 * the item computes.  Built and driven by benchmarks/decode_access_patterns.py (which see).
 *
 * The cache is the bench's: K and V (B, Hkv, L, 128) float32, cut into items of `chunk` keys of
 * one (sequence, K/V head); 4 query rows per K/V head (Hq 32 / Hkv 8).  Each thread takes one
 * contiguous half of the items.  Only the patterns ending in _NEXT ask for lines ahead (the
 * next item's rows, as dotattn's kernel does); in the others only the demand loads' order
 * differs.  The arithmetic is a decode item's — four dot products
 * per key, P·V for four rows — without the softmax's exp (a scale instead), and the results are
 * only summed: this measures reads, it computes no attention.
 *
 *   PATTERN_FLAT        every line of K then V, one add each (the yardstick)
 *   PATTERN_ITEM        per item: the scores of all its keys (K in address order, one key at a
 *                       time), then P·V over all its keys (V in address order), the P·V sums in
 *                       blocks of 16 keys joining the output (as PV_SUM_KEYS asks)
 *   PATTERN_BLOCK16     per block of 16 keys: its scores, then its P·V (K and V alternate every
 *                       8 KiB: the fused pass's order)
 *   PATTERN_ITEM_TRANS  as PATTERN_ITEM, but the scores read 4 keys at once, piece j of each
 *                       before piece j + 1 (the 16-lane scores loop's order)
 *   PATTERN_ITEM_DOWN   as PATTERN_ITEM, the second thread taking its items from the last down
 *   PATTERN_ITEM_NEXT   as PATTERN_ITEM_DOWN, and the thread's next item asked for meanwhile
 *                       (prefetcht1: its key rows beside the scores, one row a key, its value
 *                       rows beside P·V): dotattn's NEXT_SCHEME on the item order
 *   PATTERN_BLOCK16_NEXT as PATTERN_BLOCK16 (second thread down), with the next item asked for
 *                       as in PATTERN_ITEM_NEXT: dotattn's fused pass's order of reads and requests
 *   PATTERN_BLOCK64_NEXT, PATTERN_BLOCK128_NEXT  as PATTERN_BLOCK16_NEXT in blocks of 64 or 128 keys
 *                       (K and V alternate every 32 or 64 KiB)
 *   PATTERN_SCORES_ONLY as PATTERN_ITEM without its P·V (K only)
 *   PATTERN_ITEM_TRANS_NEXT as PATTERN_ITEM_NEXT with PATTERN_ITEM_TRANS's scores (4 keys at once;
 *                       the four keys' rows asked for before their scores)
 *   PATTERN_BLOCK16_COLS as PATTERN_BLOCK16 (no requests), P·V in passes of one register piece:
 *                       for each piece of Dv, its lines of the block's 16 value rows (the AVX2
 *                       fused pass's P·V order: 4 rows × 1 piece of accumulators a pass)
 *   PATTERN_ITEM_COLS   as PATTERN_ITEM (no requests), P·V in the same passes over all the
 *                       item's keys (a column of 256 value rows a pass, 512 bytes apart)
 *   PATTERN_BLOCK16_TILE<R>X<P> as PATTERN_BLOCK16_COLS with register tiles of R query rows × P
 *                       vectors a pass (4×2 on AVX2: one 64-byte line of each value row a pass,
 *                       dotattn's narrow tile; 1×8: four lines of a row a pass, the rows' passes
 *                       one after another)
 *   PATTERN_BLOCK16_COPY as PATTERN_BLOCK16_TILE4X2, each block's value rows first copied, in
 *                       address order, to a scratch block the tiles then read
 *   PATTERN_ITEM_COPY   the same with the item's scores first (PATTERN_ITEM's order of K)
 */
#include <omp.h>

/* One register of float32 lanes: 16 with AVX-512, else 8 (AVX2; a 16-lane vector there is
 * kept on the stack by gcc 12, and its loops read a third of what they should).  `vec_loadu`
 * reads from any 4-byte-aligned address.  (AVX-512 intrinsics until 5 Dec 2026: the same
 * loops, which an AVX2-only CPU could not run.) */
#ifdef __AVX512F__
#define LANES 16
#else
#define LANES 8
#endif
typedef float vec __attribute__((vector_size(LANES * 4)));
typedef float vec_unaligned __attribute__((vector_size(LANES * 4), aligned(4)));
static inline vec vec_loadu(const float *p) { return *(const vec_unaligned *)p; }
static inline vec vec_zero(void) { return (vec){0}; }
static inline vec vec_set1(float x) { return vec_zero() + x; }
static inline vec vec_fmadd(vec a, vec b, vec c) { return a * b + c; } /* contracted to FMA by -O3 (GNU C) */
static inline vec vec_add(vec a, vec b) { return a + b; }
static inline float vec_reduce_add(vec a) {
    float t = 0;
    for (int i = 0; i < LANES; i++) t += a[i];
    return t;
}

enum { PATTERN_FLAT, PATTERN_ITEM, PATTERN_BLOCK16, PATTERN_ITEM_TRANS, PATTERN_ITEM_DOWN, PATTERN_ITEM_NEXT,
       PATTERN_BLOCK16_NEXT, PATTERN_BLOCK64_NEXT, PATTERN_BLOCK128_NEXT, PATTERN_SCORES_ONLY, PATTERN_ITEM_TRANS_NEXT,
       PATTERN_BLOCK16_COLS, PATTERN_ITEM_COLS,
       PATTERN_BLOCK16_TILE4X2, PATTERN_BLOCK16_TILE2X4, PATTERN_BLOCK16_TILE1X8,
       PATTERN_BLOCK16_COPY, PATTERN_ITEM_COPY };
enum { D = 128, R = 4, PIECES = D / LANES };

static void scores_one_key(const float *k, const float *q, float s[R][4096], int key) {
    vec a[R];
    for (int r = 0; r < R; r++) a[r] = vec_zero();
    for (int p = 0; p < PIECES; p++) {
        vec kv = vec_loadu(k + (long)key * D + p * LANES);
        for (int r = 0; r < R; r++) a[r] = vec_fmadd(vec_loadu(q + r * D + p * LANES), kv, a[r]);
    }
    for (int r = 0; r < R; r++) s[r][key] = vec_reduce_add(a[r]) * 1e-3f;
}

/* ask for row `key` of the next item (D floats: 8 lines) into L2.  Inline assembly: gcc 12 at
 * -O1 and above dropped every _mm_prefetch / __builtin_prefetch of this file's item loops (none
 * left in the object code), so the patterns ending in _NEXT measured no requests before (4 Dec) */
static inline void request_row(const float *next, int key) {
    if (!next) return;
    for (int p = 0; p < D; p += 16) __asm__ volatile("prefetcht1 %0" : : "m"(*(const char *)(next + (long)key * D + p)));
}

static void scores_four_keys_transposed(const float *k, const float *q, float s[R][4096], int g) {
    vec a[R][4];
    for (int r = 0; r < R; r++) for (int j = 0; j < 4; j++) a[r][j] = vec_zero();
    for (int p = 0; p < PIECES; p++) {
        vec qv[R];
        for (int r = 0; r < R; r++) qv[r] = vec_loadu(q + r * D + p * LANES);
        for (int j = 0; j < 4; j++) {
            vec kv = vec_loadu(k + (long)(g + j) * D + p * LANES);
            for (int r = 0; r < R; r++) a[r][j] = vec_fmadd(qv[r], kv, a[r][j]);
        }
    }
    for (int r = 0; r < R; r++) for (int j = 0; j < 4; j++) s[r][g + j] = vec_reduce_add(a[r][j]) * 1e-3f;
}

/* P·V of keys [k0, k0 + 16): the block's sums start from zero and join o at its end */
static void pv_block(const float *v, float s[R][4096], vec o[R][PIECES], int k0) {
    vec a[R][PIECES];
    for (int r = 0; r < R; r++) for (int p = 0; p < PIECES; p++) a[r][p] = vec_zero();
    for (int key = k0; key < k0 + 16; key++) {
        vec vv[PIECES];
        for (int p = 0; p < PIECES; p++) vv[p] = vec_loadu(v + (long)key * D + p * LANES);
        for (int r = 0; r < R; r++) {
            vec w = vec_set1(s[r][key]);
            for (int p = 0; p < PIECES; p++) a[r][p] = vec_fmadd(w, vv[p], a[r][p]);
        }
    }
    for (int r = 0; r < R; r++) for (int p = 0; p < PIECES; p++) o[r][p] = vec_add(o[r][p], a[r][p]);
}

/* P·V of keys [k0, k1) in register tiles of `rp` query rows × `pp` vectors of Dv a pass, the
 * keys in order within a pass; each pass's sums join o at its end */
static void pv_tiles(const float *v, float s[R][4096], vec o[R][PIECES], int k0, int k1, int rp, int pp) {
    for (int r0 = 0; r0 < R; r0 += rp)
        for (int p0 = 0; p0 < PIECES; p0 += pp) {
            vec a[4][8];
            for (int i = 0; i < rp; i++) for (int j = 0; j < pp; j++) a[i][j] = vec_zero();
            for (int key = k0; key < k1; key++) {
                vec vv[8];
                for (int j = 0; j < pp; j++) vv[j] = vec_loadu(v + (long)key * D + (p0 + j) * LANES);
                for (int i = 0; i < rp; i++) {
                    vec w = vec_set1(s[r0 + i][key]);
                    for (int j = 0; j < pp; j++) a[i][j] = vec_fmadd(w, vv[j], a[i][j]);
                }
            }
            for (int i = 0; i < rp; i++) for (int j = 0; j < pp; j++) o[r0 + i][p0 + j] = vec_add(o[r0 + i][p0 + j], a[i][j]);
        }
}

/* Reads every item of K and V (nitems items of `chunk` keys, chunk a multiple of 16 and at
 * most 4096) in `pattern` on the OpenMP threads; returns a sum of what it computed. */
double run(const float *K, const float *V, const float *q, long nitems, int chunk, int pattern) {
    double total = 0;
#pragma omp parallel reduction(+ : total)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        long per = nitems / nt, first = t * per;
        static __thread float s[R][4096] __attribute__((aligned(64)));
        vec o[R][PIECES], acc = vec_zero();
        for (int r = 0; r < R; r++) for (int p = 0; p < PIECES; p++) o[r][p] = vec_zero();
        for (long n = 0; n < per; n++) {
            int next = pattern == PATTERN_ITEM_NEXT || pattern == PATTERN_ITEM_TRANS_NEXT || pattern == PATTERN_BLOCK16_NEXT || pattern == PATTERN_BLOCK64_NEXT ||
                       pattern == PATTERN_BLOCK128_NEXT;
            int block = pattern == PATTERN_BLOCK64_NEXT ? 64 : pattern == PATTERN_BLOCK128_NEXT ? 128 : 16;
            int down = (pattern == PATTERN_ITEM_DOWN || next) && t == nt - 1;
            long it = down ? nitems - 1 - n : first + n;
            const float *k = K + it * chunk * D, *v = V + it * chunk * D;
            const float *kn = 0, *vn = 0;
            if (next && n + 1 < per) {
                long nx = down ? it - 1 : it + 1;
                kn = K + nx * chunk * D;
                vn = V + nx * chunk * D;
            }
            if (pattern == PATTERN_BLOCK16_COPY || pattern == PATTERN_ITEM_COPY) {
                static __thread float vcopy[16 * D] __attribute__((aligned(64)));
                int step = pattern == PATTERN_ITEM_COPY ? chunk : 16;
                for (int b0 = 0; b0 < chunk; b0 += step) {
                    for (int key = b0; key < b0 + step; key++) scores_one_key(k, q, s, key);
                    for (int k0 = b0; k0 < b0 + step; k0 += 16) {
                        for (long x = 0; x < 16 * D; x += LANES)
                            *(vec_unaligned *)(vcopy + x) = vec_loadu(v + (long)k0 * D + x);
                        /* the tiles over the copy: keys k0.. at rows 0.. of vcopy (scores at k0..) */
                        pv_tiles(vcopy - (long)k0 * D, s, o, k0, k0 + 16, 4, 2);
                    }
                }
            } else if (pattern == PATTERN_BLOCK16_TILE4X2 || pattern == PATTERN_BLOCK16_TILE2X4 || pattern == PATTERN_BLOCK16_TILE1X8) {
                int rp = pattern == PATTERN_BLOCK16_TILE4X2 ? 4 : pattern == PATTERN_BLOCK16_TILE2X4 ? 2 : 1;
                for (int b0 = 0; b0 < chunk; b0 += 16) {
                    for (int key = b0; key < b0 + 16; key++) scores_one_key(k, q, s, key);
                    pv_tiles(v, s, o, b0, b0 + 16, rp, 8 / rp);
                }
            } else if (pattern == PATTERN_BLOCK16_COLS || pattern == PATTERN_ITEM_COLS) {
                int step = pattern == PATTERN_ITEM_COLS ? chunk : 16;
                for (int b0 = 0; b0 < chunk; b0 += step) {
                    for (int key = b0; key < b0 + step; key++) scores_one_key(k, q, s, key);
                    pv_tiles(v, s, o, b0, b0 + step, 4, 1); /* one vector of every row a pass */
                }
            } else if (pattern == PATTERN_FLAT) {
                for (long x = 0; x < (long)chunk * D; x += LANES) acc = vec_add(acc, vec_loadu(k + x));
                for (long x = 0; x < (long)chunk * D; x += LANES) acc = vec_add(acc, vec_loadu(v + x));
            } else if (pattern == PATTERN_BLOCK16 || (next && pattern != PATTERN_ITEM_NEXT && pattern != PATTERN_ITEM_TRANS_NEXT)) {
                for (int b0 = 0; b0 < chunk; b0 += block) {
                    for (int key = b0; key < b0 + block; key++) {
                        request_row(kn, key);
                        scores_one_key(k, q, s, key);
                    }
                    for (int k0 = b0; k0 < b0 + block; k0 += 16) {
                        for (int key = k0; key < k0 + 16; key++) request_row(vn, key);
                        pv_block(v, s, o, k0);
                    }
                }
            } else {
                if (pattern == PATTERN_ITEM_TRANS || pattern == PATTERN_ITEM_TRANS_NEXT)
                    for (int g = 0; g < chunk; g += 4) {
                        for (int key = g; key < g + 4; key++) request_row(kn, key);
                        scores_four_keys_transposed(k, q, s, g);
                    }
                else
                    for (int key = 0; key < chunk; key++) {
                        request_row(kn, key);
                        scores_one_key(k, q, s, key);
                    }
                for (int k0 = 0; k0 < chunk && pattern != PATTERN_SCORES_ONLY; k0 += 16) {
                    for (int key = k0; key < k0 + 16; key++) request_row(vn, key);
                    pv_block(v, s, o, k0);
                }
                if (pattern == PATTERN_SCORES_ONLY)  /* every score used (else gcc drops the scores' work) */
                    for (int r = 0; r < R; r++)
                        for (int key = 0; key < chunk; key += LANES) acc = vec_add(acc, vec_loadu(&s[r][key]));
            }
        }
        for (int r = 0; r < R; r++) for (int p = 0; p < PIECES; p++) acc = vec_add(acc, o[r][p]);
        total += vec_reduce_add(acc);
    }
    return total;
}
