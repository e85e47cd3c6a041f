/* dpcore_speedups: reading msgpack items of a batch frame, and a request header's fields. */
#include <string.h>
#include "records.h"

/* ------------------------------------------------------------------ msgpack reading */






/* Read one item (a container's header only); 0, or -1 when truncated or not msgpack. */
int next(Reader *r, Item *it) {
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
int skip(Reader *r) {
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

PyObject *int_of(const Item *it) {
    return it->neg ? PyLong_FromLongLong((long long)(int64_t)it->u) : PyLong_FromUnsignedLongLong(it->u);
}

static int key_is(const Item *k, const char *name) {
    size_t n = strlen(name);
    return k->n == n && memcmp(k->s, name, n) == 0;
}



/* Read one header map; 0, or -1 when it is not one the typed path reads. */
int read_header(Reader *r, Header *h) {
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
