/*
 * collector.signals._scan: reads, from the wire bytes of an OTLP ExportTraceServiceRequest, only what
 * collector.signals.traces needs: per resource and per span, the values of the attributes it knows
 * (by slot), the ids, the parent flag, the times, the attribute count and the first unknown
 * attribute nested deeper than allowed.
 *
 * Why hand-written C: walking upb message objects from Python costs ~4 us a span (one wrapper
 * object per KeyValue, per key string and per AnyValue); this walk creates Python objects
 * only for the values a slot takes. No maintained library decodes protobuf faster than upb
 * for Python 3.11 (see README). The pure-Python twin in collector/signals/scan.py is the reference:
 * tests compare the two on every case and on fuzzed requests.
 *
 * The bytes have already been accepted by upb (ParseFromString), so they are well-formed;
 * every read is still bounds-checked, and anything unexpected raises ValueError.
 *
 * Protobuf semantics followed (as upb applies them): a field whose wire type does not match
 * its declaration is an unknown field and skipped; a repeated singular scalar keeps its last
 * value; a repeated singular message merges (its repeated fields concatenate); a oneof keeps
 * its last member, and a message member of a oneof is merged only with itself.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Recently decoded strings kept for reuse: slots (a power of two) and longest length. */
#define STRING_CACHE 256
#define STRING_CACHE_MAX_LEN 128

enum { WT_VARINT = 0, WT_I64 = 1, WT_LEN = 2, WT_SGROUP = 3, WT_EGROUP = 4, WT_I32 = 5 };
/* upb's default nesting limit; groups deeper than this are not skipped but refused. */
#define MAX_GROUP_DEPTH 100

typedef struct {
    uint32_t number;
    int wire_type;
    uint64_t varint;     /* WT_VARINT */
    const uint8_t *data; /* WT_LEN, WT_I64, WT_I32 */
    size_t len;
} Field;

static int read_varint(const uint8_t **pp, const uint8_t *end, uint64_t *out) {
    const uint8_t *p = *pp;
    uint64_t value = 0;
    for (int shift = 0; shift < 64 && p < end; shift += 7) {
        uint8_t byte = *p++;
        value |= (uint64_t)(byte & 0x7f) << shift;
        if (!(byte & 0x80)) {
            *pp = p;
            *out = value;
            return 0;
        }
    }
    return -1;
}

static int skip_group(const uint8_t **pp, const uint8_t *end, uint32_t number, int depth);

static int next_field_slow(const uint8_t **pp, const uint8_t *end, Field *f);

/* The next field of a message: 1, or 0 at its end, or -1 (with ValueError set) if broken.
 * Inline fast path for what nearly every field here is: a one-byte tag of a length-delimited
 * field shorter than 128 bytes. */
static inline int next_field(const uint8_t **pp, const uint8_t *end, Field *f) {
    const uint8_t *p = *pp;
    if (p >= end) return 0;
    if (end - p >= 2 && (p[0] & 0x87) == WT_LEN && p[0] >= 8 && p[1] < 0x80 &&
        (size_t)p[1] <= (size_t)(end - p - 2)) {
        f->number = p[0] >> 3;
        f->wire_type = WT_LEN;
        f->varint = 0;
        f->data = p + 2;
        f->len = p[1];
        *pp = p + 2 + p[1];
        return 1;
    }
    return next_field_slow(pp, end, f);
}

