/* dpcore_speedups: the recording writer's per-batch work in one pass, compiled.
 *
 * decode_batch(body) reads a batch frame ([arrival times, request headers, completions], see
 * dpcore.runtime.recordframes) into the same records and completions as the Python path:
 * only the header fields a trace line needs are read, every other value is skipped unbuilt.
 * lines(records, ...) salts the block hashes (SipHash-2-4) and formats the JSON lines, as
 * dpcore.runtime.tracewriter.TraceWriter._python_text does. Hold keeps the records of batch
 * frames until their request ends and writes their lines, as TraceWriter's Python hold does,
 * with no Python object per record.
 *
 * Both check every input and return None for anything outside what they handle exactly
 * (another type, an unexpected encoding, a truncated frame): the caller then runs the Python
 * path, so every batch ends as that path ends it. They never read past their input.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <math.h>
#include <string.h>
#include <limits.h>

/* ------------------------------------------------------------------ msgpack reading */

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

static uint64_t be(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v = v << 8 | p[i];
    return v;
}

/* Read one item (a container's header only); 0, or -1 when truncated or not msgpack. */
static int next(Reader *r, Item *it) {
    if (r->p >= r->end) return -1;
    uint8_t c = *r->p++;
    size_t left = (size_t)(r->end - r->p);
    int w = 0; /* bytes of a length or value that follow */
    it->neg = 0;
    if (c <= 0x7f) { it->kind = 'i'; it->u = c; return 0; }
    if (c >= 0xe0) { it->kind = 'i'; it->neg = 1; it->u = (uint64_t)(int64_t)(int8_t)c; return 0; }
    if (c >= 0x80 && c <= 0x8f) { it->kind = 'm'; it->n = c & 0x0f; return 0; }
    if (c >= 0x90 && c <= 0x9f) { it->kind = 'a'; it->n = c & 0x0f; return 0; }
    if (c >= 0xa0 && c <= 0xbf) { it->kind = 's'; it->n = c & 0x1f; goto bytes; }
    switch (c) {
    case 0xc0: case 0xc2: case 0xc3: it->kind = 'x'; return 0;
    case 0xcc: case 0xcd: case 0xce: case 0xcf:
        w = 1 << (c - 0xcc);
        if (left < (size_t)w) return -1;
        it->kind = 'i'; it->u = be(r->p, w); r->p += w; return 0;
    case 0xd0: case 0xd1: case 0xd2: case 0xd3: {
        w = 1 << (c - 0xd0);
        if (left < (size_t)w) return -1;
        uint64_t v = be(r->p, w);
        int shift = 64 - 8 * w;
        int64_t s = shift ? (int64_t)(v << shift) >> shift : (int64_t)v;
        it->kind = 'i'; it->u = (uint64_t)s; it->neg = s < 0; r->p += w; return 0;
    }
    case 0xca: case 0xcb:
        w = c == 0xca ? 4 : 8;
        if (left < (size_t)w) return -1;
        it->kind = 'x'; r->p += w; return 0;
    case 0xd9: case 0xda: case 0xdb: w = 1 << (c - 0xd9); it->kind = 's'; break;
    case 0xc4: case 0xc5: case 0xc6: w = 1 << (c - 0xc4); it->kind = 'b'; break;
    case 0xdc: case 0xdd: case 0xde: case 0xdf:
        w = c & 1 ? 4 : 2;
        if (left < (size_t)w) return -1;
        it->kind = c <= 0xdd ? 'a' : 'm'; it->n = be(r->p, w); r->p += w; return 0;
    case 0xd4: case 0xd5: case 0xd6: case 0xd7: case 0xd8: /* fixext: type byte + 1..16 bytes */
        it->kind = 'x'; it->n = 1 + ((size_t)1 << (c - 0xd4)); it->s = r->p;
        if (left < it->n) return -1;
        r->p += it->n; return 0;
    case 0xc7: case 0xc8: case 0xc9: /* ext: length, type byte, data */
        w = 1 << (c - 0xc7);
        if (left < (size_t)w) return -1;
        it->n = be(r->p, w) + 1; r->p += w;
        if ((size_t)(r->end - r->p) < it->n) return -1;
        it->kind = 'x'; r->p += it->n; return 0;
    default: return -1; /* 0xc1: never used */
    }
    if (left < (size_t)w) return -1;
    it->n = be(r->p, w); r->p += w;
bytes:
    if ((uint64_t)(r->end - r->p) < it->n) return -1;
    it->s = r->p; r->p += it->n;
    return 0;
}

/* Skip one whole value (containers without recursion: a count of items still to skip, which
 * can never exceed the bytes left, since every item takes at least one). */
static int skip(Reader *r) {
    uint64_t pending = 1;
    Item it;
    while (pending) {
        pending--;
        if (next(r, &it) < 0) return -1;
        if (it.kind == 'a') pending += it.n;
        else if (it.kind == 'm') pending += 2 * it.n;
        if (pending > (uint64_t)(r->end - r->p)) return -1;
    }
    return 0;
}

static PyObject *int_of(const Item *it) {
    return it->neg ? PyLong_FromLongLong((long long)(int64_t)it->u) : PyLong_FromUnsignedLongLong(it->u);
}

