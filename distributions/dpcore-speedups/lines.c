/* dpcore_speedups: salting block hashes (SipHash-2-4) and formatting a trace line. */
#include <math.h>
#include <string.h>
#include "records.h"

/* ------------------------------------------------------------------ salting and lines */

int reserve(Buf *b, size_t more) {
    if (b->len + more <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 1 << 16;
    while (cap < b->len + more) cap *= 2;
    char *p = PyMem_Realloc(b->p, cap);
    if (p == NULL) { PyErr_NoMemory(); return -1; }
    b->p = p; b->cap = cap;
    return 0;
}

static void put(Buf *b, const char *s, size_t n) { memcpy(b->p + b->len, s, n); b->len += n; }

/* "00" .. "99", so that digits go two at a time. */
static char pairs[200];

void lines_init(void) {
    for (int i = 0; i < 100; i++) { pairs[2 * i] = (char)('0' + i / 10); pairs[2 * i + 1] = (char)('0' + i % 10); }
}

static void put_id(Buf *b, uint64_t h) {
    uint64_t x = h % ID_SPAN + ID_LOW;
    char *d = b->p + b->len;
    for (int i = 16; i >= 0; i -= 2) { memcpy(d + i, pairs + 2 * (x % 100), 2); x /= 100; }
    d[18] = ','; d[19] = ' ';
    b->len += ID_TEXT;
}

/* v in decimal, as Python's %d writes it. */
static void put_int(Buf *b, long long v) {
    char tmp[24], *e = tmp + sizeof tmp, *d = e;
    unsigned long long u = v < 0 ? 0 - (unsigned long long)v : (unsigned long long)v;
    do { *--d = (char)('0' + u % 10); u /= 10; } while (u);
    if (v < 0) *--d = '-';
    put(b, d, (size_t)(e - d));
}

/* x as Python's "%.3f" writes it: the exact binary value rounded to thousandths, an exact
 * half to the even one (as its correctly rounded dtoa does). Done here with integers when
 * x is finite and under 2**53 thousandths; else by PyOS_double_to_string. */
static int put_ms(Buf *b, double x) {
    int e;
    double f = frexp(fabs(x), &e); /* |x| = f * 2**e, 0.5 <= f < 1 */
    if (!isfinite(x) || fabs(x) >= 9e12) {
        char *s = PyOS_double_to_string(x, 'f', 3, 0, NULL);
        if (s == NULL) return -1;
        size_t n = strlen(s);
        if (reserve(b, n) < 0) { PyMem_Free(s); return -1; }
        put(b, s, n);
        PyMem_Free(s);
        return 0;
    }
    uint64_t m = (uint64_t)ldexp(f, 53) * 1000; /* |x| * 1000 = m * 2**(e - 53), m < 2**63 */
    int shift = 53 - e;
    uint64_t q;
    if (shift <= 0) {
        q = m << -shift; /* |x| < 9e12, so this is below 2**63 */
    } else if (shift >= 64) {
        q = 0; /* m / 2**shift < 1/2 */
    } else {
        uint64_t r = m & (((uint64_t)1 << shift) - 1), half = (uint64_t)1 << (shift - 1);
        q = m >> shift;
        if (r > half || (r == half && (q & 1))) q++;
    }
    if (signbit(x)) put(b, "-", 1);
    put_int(b, (long long)(q / 1000));
    char frac[4] = {(char)('0' + q / 100 % 10), (char)('0' + q / 10 % 10), (char)('0' + q % 10), 0};
    b->p[b->len++] = '.';
    put(b, frac, 3);
    return 0;
}

/* An exact int that fits a long long, else -1 (with no exception). */
int as_ll(PyObject *o, long long *v) {
    int overflow;
    if (!PyLong_CheckExact(o)) return -1;
    *v = PyLong_AsLongLongAndOverflow(o, &overflow);
    return overflow ? -1 : 0;
}



/* Ids a prompt of n tokens with nh block hashes gets: one a block when the hashes fit, else none. */
uint64_t ids_wanted(long long n, uint64_t nh, long long bs) {
    uint64_t k = n > 0 ? (uint64_t)(n / bs + (n % bs != 0)) : 0;
    return nh && nh <= k ? k : 0;
}

/* One JSON line, as TraceWriter._python_text writes it. hashes: nh msgpack integers (raw 0;
 * read_header checked them, in a buffer ending at hashes_end) or big-endian words (raw 1);
 * out < 0: not counted, the budget mnt is written. */
int put_line(Buf *b, const Params *p, double t, long long n, long long mnt, long long out,
                    const uint8_t *hashes, const uint8_t *hashes_end, uint64_t nh, int raw, uint64_t *tail,
                    long long *generated) {
    static const char head[] = "{\"timestamp\": ", input_length[] = ", \"input_length\": ",
                      output_length[] = ", \"output_length\": ", hash_ids[] = ", \"hash_ids\": [";
    PyObject *end = p->budget_end;
    uint64_t want = ids_wanted(n, nh, p->bs);
    if (out >= 0) { ++*generated; end = p->gen_end; }
    else out = mnt;
    if (reserve(b, sizeof head + 32) < 0) return -1; /* the timestamp takes at most 18 bytes here */
    put(b, head, sizeof head - 1);
    if (put_ms(b, (t - p->t0) * 1000) < 0) return -1;
    if (reserve(b, 120 + want * ID_TEXT + (size_t)PyBytes_GET_SIZE(end)) < 0) return -1;
    put(b, input_length, sizeof input_length - 1);
    put_int(b, n);
    put(b, output_length, sizeof output_length - 1);
    put_int(b, out);
    put(b, hash_ids, sizeof hash_ids - 1);
    if (want) {
        Reader hr = {hashes, hashes_end};
        for (uint64_t j = 0; j < nh; j++)
            put_id(b, siphash(p->k0, p->k1, raw ? be(hashes + 8 * j, 8) : next_hash(&hr)));
        for (uint64_t j = nh; j < want; j++) put_id(b, siphash(p->k0, p->k1 ^ p->tweak, ++*tail));
        b->len -= 2; /* the last id's ", " */
    }
    put(b, PyBytes_AS_STRING(end), (size_t)PyBytes_GET_SIZE(end));
    return 0;
}