static int next_field_slow(const uint8_t **pp, const uint8_t *end, Field *f) {
    f->varint = 0;
    f->data = NULL;
    f->len = 0;
    for (;;) {
        if (*pp >= end) return 0;
        uint64_t tag;
        if (read_varint(pp, end, &tag) < 0 || tag > UINT32_MAX || (tag >> 3) == 0) goto broken;
        f->number = (uint32_t)(tag >> 3);
        f->wire_type = (int)(tag & 7);
        size_t room = (size_t)(end - *pp);
        switch (f->wire_type) {
        case WT_VARINT:
            if (read_varint(pp, end, &f->varint) < 0) goto broken;
            return 1;
        case WT_I64:
            if (room < 8) goto broken;
            f->data = *pp;
            f->len = 8;
            *pp += 8;
            return 1;
        case WT_I32:
            if (room < 4) goto broken;
            f->data = *pp;
            f->len = 4;
            *pp += 4;
            return 1;
        case WT_LEN: {
            uint64_t len;
            if (read_varint(pp, end, &len) < 0 || len > (uint64_t)(end - *pp)) goto broken;
            f->data = *pp;
            f->len = (size_t)len;
            *pp += len;
            return 1;
        }
        case WT_SGROUP: /* an unknown group: skipped whole, as upb keeps it as unknown */
            if (skip_group(pp, end, f->number, 1) < 0) return -1;
            continue;
        default:
            goto broken;
        }
    }
broken:
    PyErr_SetString(PyExc_ValueError, "malformed protobuf");
    return -1;
}

static int skip_group(const uint8_t **pp, const uint8_t *end, uint32_t number, int depth) {
    if (depth > MAX_GROUP_DEPTH) goto broken;
    while (*pp < end) {
        uint64_t tag;
        /* upb checks field numbers inside an unknown group only for its end tag */
        if (read_varint(pp, end, &tag) < 0 || tag > UINT32_MAX) goto broken;
        uint32_t inner = (uint32_t)(tag >> 3);
        uint64_t len;
        switch ((int)(tag & 7)) {
        case WT_VARINT:
            if (read_varint(pp, end, &len) < 0) goto broken;
            break;
        case WT_I64:
            if ((size_t)(end - *pp) < 8) goto broken;
            *pp += 8;
            break;
        case WT_I32:
            if ((size_t)(end - *pp) < 4) goto broken;
            *pp += 4;
            break;
        case WT_LEN:
            if (read_varint(pp, end, &len) < 0 || len > (uint64_t)(end - *pp)) goto broken;
            *pp += len;
            break;
        case WT_SGROUP:
            if (skip_group(pp, end, inner, depth + 1) < 0) return -1;
            break;
        case WT_EGROUP:
            if (inner != number) goto broken;
            return 0;
        default:
            goto broken;
        }
    }
broken:
    PyErr_SetString(PyExc_ValueError, "malformed protobuf group");
    return -1;
}

/* ---- the key table: attribute name -> slot, known names and config aliases ---------------- */

typedef struct {
    char *key; /* owned copy of the UTF-8 name; NULL marks an empty bucket */
    Py_ssize_t len;
    int slot;
    int alias; /* an alias fills its slot only while the slot is empty */
} Entry;

static uint64_t load_le(const uint8_t *data, size_t n) { /* n <= 8 */
    uint64_t v = 0;
    for (size_t i = n; i > 0; i--) v = (v << 8) | data[i - 1];
    return v;
}

/* Cheap, not strong: attribute names share long prefixes (gen_ai.usage.), so the length, the
 * first, middle and last 8 bytes are mixed; a collision costs one more probe and memcmp. A
 * byte-at-a-time hash cost ~40 ns a name, as much as the rest of the walk. */
static uint64_t hash_bytes(const uint8_t *data, size_t len) {
    uint64_t h = (uint64_t)len * 0x9E3779B97F4A7C15ULL;
    if (len <= 8) {
        h ^= load_le(data, len);
    } else {
        h ^= load_le(data, 8);
        h = (h ^ (h >> 29)) * 0xBF58476D1CE4E5B9ULL;
        h ^= load_le(data + (len - 8) / 2, 8);
        h = (h ^ (h >> 31)) * 0x94D049BB133111EBULL;
        h ^= load_le(data + len - 8, 8);
    }
    h = (h ^ (h >> 29)) * 0xBF58476D1CE4E5B9ULL;
    return h ^ (h >> 32);
}