static int key_is(const Item *k, const char *name) {
    size_t n = strlen(name);
    return k->n == n && memcmp(k->s, name, n) == 0;
}

/* The fields of one header map a line needs: the request id, lengths, and the block hashes
 * (bh: the first of nh msgpack integers, every one checked, or NULL when there are none). */
typedef struct {
    Item rid, n, mnt;
    const uint8_t *bh;
    uint64_t nh;
} Header;

/* Read one header map; 0, or -1 when it is not one the typed path reads. */
static int read_header(Reader *r, Header *h) {
    Item it, k;
    int have_rid = 0;
    const uint8_t *bh = NULL;
    memset(h, 0, sizeof *h);
    h->n.kind = h->mnt.kind = 'i';
    if (next(r, &it) < 0 || it.kind != 'm' || it.n > (uint64_t)(r->end - r->p)) return -1;
    for (uint64_t i = it.n; i > 0; i--) {
        if (next(r, &k) < 0 || k.kind != 's') return -1;
        if (key_is(&k, "rid")) {
            if (next(r, &h->rid) < 0 || h->rid.kind != 's') return -1;
            have_rid = 1;
        } else if (key_is(&k, "n") || key_is(&k, "mnt")) {
            Item *v = k.n == 1 ? &h->n : &h->mnt;
            if (next(r, v) < 0 || v->kind != 'i') return -1;
        } else if (key_is(&k, "bh")) {
            bh = r->p;
            if (skip(r) < 0) return -1;
        } else if (skip(r) < 0) {
            return -1;
        }
    }
    if (!have_rid) return -1;
    h->bh = NULL;
    h->nh = 0;
    if (bh != NULL) {
        Reader hr = {bh, r->end};
        if (next(&hr, &it) < 0 || it.kind != 'a') return -1;
        h->bh = hr.p;
        h->nh = it.n;
        for (uint64_t i = 0; i < h->nh; i++) {
            if (hr.end - hr.p >= 9 && (*hr.p == 0xcf || *hr.p == 0xd3)) { /* next_hash's usual case */
                hr.p += 9;
                continue;
            }
            if (next(&hr, &it) < 0 || it.kind != 'i') return -1;
        }
    }
    return 0;
}

/* The next of a header's block hashes (read_header checked them) as a 64-bit word. */
static uint64_t next_hash(Reader *hr) {
    const uint8_t *p = hr->p;
    if (*p == 0xcf || *p == 0xd3) { /* how msgpack writes a hash of 33 bits and more */
        hr->p = p + 9;
        return be(p + 1, 8);
    }
    Item it;
    next(hr, &it);
    return it.u;
}

/* One header map's record [t, n, mnt, block hashes as big-endian words, None, rid], or NULL
 * with no exception set when it is not one the typed path reads (or with one, out of memory). */
static PyObject *record_of(Reader *r, double t, int want) {
    Header h;
    if (read_header(r, &h) < 0) return NULL;
    if (!want) return Py_None; /* a header past the last arrival time: read, not recorded */
    PyObject *words = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(h.nh * 8));
    if (words == NULL) return NULL;
    uint8_t *out = (uint8_t *)PyBytes_AS_STRING(words);
    Reader hr = {h.bh, r->end};
    for (uint64_t i = 0; i < h.nh; i++) {
        uint64_t u = next_hash(&hr);
        for (int b = 0; b < 8; b++) out[8 * i + b] = (uint8_t)(u >> (56 - 8 * b));
    }
    PyObject *text = PyUnicode_DecodeUTF8((const char *)h.rid.s, (Py_ssize_t)h.rid.n, NULL);
    if (text == NULL) { Py_DECREF(words); PyErr_Clear(); return NULL; }
    PyObject *rec = PyList_New(6);
    PyObject *tt = PyFloat_FromDouble(t), *nn = int_of(&h.n), *mm = int_of(&h.mnt);
    if (rec == NULL || tt == NULL || nn == NULL || mm == NULL) {
        Py_XDECREF(rec); Py_XDECREF(tt); Py_XDECREF(nn); Py_XDECREF(mm); Py_DECREF(words); Py_DECREF(text);
        return NULL;
    }
    Py_INCREF(Py_None);
    PyList_SET_ITEM(rec, 0, tt);
    PyList_SET_ITEM(rec, 1, nn);
    PyList_SET_ITEM(rec, 2, mm);
    PyList_SET_ITEM(rec, 3, words);
    PyList_SET_ITEM(rec, 4, Py_None);
    PyList_SET_ITEM(rec, 5, text);
    return rec;
}

