/* dpcore_speedups: the hold.
 *
 * Hold keeps a recording's records until their request ends, as TraceWriter's Python path
 * does (the same lines, leaving at the same flushes), with no Python object per record: a
 * record points into the batch frame it came from (or into the words and id of a record
 * the Python decoder made), which it keeps alive until its line is written. Records sit in
 * arrival order in a ring; a table finds, by request id, the oldest record of that id still
 * waiting for its end (the others of the id follow it in a chain, so a retried id takes its
 * completions in order).
 */
#include <limits.h>
#include <string.h>
#include "records.h"

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

PyTypeObject HoldType = {
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