/* ---- AnyValue ------------------------------------------------------------------------------ */

enum {
    K_NONE = 0, K_STRING = 1, K_BOOL = 2, K_INT = 3, K_DOUBLE = 4, K_ARRAY = 5, K_KVLIST = 6,
    K_BYTES = 7
};

typedef struct {
    int kind;            /* the oneof member set last, K_NONE if none */
    const uint8_t *data; /* K_STRING, K_BYTES: the payload; K_DOUBLE: its 8 bytes */
    size_t len;
    uint64_t varint; /* K_BOOL, K_INT */
    int too_deep;    /* K_ARRAY, K_KVLIST, when depth is checked: nests past the limit */
} AnyValue;

static int nested_too_deep(int kind, const uint8_t *data, size_t len, int remaining);

/* Fold one encoded AnyValue into `v` (an AnyValue field may occur more than once and merges).
 * remaining < 0: depth is not checked. */
static int feed_any_value(AnyValue *v, const uint8_t *p, const uint8_t *end, int remaining) {
    Field f;
    int got;
    while ((got = next_field(&p, end, &f)) > 0) {
        int kind = (int)f.number;
        int expected = (kind == K_STRING || kind == K_ARRAY || kind == K_KVLIST ||
                        kind == K_BYTES) ? WT_LEN
                       : (kind == K_BOOL || kind == K_INT) ? WT_VARINT
                       : (kind == K_DOUBLE) ? WT_I64 : -1;
        if (f.wire_type != expected) continue; /* unknown field */
        if (kind != v->kind) v->too_deep = 0;  /* another oneof member replaces the last */
        v->kind = kind;
        v->data = f.data;
        v->len = f.len;
        v->varint = f.varint;
        if ((kind == K_ARRAY || kind == K_KVLIST) && remaining >= 0 && !v->too_deep) {
            int deep = nested_too_deep(kind, f.data, f.len, remaining);
            if (deep < 0) return -1;
            v->too_deep = deep;
        }
    }
    return got;
}

/* Does this ArrayValue or KeyValueList, at a level with `remaining` nesting levels allowed,
 * nest too deeply? A nested value at 0 remaining levels is one level too deep. */
static int nested_too_deep(int kind, const uint8_t *data, size_t len, int remaining) {
    if (remaining == 0) return 1;
    const uint8_t *p = data, *end = data + len;
    Field f;
    int got;
    while ((got = next_field(&p, end, &f)) > 0) {
        if (f.number != 1 || f.wire_type != WT_LEN) continue;
        AnyValue child = {0};
        if (kind == K_ARRAY) {
            if (feed_any_value(&child, f.data, f.data + f.len, remaining - 1) < 0) return -1;
        } else { /* a KeyValue: its value fields merge into one AnyValue */
            const uint8_t *q = f.data, *kv_end = f.data + f.len;
            Field g;
            int got_kv;
            while ((got_kv = next_field(&q, kv_end, &g)) > 0) {
                if (g.number == 2 && g.wire_type == WT_LEN &&
                    feed_any_value(&child, g.data, g.data + g.len, remaining - 1) < 0)
                    return -1;
            }
            if (got_kv < 0) return -1;
        }
        if ((child.kind == K_ARRAY || child.kind == K_KVLIST) && child.too_deep) return 1;
    }
    return got < 0 ? -1 : 0;
}

/* ---- the scanner object -------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    Entry *table;
    size_t mask; /* table size - 1, a power of two */
    int n_slots;
    int max_depth;
    PyObject *empty;  /* stands for a KeyValue without a value */
    PyObject *nested; /* stands for an array or kvlist value */
    PyObject **strings; /* STRING_CACHE recently decoded short ASCII strings, by hash */
} Scanner;

/* What one attribute list (a span's or a resource's) has gathered. */
typedef struct {
    PyObject **slots; /* n_slots borrowed-or-owned references; NULL = absent */
    Py_ssize_t count;
    PyObject *deep_key; /* first unknown attribute nested too deeply, or NULL */
} Attrs;

