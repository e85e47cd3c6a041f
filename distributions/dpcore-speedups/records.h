/* dpcore_speedups: what its parts share (msgpack reading, line formatting, the hold). */
#ifndef DPCORE_SPEEDUPS_RECORDS_H
#define DPCORE_SPEEDUPS_RECORDS_H
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* ------------------------------------------------------------------ msgpack reading (msgpack_read.c) */

typedef struct {
    const uint8_t *p, *end;
} Reader;

/* A scalar or a container's header. kind: 'i' integer (u, neg: value is (int64_t)u when neg),
 * 's' str, 'b' bin, 'a' array, 'm' map (n: its length), 'x' any other scalar (skipped). */
typedef struct {
    char kind;
    int neg;
    uint64_t u;
    const uint8_t *s; /* str / bin bytes */
    uint64_t n;       /* str / bin bytes, or array / map items */
} Item;

/* The fields of one header map a line needs: the request id, lengths, and the block hashes
 * (bh: the first of nh msgpack integers, every one checked, or NULL when there are none). */
typedef struct {
    Item rid, n, mnt;
    const uint8_t *bh;
    uint64_t nh;
} Header;

static inline uint64_t be(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v = v << 8 | p[i];
    return v;
}

int next(Reader *r, Item *it);
int skip(Reader *r);
PyObject *int_of(const Item *it);
int read_header(Reader *r, Header *h);

/* The next of a header's block hashes (read_header checked them) as a 64-bit word. */
static inline uint64_t next_hash(Reader *hr) {
    const uint8_t *p = hr->p;
    if (*p == 0xcf || *p == 0xd3) { /* how msgpack writes a hash of 33 bits and more */
        hr->p = p + 9;
        return be(p + 1, 8);
    }
    Item it;
    next(hr, &it);
    return it.u;
}

/* ------------------------------------------------------------------ salting and lines (lines.c) */

#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                                         \
    do {                                                                                 \
        v0 += v1; v1 = ROTL(v1, 13); v1 ^= v0; v0 = ROTL(v0, 32);                        \
        v2 += v3; v3 = ROTL(v3, 16); v3 ^= v2;                                           \
        v0 += v3; v3 = ROTL(v3, 21); v3 ^= v0;                                           \
        v2 += v1; v1 = ROTL(v1, 17); v1 ^= v2; v2 = ROTL(v2, 32);                        \
    } while (0)

/* SipHash-2-4 of len bytes: the salted ids (8 bytes, the little-endian bytes of a block hash,
 * as dpcore.tracefile.siphash24) and the hold's table of request ids. Inline, so the ids'
 * fixed length folds away. */
static inline uint64_t siphash_bytes(uint64_t k0, uint64_t k1, const uint8_t *p, size_t len) {
    uint64_t v0 = k0 ^ 0x736f6d6570736575ULL, v1 = k1 ^ 0x646f72616e646f6dULL;
    uint64_t v2 = k0 ^ 0x6c7967656e657261ULL, v3 = k1 ^ 0x7465646279746573ULL;
    size_t whole = len - len % 8;
    for (size_t i = 0; i < whole; i += 8) {
        uint64_t m = 0;
        for (int j = 7; j >= 0; j--) m = m << 8 | p[i + j];
        v3 ^= m; SIPROUND; SIPROUND; v0 ^= m;
    }
    uint64_t b = (uint64_t)len << 56;
    for (size_t j = whole; j < len; j++) b |= (uint64_t)p[j] << (8 * (j - whole));
    v3 ^= b; SIPROUND; SIPROUND; v0 ^= b;
    v2 ^= 0xff; SIPROUND; SIPROUND; SIPROUND; SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

/* SipHash-2-4 of the 8 little-endian bytes of m. */
static inline uint64_t siphash(uint64_t k0, uint64_t k1, uint64_t m) {
    uint8_t le[8];
    for (int j = 0; j < 8; j++) le[j] = (uint8_t)(m >> (8 * j));
    return siphash_bytes(k0, k1, le, 8);
}

#define ID_LOW 100000000000000000ULL /* ids have 18 digits (dpcore.tracefile.ID_DIGITS) */
#define ID_SPAN (9 * ID_LOW)
#define ID_TEXT 20                    /* 18 digits and ", " */
#define MAX_IDS ((uint64_t)1 << 26)   /* more ids than this in one batch: left to the Python path */

typedef struct {
    char *p;
    size_t len, cap;
} Buf;

/* What every line of a recording shares: the block size, time origin, SipHash key and tweak
 * of tail ids, and the two line ends (generated / budget output length). */
typedef struct {
    long long bs;
    double t0;
    uint64_t k0, k1, tweak;
    PyObject *gen_end, *budget_end; /* bytes */
} Params;

void lines_init(void);
int reserve(Buf *b, size_t more);
int as_ll(PyObject *o, long long *v);
uint64_t ids_wanted(long long n, uint64_t nh, long long bs);
int put_line(Buf *b, const Params *p, double t, long long n, long long mnt, long long out, const uint8_t *hashes,
             const uint8_t *hashes_end, uint64_t nh, int raw, uint64_t *tail, long long *generated);

/* ------------------------------------------------------------------ the hold (hold.c) */

extern PyTypeObject HoldType;

#endif