static PyObject *decode_batch(PyObject *self, PyObject *arg) {
    Py_buffer buf;
    if (PyObject_GetBuffer(arg, &buf, PyBUF_SIMPLE) < 0) return NULL;
    Reader r = {buf.buf, (const uint8_t *)buf.buf + buf.len};
    Item it;
    PyObject *records = NULL, *ends = NULL, *out = NULL;
    const uint8_t *times;
    uint64_t n_times, n_headers;
    if (next(&r, &it) < 0 || it.kind != 'a' || it.n != 3) goto done;
    if (next(&r, &it) < 0 || it.kind != 'b' || it.n % 8) goto done;
    times = it.s;
    n_times = it.n / 8;
    if (next(&r, &it) < 0 || it.kind != 'a' || it.n > (uint64_t)(r.end - r.p)) goto done;
    n_headers = it.n;
    if ((records = PyList_New(0)) == NULL) goto done;
    for (uint64_t i = 0; i < n_headers; i++) {
        double t = 0;
        if (i < n_times) memcpy(&t, times + 8 * i, 8);
        PyObject *rec = record_of(&r, t, i < n_times);
        if (rec == NULL) goto done;
        if (rec != Py_None) {
            int failed = PyList_Append(records, rec);
            Py_DECREF(rec);
            if (failed) goto done;
        }
    }
    if (next(&r, &it) < 0 || it.kind != 'a' || it.n > (uint64_t)(r.end - r.p)) goto done;
    if ((ends = PyList_New((Py_ssize_t)it.n)) == NULL) goto done;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(ends); i++) {
        Item pair, rid, tokens;
        if (next(&r, &pair) < 0 || pair.kind != 'a' || pair.n != 2 || next(&r, &rid) < 0 || rid.kind != 's'
            || next(&r, &tokens) < 0 || tokens.kind != 'i')
            goto done;
        PyObject *e = PyTuple_New(2), *text = PyUnicode_DecodeUTF8((const char *)rid.s, (Py_ssize_t)rid.n, NULL);
        if (e == NULL || text == NULL) {
            Py_XDECREF(e);
            Py_XDECREF(text);
            if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) PyErr_Clear();
            goto done;
        }
        PyTuple_SET_ITEM(e, 0, text);
        PyList_SET_ITEM(ends, (Py_ssize_t)i, e); /* owned by the list from here, even if incomplete */
        PyObject *tok = int_of(&tokens);
        if (tok == NULL) goto done;
        PyTuple_SET_ITEM(e, 1, tok);
    }
    if (r.p != r.end) goto done; /* trailing bytes: not one frame */
    out = PyTuple_Pack(2, records, ends);
done:
    PyBuffer_Release(&buf);
    Py_XDECREF(records);
    Py_XDECREF(ends);
    if (out != NULL) return out;
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ salting and lines */

#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                                         \
    do {                                                                                 \
        v0 += v1; v1 = ROTL(v1, 13); v1 ^= v0; v0 = ROTL(v0, 32);                        \
        v2 += v3; v3 = ROTL(v3, 16); v3 ^= v2;                                           \
        v0 += v3; v3 = ROTL(v3, 21); v3 ^= v0;                                           \
        v2 += v1; v1 = ROTL(v1, 17); v1 ^= v2; v2 = ROTL(v2, 32);                        \
    } while (0)