static const Entry *lookup(const Scanner *s, const uint8_t *key, size_t len) {
    size_t i = (size_t)hash_bytes(key, len) & s->mask;
    for (;;) {
        const Entry *e = &s->table[i];
        if (e->key == NULL) return NULL;
        if ((size_t)e->len == len && memcmp(e->key, key, len) == 0) return e;
        i = (i + 1) & s->mask;
    }
}

/* A string value. Session ids, model names and operation names repeat from span to span (and
 * within a span, across conventions): a short ASCII string equal to one decoded recently is
 * that same object, which saves the decode, and the str's hash, computed once, is reused by
 * every dict lookup the mapping and aggregation do with it. */
static PyObject *string_object(const Scanner *s, const uint8_t *data, size_t len) {
    if (len > STRING_CACHE_MAX_LEN) {
        return PyUnicode_DecodeUTF8((const char *)data, (Py_ssize_t)len, "strict");
    }
    PyObject **slot = &s->strings[hash_bytes(data, len) & (STRING_CACHE - 1)];
    PyObject *cached = *slot;
    if (cached != NULL && (size_t)PyUnicode_GET_LENGTH(cached) == len &&
        memcmp(PyUnicode_DATA(cached), data, len) == 0) {
        Py_INCREF(cached);
        return cached;
    }
    PyObject *text = PyUnicode_DecodeUTF8((const char *)data, (Py_ssize_t)len, "strict");
    if (text != NULL && PyUnicode_IS_COMPACT_ASCII(text)) {
        Py_INCREF(text);
        Py_XSETREF(*slot, text);
    }
    return text;
}

static PyObject *value_object(const Scanner *s, const AnyValue *v) {
    switch (v->kind) {
    case K_STRING:
        return string_object(s, v->data, v->len);
    case K_BYTES:
        return PyBytes_FromStringAndSize((const char *)v->data, (Py_ssize_t)v->len);
    case K_BOOL:
        return PyBool_FromLong(v->varint != 0);
    case K_INT:
        return PyLong_FromLongLong((long long)(int64_t)v->varint);
    case K_DOUBLE: {
        uint64_t bits = 0;
        for (int i = 7; i >= 0; i--) bits = (bits << 8) | v->data[i]; /* little-endian */
        double d;
        memcpy(&d, &bits, sizeof d);
        return PyFloat_FromDouble(d);
    }
    case K_ARRAY:
    case K_KVLIST:
        Py_INCREF(s->nested);
        return s->nested;
    default:
        Py_INCREF(s->empty);
        return s->empty;
    }
}

/* One encoded KeyValue into the attribute list. */
static int scan_key_value(const Scanner *s, Attrs *a, const uint8_t *data, size_t len) {
    const uint8_t *p = data, *end = data + len;
    const uint8_t *key = (const uint8_t *)"";
    size_t key_len = 0;
    const uint8_t *value = NULL;
    size_t value_len = 0;
    int values = 0;
    Field f;
    int got;
    while ((got = next_field(&p, end, &f)) > 0) {
        if (f.wire_type != WT_LEN) continue;
        if (f.number == 1) {
            key = f.data;
            key_len = f.len;
        } else if (f.number == 2) {
            value = f.data;
            value_len = f.len;
            values++;
        }
    }
    if (got < 0) return -1;
    a->count++;
    const Entry *e = lookup(s, key, key_len);
    if (e != NULL && e->alias && a->slots[e->slot] != NULL) return 0;
    if (e == NULL && (values == 0 || a->deep_key != NULL)) return 0;
    /* The value: every occurrence of field 2 merged, in order (nearly always just one). */
    AnyValue v = {0};
    int remaining = e == NULL ? s->max_depth : -1;
    if (values == 1) {
        if (feed_any_value(&v, value, value + value_len, remaining) < 0) return -1;
    } else {
        p = data;
        while ((got = next_field(&p, end, &f)) > 0) {
            if (f.number == 2 && f.wire_type == WT_LEN &&
                feed_any_value(&v, f.data, f.data + f.len, remaining) < 0)
                return -1;
        }
        if (got < 0) return -1;
    }
    if (e == NULL) {
        if ((v.kind == K_ARRAY || v.kind == K_KVLIST) && v.too_deep) {
            a->deep_key = PyUnicode_DecodeUTF8((const char *)key, (Py_ssize_t)key_len,
                                               "replace");
            if (a->deep_key == NULL) return -1;
        }
        return 0;
    }
    PyObject *obj = value_object(s, &v);
    if (obj == NULL) return -1;
    Py_XSETREF(a->slots[e->slot], obj);
    return 0;
}

