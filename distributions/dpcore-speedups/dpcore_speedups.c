/* dpcore_speedups: the recording writer's per-batch work in one pass, compiled.
 *
 * decode_batch(body) reads a batch frame ([arrival times, request headers, completions], see
 * dpcore.runtime.recordframes) into the same records and completions as the Python path:
 * only the header fields a trace line needs are read, every other value is skipped unbuilt.
 * lines(records, ...) salts the block hashes (SipHash-2-4) and formats the JSON lines, as
 * dpcore.runtime.tracewriter.TraceWriter._python_text does.
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

/* One header map's record [t, n, mnt, block hashes as big-endian words, None, rid], or NULL
 * with no exception set when it is not one the typed path reads (or with one, out of memory). */
static PyObject *record_of(Reader *r, double t, int want) {
    Item it, k, rid = {0}, n = {0}, mnt = {0};
    const uint8_t *bh = NULL;
    int have_rid = 0;
    n.kind = mnt.kind = 'i';
    if (next(r, &it) < 0 || it.kind != 'm' || it.n > (uint64_t)(r->end - r->p)) return NULL;
    for (uint64_t i = it.n; i > 0; i--) {
        if (next(r, &k) < 0 || k.kind != 's') return NULL;
        if (key_is(&k, "rid")) {
            if (next(r, &rid) < 0 || rid.kind != 's') return NULL;
            have_rid = 1;
        } else if (key_is(&k, "n") || key_is(&k, "mnt")) {
            Item *v = k.n == 1 ? &n : &mnt;
            if (next(r, v) < 0 || v->kind != 'i') return NULL;
        } else if (key_is(&k, "bh")) {
            bh = r->p;
            if (skip(r) < 0) return NULL;
        } else if (skip(r) < 0) {
            return NULL;
        }
    }
    if (!have_rid) return NULL;
    if (!want) return Py_None; /* a header past the last arrival time: read, not recorded */
    Reader hr = {bh, r->end};
    uint64_t count = 0;
    if (bh != NULL) {
        if (next(&hr, &it) < 0 || it.kind != 'a') return NULL;
        count = it.n;
    }
    PyObject *words = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(count * 8));
    if (words == NULL) return NULL;
    uint8_t *out = (uint8_t *)PyBytes_AS_STRING(words);
    for (uint64_t i = 0; i < count; i++) {
        if (next(&hr, &it) < 0 || it.kind != 'i') { Py_DECREF(words); return NULL; }
        for (int b = 0; b < 8; b++) out[8 * i + b] = (uint8_t)(it.u >> (56 - 8 * b));
    }
    PyObject *text = PyUnicode_DecodeUTF8((const char *)rid.s, (Py_ssize_t)rid.n, NULL);
    if (text == NULL) { Py_DECREF(words); PyErr_Clear(); return NULL; }
    PyObject *rec = PyList_New(6);
    PyObject *tt = PyFloat_FromDouble(t), *nn = int_of(&n), *mm = int_of(&mnt);
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

static PyObject *lines(PyObject *self, PyObject *args) {
    PyObject *records, *gen_end, *budget_end;
    long long bs;
    double t0;
    unsigned long long k0, k1, tail, tweak;
    if (!PyArg_ParseTuple(args, "O!LdKKKKSS:lines", &PyList_Type, &records, &bs, &t0, &k0, &k1, &tweak, &tail,
                          &gen_end, &budget_end))
        return NULL;
    if (bs <= 0) Py_RETURN_NONE;
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
        if (n > 0) ids += (uint64_t)(n / bs + (n % bs != 0));
        if (ids > MAX_IDS) Py_RETURN_NONE;
    }
    Buf b = {NULL, 0, 0};
    long long generated = 0;
    static const char head[] = "{\"timestamp\": ", input_length[] = ", \"input_length\": ",
                      output_length[] = ", \"output_length\": ", hash_ids[] = ", \"hash_ids\": [";
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *r = PyList_GET_ITEM(records, i), *done = PyList_GET_ITEM(r, 4);
        long long n = PyLong_AsLongLong(PyList_GET_ITEM(r, 1)), out;
        PyObject *words = PyList_GET_ITEM(r, 3), *end = budget_end;
        uint64_t h = (uint64_t)PyBytes_GET_SIZE(words) / 8;
        uint64_t k = n > 0 ? (uint64_t)(n / bs + (n % bs != 0)) : 0;
        uint64_t want = h && h <= k ? k : 0;
        out = done == Py_None ? -1 : PyLong_AsLongLong(done);
        if (out >= 0) { generated++; end = gen_end; }
        else out = PyLong_AsLongLong(PyList_GET_ITEM(r, 2));
        if (reserve(&b, sizeof head + 32) < 0) goto fail; /* the timestamp takes at most 18 bytes here */
        put(&b, head, sizeof head - 1);
        if (put_ms(&b, (PyFloat_AS_DOUBLE(PyList_GET_ITEM(r, 0)) - t0) * 1000) < 0) goto fail;
        if (reserve(&b, 120 + want * ID_TEXT + (size_t)PyBytes_GET_SIZE(end)) < 0) goto fail;
        put(&b, input_length, sizeof input_length - 1);
        put_int(&b, n);
        put(&b, output_length, sizeof output_length - 1);
        put_int(&b, out);
        put(&b, hash_ids, sizeof hash_ids - 1);
        if (want) {
            const uint8_t *w = (const uint8_t *)PyBytes_AS_STRING(words);
            for (uint64_t j = 0; j < h; j++) put_id(&b, siphash(k0, k1, be(w + 8 * j, 8)));
            for (uint64_t j = h; j < want; j++) put_id(&b, siphash(k0, k1 ^ tweak, ++tail));
            b.len -= 2; /* the last id's ", " */
        }
        put(&b, PyBytes_AS_STRING(end), (size_t)PyBytes_GET_SIZE(end));
    }
    PyObject *text = PyBytes_FromStringAndSize(b.p, (Py_ssize_t)b.len);
    PyMem_Free(b.p);
    if (text == NULL) return NULL;
    return Py_BuildValue("(NLK)", text, generated, tail);
fail:
    PyMem_Free(b.p);
    return NULL;
}

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
    return PyModule_Create(&module);
}