/* SipHash-2-4 of one 8-byte message (the little-endian bytes of m), as dpcore.tracefile.siphash24. */
static uint64_t siphash(uint64_t k0, uint64_t k1, uint64_t m) {
    uint64_t v0 = k0 ^ 0x736f6d6570736575ULL, v1 = k1 ^ 0x646f72616e646f6dULL;
    uint64_t v2 = k0 ^ 0x6c7967656e657261ULL, v3 = k1 ^ 0x7465646279746573ULL;
    uint64_t b = (uint64_t)8 << 56;
    v3 ^= m; SIPROUND; SIPROUND; v0 ^= m;
    v3 ^= b; SIPROUND; SIPROUND; v0 ^= b;
    v2 ^= 0xff; SIPROUND; SIPROUND; SIPROUND; SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

#define ID_LOW 100000000000000000ULL /* ids have 18 digits (dpcore.tracefile.ID_DIGITS) */
#define ID_SPAN (9 * ID_LOW)
#define ID_TEXT 20                    /* 18 digits and ", " */
#define MAX_IDS ((uint64_t)1 << 26)   /* more ids than this in one batch: left to the Python path */

typedef struct {
    char *p;
    size_t len, cap;
} Buf;

static int reserve(Buf *b, size_t more) {
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
static int as_ll(PyObject *o, long long *v) {
    int overflow;
    if (!PyLong_CheckExact(o)) return -1;
    *v = PyLong_AsLongLongAndOverflow(o, &overflow);
    return overflow ? -1 : 0;
}

/* What every line of a recording shares: the block size, time origin, SipHash key and tweak
 * of tail ids, and the two line ends (generated / budget output length). */
typedef struct {
    long long bs;
    double t0;
    uint64_t k0, k1, tweak;
    PyObject *gen_end, *budget_end; /* bytes */
} Params;

/* Ids a prompt of n tokens with nh block hashes gets: one a block when the hashes fit, else none. */
static uint64_t ids_wanted(long long n, uint64_t nh, long long bs) {
    uint64_t k = n > 0 ? (uint64_t)(n / bs + (n % bs != 0)) : 0;
    return nh && nh <= k ? k : 0;
}

/* One JSON line, as TraceWriter._python_text writes it. hashes: nh msgpack integers (raw 0;
 * read_header checked them, in a buffer ending at hashes_end) or big-endian words (raw 1);
 * out < 0: not counted, the budget mnt is written. */
static int put_line(Buf *b, const Params *p, double t, long long n, long long mnt, long long out,
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

static PyObject *lines(PyObject *self, PyObject *args) {
    PyObject *records;
    Params p;
    unsigned long long tail;
    if (!PyArg_ParseTuple(args, "O!LdKKKKSS:lines", &PyList_Type, &records, &p.bs, &p.t0, &p.k0, &p.k1, &p.tweak,
                          &tail, &p.gen_end, &p.budget_end))
        return NULL;
    if (p.bs <= 0) Py_RETURN_NONE;
    Py_ssize_t count = PyList_GET_SIZE(records);
    uint64_t ids = 0;
    /* First pass: every record of the types the Python path writes, and how many ids in all. */
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *r = PyList_GET_ITEM(records, i);
        long long n, v;
        if (!PyList_CheckExact(r) || PyList_GET_SIZE(r) != 6 || !PyFloat_CheckExact(PyList_GET_ITEM(r, 0))
            || as_ll(PyList_GET_ITEM(r, 1), &n) < 0 || as_ll(PyList_GET_ITEM(r, 2), &v) < 0
            || !PyBytes_CheckExact(PyList_GET_ITEM(r, 3)) || PyBytes_GET_SIZE(PyList_GET_ITEM(r, 3)) % 8
            || (PyList_GET_ITEM(r, 4) != Py_None && as_ll(PyList_GET_ITEM(r, 4), &v) < 0))
            Py_RETURN_NONE;
        if (n > 0) ids += (uint64_t)(n / p.bs + (n % p.bs != 0));
        if (ids > MAX_IDS) Py_RETURN_NONE;
    }
    Buf b = {NULL, 0, 0};
    long long generated = 0;
    uint64_t t = tail;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *r = PyList_GET_ITEM(records, i), *done = PyList_GET_ITEM(r, 4), *words = PyList_GET_ITEM(r, 3);
        long long out = done == Py_None ? -1 : PyLong_AsLongLong(done);
        if (put_line(&b, &p, PyFloat_AS_DOUBLE(PyList_GET_ITEM(r, 0)), PyLong_AsLongLong(PyList_GET_ITEM(r, 1)),
                     PyLong_AsLongLong(PyList_GET_ITEM(r, 2)), out, (const uint8_t *)PyBytes_AS_STRING(words),
                     (const uint8_t *)PyBytes_AS_STRING(words) + PyBytes_GET_SIZE(words),
                     (uint64_t)PyBytes_GET_SIZE(words) / 8, 1, &t, &generated) < 0) {
            PyMem_Free(b.p);
            return NULL;
        }
    }
    PyObject *text = PyBytes_FromStringAndSize(b.p, (Py_ssize_t)b.len);
    PyMem_Free(b.p);
    if (text == NULL) return NULL;
    return Py_BuildValue("(NLK)", text, generated, (unsigned long long)t);
}

/* ------------------------------------------------------------------ the hold
 *
 * Hold keeps a recording's records until their request ends, as TraceWriter's Python path
 * does (the same lines, leaving at the same flushes), with no Python object per record: a
 * record points into the batch frame it came from (or into the words and id of a record
 * the Python decoder made), which it keeps alive until its line is written. Records sit in
 * arrival order in a ring; a table finds, by request id, the oldest record of that id still
 * waiting for its end (the others of the id follow it in a chain, so a retried id takes its
 * completions in order).
 */

#define NOT_ENDED LLONG_MIN
#define KEEP_TEXT ((size_t)1 << 22) /* a flush's text buffer up to this size is kept for the next */

typedef struct {
    double t;
    long long n, mnt, out; /* out: NOT_ENDED, or the output tokens (-1: not counted) */
    const uint8_t *bh, *bh_end;
    const char *rid;
    PyObject *owner, *owner2; /* what bh and rid point into */
    uint64_t key, nh;
    int64_t next; /* seq of the next record of this id waiting for its end, or -1 */
    Py_ssize_t rid_len;
    int raw;
} HRec;

typedef struct {
    uint64_t key;
    int64_t head, tail; /* head -1: an empty slot */
} Slot;

typedef struct {
    PyObject_HEAD
    Params p;
    int hold;
    Py_ssize_t max_held;
    uint64_t rk0, rk1; /* the table's hash key */
    HRec *ring;
    size_t cap, count; /* cap: a power of two */
    int64_t first;     /* seq of the oldest record: ring[seq & (cap - 1)] */
    Slot *slots;
    size_t nslots, used;
    Buf text; /* the lines of a flush, kept for the next (its pages stay mapped) */
} Hold;

/* SipHash-2-4 of len bytes (the table's hash of a request id). */
static uint64_t siphash_bytes(uint64_t k0, uint64_t k1, const uint8_t *p, size_t len) {
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

static HRec *at(Hold *h, int64_t seq) { return &h->ring[(uint64_t)seq & (h->cap - 1)]; }

/* Room for more records in the ring (the new ones go at seq first + count onwards). */
static int ring_reserve(Hold *h, size_t more) {
    if (h->count + more <= h->cap) return 0;
    size_t cap = h->cap ? h->cap : 1024;
    while (cap < h->count + more) cap *= 2;
    HRec *ring = PyMem_Malloc(cap * sizeof *ring);
    if (ring == NULL) { PyErr_NoMemory(); return -1; }
    for (size_t i = 0; i < h->count; i++) ring[(uint64_t)(h->first + (int64_t)i) & (cap - 1)] = *at(h, h->first + (int64_t)i);
    PyMem_Free(h->ring);
    h->ring = ring;
    h->cap = cap;
    return 0;
}

/* The slot of id (rid, len): the one holding it (*found 1) or the empty one it would take. */
static Slot *slot_of(Hold *h, uint64_t key, const char *rid, Py_ssize_t len, int *found) {
    size_t mask = h->nslots - 1;
    for (size_t i = key & mask;; i = (i + 1) & mask) {
        Slot *s = &h->slots[i];
        if (s->head < 0) { *found = 0; return s; }
        HRec *r = at(h, s->head);
        if (s->key == key && r->rid_len == len && memcmp(r->rid, rid, (size_t)len) == 0) { *found = 1; return s; }
    }
}

/* Empty slot s, moving later ones of its run back (linear probing without tombstones). */
static void slot_clear(Hold *h, Slot *s) {
    size_t mask = h->nslots - 1, i = (size_t)(s - h->slots), j = i;
    for (;;) {
        j = (j + 1) & mask;
        if (h->slots[j].head < 0) break;
        size_t home = h->slots[j].key & mask;
        if (((j - home) & mask) >= ((j - i) & mask)) { h->slots[i] = h->slots[j]; i = j; }
    }
    h->slots[i].head = -1;
    h->used--;
}

static int table_grow(Hold *h) {
    if ((h->used + 1) * 2 <= h->nslots) return 0;
    size_t n = h->nslots ? h->nslots * 2 : 4096;
    Slot *old = h->slots, *slots = PyMem_Malloc(n * sizeof *slots);
    size_t old_n = h->nslots;
    if (slots == NULL) { PyErr_NoMemory(); return -1; }
    for (size_t i = 0; i < n; i++) slots[i].head = -1;
    h->slots = slots;
    h->nslots = n;
    for (size_t i = 0; i < old_n; i++) {
        if (old[i].head < 0) continue;
        size_t j = old[i].key & (n - 1);
        while (slots[j].head >= 0) j = (j + 1) & (n - 1);
        slots[j] = old[i];
    }
    PyMem_Free(old);
    return 0;
}

/* Take the records written at seq first + count .. + k - 1 (filled in, their owners not yet
 * referenced) into the hold: the table finds them from here on. */
static int commit(Hold *h, size_t k) {
    for (size_t i = 0; i < k; i++) {
        int64_t seq = h->first + (int64_t)(h->count + i);
        HRec *r = at(h, seq);
        Py_INCREF(r->owner);
        Py_XINCREF(r->owner2);
        r->next = -1;
        r->out = NOT_ENDED;
        if (!h->hold) continue;
        if (table_grow(h) < 0) {
            h->count += i + 1; /* what is referenced stays held */
            return -1;
        }
        int found;
        r->key = siphash_bytes(h->rk0, h->rk1, (const uint8_t *)r->rid, (size_t)r->rid_len);
        Slot *s = slot_of(h, r->key, r->rid, r->rid_len, &found);
        if (found) {
            at(h, s->tail)->next = seq;
            s->tail = seq;
        } else {
            s->key = r->key;
            s->head = s->tail = seq;
            h->used++;
        }
    }
    h->count += k;
    return 0;
}

/* Request (rid, len) ended with out tokens: its oldest record waiting for an end takes them. */
static void end_of(Hold *h, const char *rid, Py_ssize_t len, long long out) {
    if (!h->hold || !h->used) return;
    int found;
    Slot *s = slot_of(h, siphash_bytes(h->rk0, h->rk1, (const uint8_t *)rid, (size_t)len), rid, len, &found);
    if (!found) return;
    HRec *r = at(h, s->head);
    r->out = out;
    if (r->next < 0) slot_clear(h, s);
    else s->head = r->next;
}

static int ascii(const uint8_t *p, uint64_t n) {
    for (uint64_t i = 0; i < n; i++)
        if (p[i] & 0x80) return 0;
    return 1;
}

/* An integer of a header or completion as a long long; -1 when it does not fit. */
static int ll_of(const Item *it, long long *v) {
    if (!it->neg && it->u > (uint64_t)LLONG_MAX) return -1;
    *v = (long long)it->u;
    return 0;
}

/* take(body) -> bool: take a batch frame; False (and nothing taken) when it holds anything
 * the Python path must read (the caller then decodes it there and calls take_records). */
static PyObject *hold_take(Hold *h, PyObject *body) {
    if (!PyBytes_CheckExact(body)) Py_RETURN_FALSE;
    const uint8_t *start = (const uint8_t *)PyBytes_AS_STRING(body);
    Reader r = {start, start + PyBytes_GET_SIZE(body)};
    Item it;
    if (next(&r, &it) < 0 || it.kind != 'a' || it.n != 3) Py_RETURN_FALSE;
    if (next(&r, &it) < 0 || it.kind != 'b' || it.n % 8) Py_RETURN_FALSE;
    const uint8_t *times = it.s;
    uint64_t n_times = it.n / 8;
    if (next(&r, &it) < 0 || it.kind != 'a' || it.n > (uint64_t)(r.end - r.p)) Py_RETURN_FALSE;
    uint64_t n_headers = it.n, k = n_headers < n_times ? n_headers : n_times;
    if (ring_reserve(h, (size_t)k) < 0) return NULL;
    for (uint64_t i = 0; i < n_headers; i++) {
        Header hd;
        long long n, mnt;
        if (read_header(&r, &hd) < 0 || !ascii(hd.rid.s, hd.rid.n) || ll_of(&hd.n, &n) < 0 || ll_of(&hd.mnt, &mnt) < 0
            || ids_wanted(n, hd.nh, h->p.bs) > MAX_IDS)
            Py_RETURN_FALSE;
        if (i >= k) continue; /* a header past the last arrival time: read, not recorded */
        HRec *rec = at(h, h->first + (int64_t)(h->count + i));
        memcpy(&rec->t, times + 8 * i, 8);
        rec->n = n;
        rec->mnt = mnt;
        rec->bh = hd.bh;
        rec->bh_end = r.end;
        rec->nh = hd.nh;
        rec->raw = 0;
        rec->rid = (const char *)hd.rid.s;
        rec->rid_len = (Py_ssize_t)hd.rid.n;
        rec->owner = body;
        rec->owner2 = NULL;
    }
    if (next(&r, &it) < 0 || it.kind != 'a' || it.n > (uint64_t)(r.end - r.p)) Py_RETURN_FALSE;
    uint64_t n_ends = it.n;
    const uint8_t *ends = r.p;
    for (uint64_t i = 0; i < n_ends; i++) {
        Item pair, rid, tokens;
        long long out;
        if (next(&r, &pair) < 0 || pair.kind != 'a' || pair.n != 2 || next(&r, &rid) < 0 || rid.kind != 's'
            || !ascii(rid.s, rid.n) || next(&r, &tokens) < 0 || tokens.kind != 'i' || ll_of(&tokens, &out) < 0)
            Py_RETURN_FALSE;
    }
    if (r.p != r.end) Py_RETURN_FALSE; /* trailing bytes: not one frame */
    if (commit(h, (size_t)k) < 0) return NULL;
    r.p = ends;
    for (uint64_t i = 0; i < n_ends; i++) {
        Item pair, rid, tokens;
        next(&r, &pair); next(&r, &rid); next(&r, &tokens);
        end_of(h, (const char *)rid.s, (Py_ssize_t)rid.n, tokens.neg ? -1 : (long long)tokens.u);
    }
    Py_RETURN_TRUE;
}

/* take_records(records, ends) -> bool: take records the Python decoder made ([t, n, mnt,
 * words, None, rid]) and completions (rid, tokens); False (and nothing taken) when one is of
 * a type only the Python path writes exactly. */
static PyObject *hold_take_records(Hold *h, PyObject *args) {
    PyObject *records, *ends_in;
    if (!PyArg_ParseTuple(args, "O!O:take_records", &PyList_Type, &records, &ends_in)) return NULL;
    PyObject *ends = PySequence_Fast(ends_in, "completions must be a sequence");
    if (ends == NULL) return NULL;
    Py_ssize_t k = PyList_GET_SIZE(records);
    PyObject *result = Py_False;
    if (ring_reserve(h, (size_t)k) < 0) { Py_DECREF(ends); return NULL; }
    for (Py_ssize_t i = 0; i < k; i++) {
        PyObject *x = PyList_GET_ITEM(records, i), *words, *rid;
        long long n, mnt;
        Py_ssize_t len;
        const char *text;
        if (!PyList_CheckExact(x) || PyList_GET_SIZE(x) != 6 || !PyFloat_CheckExact(PyList_GET_ITEM(x, 0))
            || as_ll(PyList_GET_ITEM(x, 1), &n) < 0 || as_ll(PyList_GET_ITEM(x, 2), &mnt) < 0
            || !PyBytes_CheckExact(words = PyList_GET_ITEM(x, 3)) || PyBytes_GET_SIZE(words) % 8
            || PyList_GET_ITEM(x, 4) != Py_None || !PyUnicode_CheckExact(rid = PyList_GET_ITEM(x, 5))
            || ids_wanted(n, (uint64_t)PyBytes_GET_SIZE(words) / 8, h->p.bs) > MAX_IDS)
            goto done;
        if ((text = PyUnicode_AsUTF8AndSize(rid, &len)) == NULL) { PyErr_Clear(); goto done; }
        HRec *rec = at(h, h->first + (int64_t)(h->count + (size_t)i));
        rec->t = PyFloat_AS_DOUBLE(PyList_GET_ITEM(x, 0));
        rec->n = n;
        rec->mnt = mnt;
        rec->bh = (const uint8_t *)PyBytes_AS_STRING(words);
        rec->nh = (uint64_t)PyBytes_GET_SIZE(words) / 8;
        rec->bh_end = rec->bh + 8 * rec->nh;
        rec->raw = 1;
        rec->rid = text;
        rec->rid_len = len;
        rec->owner = words;
        rec->owner2 = rid;
    }
    Py_ssize_t n_ends = PySequence_Fast_GET_SIZE(ends);
    for (Py_ssize_t i = 0; i < n_ends; i++) {
        PyObject *e = PySequence_Fast_GET_ITEM(ends, i), *out;
        long long v;
        if (!PyTuple_CheckExact(e) && !PyList_CheckExact(e)) goto done;
        if (PySequence_Fast_GET_SIZE(e) != 2 || !PyUnicode_CheckExact(PySequence_Fast_GET_ITEM(e, 0))) goto done;
        if (PyUnicode_AsUTF8AndSize(PySequence_Fast_GET_ITEM(e, 0), NULL) == NULL) { PyErr_Clear(); goto done; }
        out = PySequence_Fast_GET_ITEM(e, 1);
        /* The Python path keeps an exact non-negative int, else writes -1. */
        if (PyLong_CheckExact(out) && as_ll(out, &v) < 0 && _PyLong_Sign(out) > 0) goto done;
    }
    if (commit(h, (size_t)k) < 0) { Py_DECREF(ends); return NULL; }
    for (Py_ssize_t i = 0; i < n_ends; i++) {
        PyObject *e = PySequence_Fast_GET_ITEM(ends, i), *out = PySequence_Fast_GET_ITEM(e, 1);
        Py_ssize_t len;
        const char *rid = PyUnicode_AsUTF8AndSize(PySequence_Fast_GET_ITEM(e, 0), &len);
        long long v = -1;
        if (PyLong_CheckExact(out) && as_ll(out, &v) < 0) v = -1;
        end_of(h, rid, len, v < 0 ? -1 : v);
    }
    result = Py_True;
done:
    Py_DECREF(ends);
    Py_INCREF(result);
    return result;
}

static void release(HRec *r) {
    Py_DECREF(r->owner);
    Py_XDECREF(r->owner2);
}

/* flush(deadline, everything, tail) -> (text, lines, generated, tail): the lines of the
 * records ready to leave, oldest first (as TraceWriter.flush picks them). */
static PyObject *hold_flush(Hold *h, PyObject *args) {
    double deadline;
    int everything;
    unsigned long long tail;
    if (!PyArg_ParseTuple(args, "dpK:flush", &deadline, &everything, &tail)) return NULL;
    Buf *b = &h->text;
    long long generated = 0, lines = 0;
    b->len = 0;
    uint64_t t = tail;
    while (h->count) {
        HRec *r = at(h, h->first);
        if (!(everything || r->out != NOT_ENDED || r->t <= deadline || h->count > (size_t)h->max_held)) break;
        if (r->out == NOT_ENDED && !everything && h->hold) {
            /* It leaves before its end: the oldest waiting record of its id, so its chain's head. */
            int found;
            Slot *s = slot_of(h, r->key, r->rid, r->rid_len, &found);
            if (found && s->head == h->first) {
                if (r->next < 0) slot_clear(h, s);
                else s->head = r->next;
            }
        }
        int failed = put_line(b, &h->p, r->t, r->n, r->mnt, r->out == NOT_ENDED ? -1 : r->out, r->bh, r->bh_end,
                              r->nh, r->raw, &t, &generated);
        if (failed) return NULL;
        release(r);
        h->first++;
        h->count--;
        lines++;
    }
    if (!h->count && h->used) {
        for (size_t i = 0; i < h->nslots; i++) h->slots[i].head = -1;
        h->used = 0;
    }
    PyObject *text = PyBytes_FromStringAndSize(b->p ? b->p : "", (Py_ssize_t)b->len);
    if (b->cap > KEEP_TEXT) { /* a backlog's flush: not kept */
        PyMem_Free(b->p);
        b->p = NULL;
        b->cap = 0;
    }
    if (text == NULL) return NULL;
    return Py_BuildValue("(NLLK)", text, lines, generated, (unsigned long long)t);
}

/* oldest() -> the arrival time of the oldest record held, or None. */
static PyObject *hold_oldest(Hold *h, PyObject *Py_UNUSED(ignored)) {
    if (!h->count) Py_RETURN_NONE;
    return PyFloat_FromDouble(at(h, h->first)->t);
}

/* drain() -> every record held as the Python path holds it ([t, n, mnt, words, tokens or None,
 * rid], oldest first); the hold is empty after. */
static PyObject *hold_drain(Hold *h, PyObject *Py_UNUSED(ignored)) {
    PyObject *out = PyList_New(0);
    if (out == NULL) return NULL;
    while (h->count) {
        HRec *r = at(h, h->first);
        PyObject *words = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(8 * r->nh));
        if (words == NULL) goto fail;
        uint8_t *w = (uint8_t *)PyBytes_AS_STRING(words);
        Reader hr = {r->bh, r->bh_end};
        for (uint64_t i = 0; i < r->nh; i++) {
            uint64_t u = r->raw ? be(r->bh + 8 * i, 8) : next_hash(&hr);
            for (int j = 0; j < 8; j++) w[8 * i + j] = (uint8_t)(u >> (56 - 8 * j));
        }
        PyObject *done = r->out == NOT_ENDED ? (Py_INCREF(Py_None), Py_None) : PyLong_FromLongLong(r->out);
        PyObject *rec = Py_BuildValue("[dLLNNN]", r->t, r->n, r->mnt, words, done,
                                      PyUnicode_DecodeUTF8(r->rid, r->rid_len, NULL));
        if (rec == NULL) goto fail;
        int failed = PyList_Append(out, rec);
        Py_DECREF(rec);
        if (failed) goto fail;
        release(r);
        h->first++;
        h->count--;
    }
    for (size_t i = 0; i < h->nslots; i++) h->slots[i].head = -1;
    h->used = 0;
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

static Py_ssize_t hold_len(Hold *h) { return (Py_ssize_t)h->count; }

static int hold_init(Hold *h, PyObject *args, PyObject *kwds) {
    static char *kw[] = {"block_size", "t0", "k0", "k1", "tail_tweak", "generated_end", "budget_end", "hold",
                         "max_held", NULL};
    Params p;
    int hold;
    Py_ssize_t max_held;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "LdKKKSSpn:Hold", kw, &p.bs, &p.t0, &p.k0, &p.k1, &p.tweak,
                                     &p.gen_end, &p.budget_end, &hold, &max_held))
        return -1;
    if (p.bs <= 0 || max_held < 0) {
        PyErr_SetString(PyExc_ValueError, "block_size must be positive and max_held not negative");
        return -1;
    }
    if (h->count) {
        PyErr_SetString(PyExc_RuntimeError, "Hold is set up once");
        return -1;
    }
    Py_INCREF(p.gen_end);
    Py_INCREF(p.budget_end);
    Py_XDECREF(h->p.gen_end);
    Py_XDECREF(h->p.budget_end);
    h->p = p;
    h->hold = hold;
    h->max_held = max_held;
    h->rk0 = p.k0 ^ 0x9e3779b97f4a7c15ULL; /* the table's key: not the ids' */
    h->rk1 = p.k1 ^ 0xc2b2ae3d27d4eb4fULL;
    return 0;
}