static PyObject *slots_list(const Scanner *s, Attrs *a) {
    PyObject *list = PyList_New(s->n_slots);
    if (list == NULL) return NULL;
    for (int i = 0; i < s->n_slots; i++) {
        PyObject *item = a->slots[i];
        if (item == NULL) {
            item = Py_None;
            Py_INCREF(item);
        }
        a->slots[i] = NULL; /* the list owns it now */
        PyList_SET_ITEM(list, i, item);
    }
    return list;
}

static void attrs_clear(const Scanner *s, Attrs *a) {
    for (int i = 0; i < s->n_slots; i++) Py_CLEAR(a->slots[i]);
    Py_CLEAR(a->deep_key);
    a->count = 0;
}

static uint64_t fixed64(const uint8_t *data) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | data[i];
    return v;
}

/* (slots, trace_id, span_id, has_parent, start_ns, end_ns, attribute_count, deep_key) */
static PyObject *scan_span(const Scanner *s, Attrs *a, const uint8_t *data, size_t len) {
    const uint8_t *p = data, *end = data + len;
    const uint8_t *trace_id = NULL, *span_id = NULL;
    size_t trace_len = 0, span_len = 0;
    int has_parent = 0;
    uint64_t start = 0, finish = 0;
    Field f;
    int got;
    while ((got = next_field(&p, end, &f)) > 0) {
        switch (f.number) {
        case 1:
            if (f.wire_type == WT_LEN) { trace_id = f.data; trace_len = f.len; }
            break;
        case 2:
            if (f.wire_type == WT_LEN) { span_id = f.data; span_len = f.len; }
            break;
        case 4:
            if (f.wire_type == WT_LEN) has_parent = f.len > 0;
            break;
        case 7:
            if (f.wire_type == WT_I64) start = fixed64(f.data);
            break;
        case 8:
            if (f.wire_type == WT_I64) finish = fixed64(f.data);
            break;
        case 9:
            if (f.wire_type == WT_LEN && scan_key_value(s, a, f.data, f.len) < 0) return NULL;
            break;
        default:
            break;
        }
    }
    if (got < 0) return NULL;
    PyObject *slots = slots_list(s, a);
    if (slots == NULL) return NULL;
    PyObject *span = PyTuple_New(8);
    if (span == NULL) {
        Py_DECREF(slots);
        return NULL;
    }
    PyObject *items[8] = {
        slots,
        PyBytes_FromStringAndSize((const char *)trace_id, (Py_ssize_t)trace_len),
        PyBytes_FromStringAndSize((const char *)span_id, (Py_ssize_t)span_len),
        PyBool_FromLong(has_parent),
        PyLong_FromUnsignedLongLong((unsigned long long)start),
        PyLong_FromUnsignedLongLong((unsigned long long)finish),
        PyLong_FromSsize_t(a->count),
        a->deep_key ? a->deep_key : Py_None,
    };
    Py_INCREF(items[7]);
    int failed = 0;
    for (int i = 0; i < 8; i++) {
        if (items[i] == NULL) failed = 1;
        PyTuple_SET_ITEM(span, i, items[i]); /* NULL items are fine for the DECREF below */
    }
    if (failed) {
        Py_DECREF(span);
        return NULL;
    }
    return span;
}

