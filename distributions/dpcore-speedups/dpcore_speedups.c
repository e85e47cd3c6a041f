/* dpcore_speedups: the recording writer's per-batch work in one pass, compiled (its Python
 * functions and module; the parts are msgpack_read.c, lines.c and hold.c, see records.h).
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
#include "records.h"

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
    lines_init();
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