static void hold_dealloc(Hold *h) {
    while (h->count) {
        release(at(h, h->first));
        h->first++;
        h->count--;
    }
    PyMem_Free(h->ring);
    PyMem_Free(h->slots);
    PyMem_Free(h->text.p);
    Py_XDECREF(h->p.gen_end);
    Py_XDECREF(h->p.budget_end);
    Py_TYPE(h)->tp_free((PyObject *)h);
}

static PyMethodDef hold_methods[] = {
    {"take", (PyCFunction)hold_take, METH_O,
     "take(body) -> True, or False (nothing taken): read it with the Python decoder and call take_records."},
    {"take_records", (PyCFunction)hold_take_records, METH_VARARGS,
     "take_records(records, completions) -> True, or False (nothing taken): hold them in Python instead."},
    {"flush", (PyCFunction)hold_flush, METH_VARARGS,
     "flush(deadline, everything, tail) -> (text, lines, generated, tail) of the records ready to leave."},
    {"oldest", (PyCFunction)hold_oldest, METH_NOARGS, "oldest() -> arrival time of the oldest record held, or None."},
    {"drain", (PyCFunction)hold_drain, METH_NOARGS, "drain() -> the records held, as Python lists; empties it."},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods hold_as_sequence = {.sq_length = (lenfunc)hold_len};

static PyTypeObject HoldType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "dpcore_speedups.Hold",
    .tp_doc = "Hold(block_size, t0, k0, k1, tail_tweak, generated_end, budget_end, hold, max_held): a "
              "recording's records waiting for their request to end, and their lines.",
    .tp_basicsize = sizeof(Hold),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)hold_init,
    .tp_dealloc = (destructor)hold_dealloc,
    .tp_methods = hold_methods,
    .tp_as_sequence = &hold_as_sequence,
};

static PyMethodDef methods[] = {
    {"decode_batch", decode_batch, METH_O,
     "decode_batch(body) -> (records, completions) of a batch frame, or None: read it with the Python path."},
    {"lines", lines, METH_VARARGS,
     "lines(records, block_size, t0, k0, k1, tail_tweak, tail, generated_end, budget_end) -> "
     "(text, generated, tail), or None: write them with the Python path."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "dpcore_speedups",
                                    "The recording writer's per-batch work, compiled (dpcore serve --record).", -1,
                                    methods};

PyMODINIT_FUNC PyInit_dpcore_speedups(void) {
    for (int i = 0; i < 100; i++) { pairs[2 * i] = (char)('0' + i / 10); pairs[2 * i + 1] = (char)('0' + i % 10); }
    if (PyType_Ready(&HoldType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&HoldType);
    if (PyModule_AddObject(m, "Hold", (PyObject *)&HoldType) < 0) {
        Py_DECREF(&HoldType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