/* One ResourceSpans: ((slots, attribute_count, deep_key), [span, ...]) */
static PyObject *scan_resource_spans(const Scanner *s, Attrs *a, const uint8_t *data,
                                     size_t len) {
    PyObject *spans = PyList_New(0);
    if (spans == NULL) return NULL;
    const uint8_t *p = data, *end = data + len;
    Field f;
    int got;
    /* The resource first (it may come after the spans on the wire), then the spans. */
    while ((got = next_field(&p, end, &f)) > 0) {
        if (f.number != 1 || f.wire_type != WT_LEN) continue;
        const uint8_t *q = f.data, *res_end = f.data + f.len;
        Field g;
        int got_res;
        while ((got_res = next_field(&q, res_end, &g)) > 0) {
            if (g.number == 1 && g.wire_type == WT_LEN &&
                scan_key_value(s, a, g.data, g.len) < 0)
                goto fail;
        }
        if (got_res < 0) goto fail;
    }
    if (got < 0) goto fail;
    PyObject *slots = slots_list(s, a);
    if (slots == NULL) goto fail;
    PyObject *resource = Py_BuildValue("(NnO)", slots, a->count,
                                       a->deep_key ? a->deep_key : Py_None);
    attrs_clear(s, a);
    if (resource == NULL) goto fail;

    p = data;
    while ((got = next_field(&p, end, &f)) > 0) {
        if (f.number != 2 || f.wire_type != WT_LEN) continue;
        const uint8_t *q = f.data, *scope_end = f.data + f.len;
        Field g;
        int got_scope;
        while ((got_scope = next_field(&q, scope_end, &g)) > 0) {
            if (g.number != 2 || g.wire_type != WT_LEN) continue;
            PyObject *span = scan_span(s, a, g.data, g.len);
            attrs_clear(s, a);
            if (span == NULL || PyList_Append(spans, span) < 0) {
                Py_XDECREF(span);
                Py_DECREF(resource);
                goto fail;
            }
            Py_DECREF(span);
        }
        if (got_scope < 0) {
            Py_DECREF(resource);
            goto fail;
        }
    }
    if (got < 0) {
        Py_DECREF(resource);
        goto fail;
    }
    return Py_BuildValue("(NN)", resource, spans);
fail:
    attrs_clear(s, a);
    Py_DECREF(spans);
    return NULL;
}

static PyObject *Scanner_scan(Scanner *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    PyObject *out = PyList_New(0);
    PyObject **slots = PyMem_Calloc((size_t)self->n_slots, sizeof(PyObject *));
    if (out == NULL || slots == NULL) {
        Py_XDECREF(out);
        PyMem_Free(slots);
        PyBuffer_Release(&view);
        return out == NULL ? NULL : PyErr_NoMemory();
    }
    Attrs attrs = {slots, 0, NULL};
    const uint8_t *p = view.buf, *end = (const uint8_t *)view.buf + view.len;
    Field f;
    int got;
    while ((got = next_field(&p, end, &f)) > 0) {
        if (f.number != 1 || f.wire_type != WT_LEN) continue;
        PyObject *item = scan_resource_spans(self, &attrs, f.data, f.len);
        if (item == NULL || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            got = -1;
            break;
        }
        Py_DECREF(item);
    }
    attrs_clear(self, &attrs);
    PyMem_Free(slots);
    PyBuffer_Release(&view);
    if (got < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

static int add_entries(Scanner *self, PyObject *mapping, int alias) {
    PyObject *name, *slot_obj;
    Py_ssize_t pos = 0;
    while (PyDict_Next(mapping, &pos, &name, &slot_obj)) {
        Py_ssize_t len;
        const char *utf8 = PyUnicode_AsUTF8AndSize(name, &len);
        if (utf8 == NULL) return -1;
        long slot = PyLong_AsLong(slot_obj);
        if (slot == -1 && PyErr_Occurred()) return -1;
        if (slot < 0 || slot >= self->n_slots) {
            PyErr_SetString(PyExc_ValueError, "slot out of range");
            return -1;
        }
        if (lookup(self, (const uint8_t *)utf8, (size_t)len) != NULL) continue; /* known wins */
        size_t i = (size_t)hash_bytes((const uint8_t *)utf8, (size_t)len) & self->mask;
        while (self->table[i].key != NULL) i = (i + 1) & self->mask;
        char *copy = PyMem_Malloc((size_t)len + 1);
        if (copy == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        memcpy(copy, utf8, (size_t)len + 1);
        self->table[i] = (Entry){copy, len, (int)slot, alias};
    }
    return 0;
}

static void Scanner_dealloc(Scanner *self) {
    if (self->table != NULL) {
        for (size_t i = 0; i <= self->mask; i++) PyMem_Free(self->table[i].key);
        PyMem_Free(self->table);
    }
    Py_XDECREF(self->empty);
    Py_XDECREF(self->nested);
    if (self->strings != NULL) {
        for (size_t i = 0; i < STRING_CACHE; i++) Py_XDECREF(self->strings[i]);
        PyMem_Free(self->strings);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Scanner_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"known", "aliases", "n_slots", "max_depth", "empty", "nested", NULL};
    PyObject *known, *aliases, *empty, *nested;
    int n_slots, max_depth;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!O!iiOO", names, &PyDict_Type, &known,
                                     &PyDict_Type, &aliases, &n_slots, &max_depth, &empty,
                                     &nested))
        return NULL;
    if (n_slots <= 0 || max_depth < 0) {
        PyErr_SetString(PyExc_ValueError, "n_slots must be positive and max_depth not negative");
        return NULL;
    }
    Scanner *self = (Scanner *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    size_t want = 2 * (size_t)(PyDict_GET_SIZE(known) + PyDict_GET_SIZE(aliases)) + 1;
    size_t size = 16;
    while (size < want) size *= 2;
    self->table = PyMem_Calloc(size, sizeof(Entry));
    self->mask = size - 1;
    self->n_slots = n_slots;
    self->max_depth = max_depth;
    Py_INCREF(empty);
    self->empty = empty;
    Py_INCREF(nested);
    self->nested = nested;
    self->strings = PyMem_Calloc(STRING_CACHE, sizeof(PyObject *));
    if (self->strings == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    if (self->table == NULL) {
        self->mask = 0;
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    if (add_entries(self, known, 0) < 0 || add_entries(self, aliases, 1) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static PyMethodDef Scanner_methods[] = {
    {"scan", (PyCFunction)Scanner_scan, METH_O,
     "scan(wire) -> [((slots, attribute_count, deep_key), [span, ...]), ...] per ResourceSpans;"
     " span = (slots, trace_id, span_id, has_parent, start_ns, end_ns, attribute_count, "
     "deep_key)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ScannerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "collector.signals._scan.Scanner",
    .tp_basicsize = sizeof(Scanner),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Reads the attributes collector.signals.traces knows from OTLP trace request bytes.",
    .tp_new = Scanner_new,
    .tp_dealloc = (destructor)Scanner_dealloc,
    .tp_methods = Scanner_methods,
};

static struct PyModuleDef scan_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "collector.signals._scan",
    .m_doc = "Compiled reader of OTLP trace requests for collector.signals.traces (see collector/signals/scan.py).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__scan(void) {
    if (PyType_Ready(&ScannerType) < 0) return NULL;
    PyObject *module = PyModule_Create(&scan_module);
    if (module == NULL) return NULL;
    Py_INCREF(&ScannerType);
    if (PyModule_AddObject(module, "Scanner", (PyObject *)&ScannerType) < 0) {
        Py_DECREF(&ScannerType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
