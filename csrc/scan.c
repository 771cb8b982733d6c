/* logstate._cnative: the replay scan of an open without an index snapshot.
 *
 * Owns: replay_records(), the common case of recovery's replay in C: walk
 * the records of one window of a segment's bytes (the bytes the windowed
 * scanner already read), check each frame (type, length, CRC) and apply the
 * plain set and delete records and the set and delete operations of
 * uncompressed groups to the namespace indexes, with the location ints,
 * live bytes and highest sequence number that the Python replay
 * (logstate/_keydir.py Keydir.apply_frame over logstate/_scan.py
 * replay_frame) gives. A namespace index that is a KeyMap (exact type) is
 * set and deleted through keymap.c's C API by the key's raw bytes, their
 * UTF-8 checked here (utf8_valid: what bytes.decode accepts), so no str or
 * int is made per record; a dict or other mapping takes the object path.
 *
 * Also check_frames(), the same frame checks (and, when asked, the body
 * checks) without an index: the restore's check of a snapshot's segments
 * and of each record it appends (logstate/replication/_build.py).
 *
 * Must never: do I/O, decide anything about damage, or apply part of a
 * record. At the first record it does not handle it stops and returns its
 * offset, having applied nothing of it; the Python path then takes that
 * record (or reports the damage) and calls here again after it. Not
 * handled, so handed back: damage of any kind, a record that does not fit
 * the window, a body that does not parse, compressed groups, namespace
 * create/drop/clear, checkpoints, compaction markers, set values with an
 * expiry time (TAG_EXPIRES), a set into a namespace that does not exist
 * yet, a namespaces mapping that is not a dict, a key of a KeyMap index that
 * is not valid UTF-8, a set or delete of a KeyMap key whose location is a
 * side object (a compressed group's tuple).
 *
 * Rules copied from Python (each marked "copy of" where it is; the Python
 * places say "copied in csrc/scan.c"; tests/test_native_scan.py proves the
 * two equal): the frame checks of _scan.WindowedScan.frames' fast path, the
 * body checks of _scan._replay_op and replay_frame, and the location ints
 * and live bytes of Keydir.apply_frame.
 */
#include "native.h"

#include <string.h>

/* copy of logstate/_format.py's layout constants (exported as SCAN_LAYOUT,
   tests/test_native_scan.py compares them) */
#define FRAME_HEADER_SIZE 9
#define RECORD_OVERHEAD 17
#define MIN_PAYLOAD_SIZE 8
#define MAX_RECORD_SIZE (1u << 30)
#define MAX_RECORD_TYPE 8
#define REC_SET 1
#define REC_DELETE 2
#define REC_GROUP 4
#define GROUP_HEADER_SIZE 5
#define GROUP_OP_SIZE 9
#define TAG_EXPIRES 10
/* copy of logstate/_location.py's packing */
#define SEGMENT_SHIFT 74
#define OFFSET_SHIFT 34
#define SIZE_SHIFT 2
#define KIND_RECORD 0
#define KIND_GROUP_OP 1

static inline uint32_t
rd_u32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline uint64_t
rd_u64(const unsigned char *p)
{
    return (uint64_t)rd_u32(p) | (uint64_t)rd_u32(p + 4) << 32;
}

static inline size_t
rd_u16(const unsigned char *p)
{
    return (size_t)p[0] | (size_t)p[1] << 8;
}

/* copy of _scan.WindowedScan.frames' fast path: the size of the whole, valid
   record (type, length, CRC) at buf[pos:], 0 when there is none (damage, or
   a record that does not fit the window: the Python path decides). */
static inline size_t
whole_frame(const unsigned char *buf, Py_ssize_t n, Py_ssize_t pos)
{
    if (pos + RECORD_OVERHEAD > n) {
        return 0;
    }
    const unsigned char *p = buf + pos;
    uint32_t length = rd_u32(p + 4);
    int record_type = p[8];
    if (record_type < 1 || record_type > MAX_RECORD_TYPE || length < MIN_PAYLOAD_SIZE
        || length > MAX_RECORD_SIZE || pos + FRAME_HEADER_SIZE + (Py_ssize_t)length > n) {
        return 0;
    }
    size_t size = FRAME_HEADER_SIZE + (size_t)length;
    if (rd_u32(p) != ls_crc32c(0, p + 4, size - 4)) {
        return 0;
    }
    return size;
}

/* One parsed set/delete: where its names are, and where its location points. */
typedef struct {
    int op_type;
    const unsigned char *ns;
    size_t ns_size;
    const unsigned char *key;
    size_t key_size;
    uint64_t offset; /* in the segment file */
    uint64_t size;
    int kind;
    uint64_t hash; /* of the key, when its index is a KeyMap */
} ParsedOp;

/* What one call walks: the window, the indexes, the location of the window. */
typedef struct {
    const unsigned char *buf;
    Py_ssize_t n;
    PyObject *namespaces; /* a dict: ns -> index (a mapping str -> location) */
    uint64_t segment;
    long long shift; /* file offset = window offset - shift */
    PyObject *high;  /* segment << SEGMENT_SHIFT */
    /* the last namespace looked up (its bytes point into buf): most records
       of a store name the same one */
    const unsigned char *ns;
    size_t ns_size;
    int ns_cached;
    PyObject *index; /* borrowed from namespaces (not changed during a call); NULL: absent */
    int index_is_keymap; /* index is a KeyMap (exact type): the raw C API, no objects */
    /* the hash of the record being applied, found by the look-ahead (its
       KeyMap; NULL: none) */
    PyObject *pre_map;
    uint64_t pre_hash;
    long long live_delta;
} ScanState;

/* copy of _scan._replay_op's checks for a set/delete body buf[start:end]:
   1 and *op filled when it parses and is handled, 0 otherwise. */
static int
parse_keyed(const unsigned char *buf, size_t start, size_t end, int op_type, ParsedOp *op)
{
    if (start + 2 > end) {
        return 0;
    }
    size_t p = start + 2 + rd_u16(buf + start);
    if (p + 2 > end) {
        return 0;
    }
    size_t q = p + 2 + rd_u16(buf + p);
    if (q > end || (op_type == REC_SET && q == end) || (op_type == REC_DELETE && q != end)) {
        return 0;
    }
    if (q == p + 2) {
        return 0; /* an empty key: Python raises CorruptionError */
    }
    if (op_type == REC_SET && buf[q] == TAG_EXPIRES) {
        return 0; /* an expiry time: the Python path notes it */
    }
    op->op_type = op_type;
    op->ns = buf + start + 2;
    op->ns_size = p - (start + 2);
    op->key = buf + p + 2;
    op->key_size = q - (p + 2);
    return 1;
}

/* The index of op's namespace (borrowed) in *index, NULL when absent.
   0 on success, 1 when the names are not valid UTF-8 (hand back), -1 on error. */
static int
lookup_namespace(ScanState *st, const ParsedOp *op, PyObject **index)
{
    if (st->ns_cached && st->ns_size == op->ns_size
        && (op->ns_size == 0 || memcmp(st->ns, op->ns, op->ns_size) == 0)) {
        *index = st->index;
        return 0;
    }
    PyObject *name = PyUnicode_DecodeUTF8((const char *)op->ns, (Py_ssize_t)op->ns_size, NULL);
    if (name == NULL) {
        if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
            PyErr_Clear();
            return 1;
        }
        return -1;
    }
    PyObject *found = PyDict_GetItemWithError(st->namespaces, name);
    Py_DECREF(name);
    if (found == NULL && PyErr_Occurred()) {
        return -1;
    }
    st->ns = op->ns;
    st->ns_size = op->ns_size;
    st->ns_cached = 1;
    st->index = found;
    st->index_is_keymap = found != NULL && ls_keymap_check_exact(found);
    *index = found;
    return 0;
}

/* 1 when the n bytes at p are what bytes.decode("utf-8") accepts (strict:
   no overlong forms, no surrogates, nothing past U+10FFFF), else 0. */
static int
utf8_valid(const unsigned char *p, size_t n)
{
    size_t i = 0;
    while (i < n) {
        if (i + 8 <= n) {
            uint64_t w;
            memcpy(&w, p + i, 8);
            if ((w & 0x8080808080808080ull) == 0) {
                i += 8;
                continue;
            }
        }
        unsigned char c = p[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t more;
        unsigned char lo = 0x80, hi = 0xBF; /* the range of the second byte */
        if (c >= 0xC2 && c <= 0xDF) {
            more = 1;
        }
        else if (c >= 0xE0 && c <= 0xEF) {
            more = 2;
            if (c == 0xE0) {
                lo = 0xA0; /* overlong below */
            }
            else if (c == 0xED) {
                hi = 0x9F; /* surrogates above */
            }
        }
        else if (c >= 0xF0 && c <= 0xF4) {
            more = 3;
            if (c == 0xF0) {
                lo = 0x90;
            }
            else if (c == 0xF4) {
                hi = 0x8F; /* past U+10FFFF above */
            }
        }
        else {
            return 0; /* a continuation byte, C0, C1, F5..FF */
        }
        if (n - i <= more || p[i + 1] < lo || p[i + 1] > hi) {
            return 0;
        }
        for (size_t k = 2; k <= more; k++) {
            if ((p[i + k] & 0xC0) != 0x80) {
                return 0;
            }
        }
        i += more + 1;
    }
    return 1;
}

/* copy of _location.location_size: the bytes a location takes on disk. */
static int
location_size(PyObject *loc, long long *size)
{
    if (PyLong_Check(loc)) {
        unsigned long long low = PyLong_AsUnsignedLongLongMask(loc);
        if (low == (unsigned long long)-1 && PyErr_Occurred()) {
            return -1;
        }
        *size = (long long)((low >> SIZE_SHIFT) & 0xFFFFFFFFull);
        return 0;
    }
    if (PyTuple_Check(loc) && PyTuple_GET_SIZE(loc) == 6) {
        long long share = PyLong_AsLongLong(PyTuple_GET_ITEM(loc, 5));
        if (share == -1 && PyErr_Occurred()) {
            return -1;
        }
        *size = share;
        return 0;
    }
    PyErr_Format(PyExc_TypeError, "index holds a %.100s, not a location", Py_TYPE(loc)->tp_name);
    return -1;
}

/* copy of Keydir.apply_frame's packing: segment << 74 | offset << 34 | size << 2 | kind */
static PyObject *
make_location(ScanState *st, uint64_t offset, uint64_t size, int kind)
{
    uint64_t low = offset << OFFSET_SHIFT | size << SIZE_SHIFT | (uint64_t)kind;
    uint64_t over = offset >> (64 - OFFSET_SHIFT); /* offset bits past bit 63 */
#if PY_VERSION_HEX >= 0x030D0000
    unsigned char raw[16];
    uint64_t high = st->segment << (SEGMENT_SHIFT - 64) | over;
    for (int i = 0; i < 8; i++) {
        raw[i] = (unsigned char)(low >> (8 * i));
        raw[8 + i] = (unsigned char)(high >> (8 * i));
    }
    return PyLong_FromUnsignedNativeBytes(raw, sizeof(raw), Py_ASNATIVEBYTES_LITTLE_ENDIAN);
#else
    PyObject *low_int = PyLong_FromUnsignedLongLong(low);
    if (low_int == NULL) {
        return NULL;
    }
    PyObject *result;
    if (over == 0) {
        result = PyNumber_Or(st->high, low_int);
    }
    else {
        /* a record past 1 GiB into its segment: rare, the slow way */
        PyObject *over_int = PyLong_FromUnsignedLongLong(over);
        PyObject *shift = over_int == NULL ? NULL : PyLong_FromLong(64);
        PyObject *over_high = shift == NULL ? NULL : PyNumber_Lshift(over_int, shift);
        PyObject *both = over_high == NULL ? NULL : PyNumber_Or(st->high, over_high);
        result = both == NULL ? NULL : PyNumber_Or(both, low_int);
        Py_XDECREF(over_int);
        Py_XDECREF(shift);
        Py_XDECREF(over_high);
        Py_XDECREF(both);
    }
    Py_DECREF(low_int);
    return result;
#endif
}

/* Apply one parsed op whose namespace index is `index` (NULL: absent).
   copy of Keydir.apply_frame's REC_SET branch (watch False) and of
   Keydir.delete (nothing ordered, nothing expiring). key NULL: index is a
   KeyMap, reached by op's raw key bytes. 1: applied; 0: not, the old value
   is a KeyMap's side object (a compressed group's tuple): hand back; -1 on
   error. */
static int
apply_op(ScanState *st, const ParsedOp *op, PyObject *key, PyObject *index)
{
    long long old_size = 0;
    if (key == NULL) { /* index is a KeyMap: by raw bytes (checked UTF-8), no objects */
        uint64_t old[2];
        int found;
        if (op->op_type == REC_DELETE) {
            found = index == NULL
                        ? LS_KM_ABSENT
                        : ls_keymap_delete(index, op->key, op->key_size, op->hash, old);
            if (found == LS_KM_INT) { /* (copy of location_size, as above) */
                old_size = -(long long)((old[0] >> SIZE_SHIFT) & 0xFFFFFFFFull);
            }
        }
        else {
            /* copy of Keydir.apply_frame's packing, as make_location's */
            uint64_t lo = op->offset << OFFSET_SHIFT | op->size << SIZE_SHIFT | (uint64_t)op->kind;
            uint64_t hi = st->segment << (SEGMENT_SHIFT - 64) | op->offset >> (64 - OFFSET_SHIFT);
            found = ls_keymap_set(index, op->key, op->key_size, op->hash, lo, hi, old);
            old_size = (long long)op->size;
            if (found == LS_KM_INT) {
                old_size -= (long long)((old[0] >> SIZE_SHIFT) & 0xFFFFFFFFull);
            }
        }
        if (found < 0) {
            return -1;
        }
        if (found == LS_KM_SIDE) {
            return 0; /* unchanged: the Python path takes the record */
        }
        st->live_delta += old_size;
        return 1;
    }
    if (op->op_type == REC_DELETE) {
        if (index == NULL) {
            return 1;
        }
        PyObject *old;
        if (PyDict_CheckExact(index)) {
            old = PyDict_GetItemWithError(index, key);
            if (old == NULL) {
                return PyErr_Occurred() ? -1 : 1;
            }
            if (location_size(old, &old_size) < 0 || PyDict_DelItem(index, key) < 0) {
                return -1;
            }
        }
        else {
            old = PyObject_GetItem(index, key);
            if (old == NULL) {
                if (PyErr_ExceptionMatches(PyExc_KeyError)) {
                    PyErr_Clear();
                    return 1;
                }
                return -1;
            }
            int failed = location_size(old, &old_size) < 0 || PyObject_DelItem(index, key) < 0;
            Py_DECREF(old);
            if (failed) {
                return -1;
            }
        }
        st->live_delta -= old_size;
        return 1;
    }
    PyObject *loc = make_location(st, op->offset, op->size, op->kind);
    if (loc == NULL) {
        return -1;
    }
    int failed;
    if (PyDict_CheckExact(index)) {
        /* one lookup for a new key (replay's common case): stored unless present */
        PyObject *old = PyDict_SetDefault(index, key, loc); /* borrowed */
        failed = old == NULL
                 || (old != loc
                     && (location_size(old, &old_size) < 0 || PyDict_SetItem(index, key, loc) < 0));
    }
    else {
        PyObject *old = PyObject_GetItem(index, key);
        if (old == NULL && PyErr_ExceptionMatches(PyExc_KeyError)) {
            PyErr_Clear();
        }
        failed = (old == NULL && PyErr_Occurred())
                 || (old != NULL && location_size(old, &old_size) < 0)
                 || PyObject_SetItem(index, key, loc) < 0;
        Py_XDECREF(old);
    }
    Py_DECREF(loc);
    if (failed) {
        return -1;
    }
    st->live_delta += (long long)op->size - old_size;
    return 1;
}

/* Parse and check every op of the record at buf[pos:pos+size] into ops (at
   most capacity of them); copy of _scan.replay_frame. 1 when the whole record
   is handled, 0 when it is not (hand back). ops NULL: check only (any number
   of ops), each op's namespace and key also checked as UTF-8, as decoding
   them does (the replay checks them as it looks them up). */
static int
parse_record(const ScanState *st, size_t pos, size_t size, int record_type, ParsedOp *ops,
             size_t capacity, size_t *count)
{
    const unsigned char *buf = st->buf;
    size_t end = pos + size;
    size_t start = pos + RECORD_OVERHEAD;
    ParsedOp checked;
    if (record_type == REC_SET || record_type == REC_DELETE) {
        ParsedOp *op = ops != NULL ? &ops[0] : &checked;
        if (!parse_keyed(buf, start, end, record_type, op)
            || (ops == NULL && !(utf8_valid(op->ns, op->ns_size)
                                 && utf8_valid(op->key, op->key_size)))) {
            return 0;
        }
        op->offset = (uint64_t)((long long)pos - st->shift);
        op->size = size;
        op->kind = KIND_RECORD;
        *count = 1;
        return 1;
    }
    if (record_type != REC_GROUP || start + GROUP_HEADER_SIZE > end || buf[start] != 0) {
        return 0; /* other records, a truncated header, compressed groups, unknown flags */
    }
    uint64_t claimed = rd_u32(buf + start + 1);
    size_t p = start + GROUP_HEADER_SIZE;
    if (claimed * GROUP_OP_SIZE > end - p || (ops != NULL && claimed > capacity)) {
        return 0;
    }
    for (size_t i = 0; i < claimed; i++) {
        size_t body = p + GROUP_OP_SIZE;
        if (body > end) {
            return 0;
        }
        int op_type = buf[p + 4];
        size_t op_end = body + rd_u32(buf + p + 5);
        if (op_end > end || rd_u32(buf + p) != ls_crc32c(0, buf + p + 4, op_end - (p + 4))) {
            return 0;
        }
        ParsedOp *op = ops != NULL ? &ops[i] : &checked;
        if ((op_type != REC_SET && op_type != REC_DELETE)
            || !parse_keyed(buf, body, op_end, op_type, op)
            || (ops == NULL && !(utf8_valid(op->ns, op->ns_size)
                                 && utf8_valid(op->key, op->key_size)))) {
            return 0; /* other op types (valid or not) and bodies that do not parse */
        }
        op->offset = (uint64_t)((long long)p - st->shift);
        op->size = op_end - p;
        op->kind = KIND_GROUP_OP;
        p = op_end;
    }
    if (p != end) {
        return 0;
    }
    *count = (size_t)claimed;
    return 1;
}

/* Decode each op's key and find its namespace, then apply them all: nothing
   of the record is applied unless all of it can be. 1: applied, 0: hand
   back, -1: error. */
static int
apply_record(ScanState *st, ParsedOp *ops, size_t count, PyObject **keys, PyObject **indexes)
{
    size_t decoded = 0;
    int result = 1;
    for (; decoded < count; decoded++) {
        PyObject *index;
        int found = lookup_namespace(st, &ops[decoded], &index);
        if (found != 0) {
            result = found > 0 ? 0 : -1;
            break;
        }
        if (index == NULL && ops[decoded].op_type == REC_SET) {
            result = 0; /* the Python path creates the namespace (Keydir.ensure) */
            break;
        }
        indexes[decoded] = index;
        if (index != NULL && st->index_is_keymap) {
            ParsedOp *op = &ops[decoded];
            if (!utf8_valid(op->key, op->key_size)) {
                result = 0; /* (what Python does with it: its path) */
                break;
            }
            op->hash = count == 1 && st->pre_map == index ? st->pre_hash
                                                          : ls_keymap_hash(op->key, op->key_size);
            keys[decoded] = NULL;
            uint64_t old[2];
            if (count > 1 && ls_keymap_find(index, op->key, op->key_size, op->hash, old)
                                 == LS_KM_SIDE) {
                result = 0; /* a side object: apply_op would stop part way */
                decoded++;
                break;
            }
            continue;
        }
        keys[decoded] = PyUnicode_DecodeUTF8(
            (const char *)ops[decoded].key, (Py_ssize_t)ops[decoded].key_size, NULL);
        if (keys[decoded] == NULL) {
            if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
                PyErr_Clear();
                result = 0;
            }
            else {
                result = -1;
            }
            break;
        }
    }
    if (result == 1) {
        for (size_t i = 0; i < count; i++) {
            int applied = apply_op(st, &ops[i], keys[i], indexes[i]);
            if (applied < 0) {
                result = -1;
                break;
            }
            if (applied == 0) {
                if (i == 0) {
                    result = 0; /* nothing of the record applied yet */
                    break;
                }
                /* (the check above rules it out in a record of several ops) */
                PyErr_SetString(PyExc_SystemError, "replay_records: a side object part way");
                result = -1;
                break;
            }
        }
    }
    for (size_t i = 0; i < decoded; i++) {
        Py_XDECREF(keys[i]);
    }
    return result;
}

/* The look-ahead of the KeyMap path: a record after the one being applied
   whose key is hashed early, to bring its table slot (two records ahead)
   and then the first records its search probes (one ahead) into cache. A
   hint only: each record is checked in full when its turn comes. */
typedef struct {
    Py_ssize_t pos;  /* the record's offset in the window */
    Py_ssize_t size; /* its size; 0: not a whole record (look no further) */
    PyObject *map;   /* its KeyMap (borrowed); NULL: not a plain record into the cached index */
    uint64_t hash;
} Ahead;

#define AHEAD 3

static void
peek(const ScanState *st, Py_ssize_t pos, Ahead *a)
{
    a->pos = pos;
    a->size = 0;
    a->map = NULL;
    if (pos + RECORD_OVERHEAD > st->n) {
        return;
    }
    const unsigned char *p = st->buf + pos;
    uint32_t length = rd_u32(p + 4);
    if (length < MIN_PAYLOAD_SIZE || length > MAX_RECORD_SIZE
        || pos + FRAME_HEADER_SIZE + (Py_ssize_t)length > st->n) {
        return;
    }
    a->size = FRAME_HEADER_SIZE + (Py_ssize_t)length;
    int record_type = p[8];
    ParsedOp op;
    if ((record_type != REC_SET && record_type != REC_DELETE) || !st->ns_cached
        || st->index == NULL || !st->index_is_keymap
        || !parse_keyed(st->buf, (size_t)pos + RECORD_OVERHEAD, (size_t)(pos + a->size), record_type,
                        &op)
        || op.ns_size != st->ns_size || (op.ns_size > 0 && memcmp(op.ns, st->ns, op.ns_size) != 0)) {
        return;
    }
    a->map = st->index;
    a->hash = ls_keymap_hash(op.key, op.key_size);
    ls_keymap_prefetch_slot(a->map, a->hash);
}

#define SMALL_GROUP 64

/* replay_records(window, offset, namespaces, segment, shift) */
static PyObject *
replay_records(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t offset;
    PyObject *namespaces;
    unsigned long long segment;
    long long shift;
    if (!PyArg_ParseTuple(args, "y*nOKL:replay_records", &view, &offset, &namespaces, &segment,
                          &shift)) {
        return NULL;
    }
    PyObject *result = NULL;
    ParsedOp small_ops[SMALL_GROUP];
    PyObject *small_keys[SMALL_GROUP];
    PyObject *small_indexes[SMALL_GROUP];
    ParsedOp *ops = small_ops;
    PyObject **keys = small_keys;
    PyObject **indexes = small_indexes;
    size_t capacity = SMALL_GROUP;
    ScanState st = {0};
    st.buf = view.buf;
    st.n = view.len;
    st.namespaces = namespaces;
    st.segment = segment;
    st.shift = shift;
    Py_ssize_t pos = offset;
    Py_ssize_t records = 0;
    uint64_t max_seq = 0;
    /* every location in range: file offsets from 0 to below 2**40, a segment
       number that fits the int's top bits */
    if (offset < 0 || offset > view.len || segment >= (1ull << (128 - SEGMENT_SHIFT))
        || shift > (long long)offset || (long long)view.len - shift > (1ll << 40)) {
        PyErr_SetString(PyExc_ValueError,
                        "replay_records: offset, shift or segment out of range");
        goto done;
    }
    if (!PyDict_CheckExact(namespaces)) {
        goto finish; /* unusual: the Python path */
    }
    {
        PyObject *seg_int = PyLong_FromUnsignedLongLong(segment);
        PyObject *bits = seg_int == NULL ? NULL : PyLong_FromLong(SEGMENT_SHIFT);
        st.high = bits == NULL ? NULL : PyNumber_Lshift(seg_int, bits);
        Py_XDECREF(seg_int);
        Py_XDECREF(bits);
        if (st.high == NULL) {
            goto done;
        }
    }
    const unsigned char *buf = st.buf;
    Py_ssize_t n = st.n;
    Ahead ahead[AHEAD];
    int nahead = 0;
    Py_ssize_t peek_at = pos;
    /* copy of _scan.WindowedScan.frames' fast path: a whole, valid record in the window */
    while (pos + RECORD_OVERHEAD <= n) {
        if (nahead == 0 || ahead[0].pos != pos) {
            nahead = 0;
            peek_at = pos;
        }
        while (nahead < AHEAD && peek_at < n) {
            peek(&st, peek_at, &ahead[nahead]);
            if (ahead[nahead].size == 0) {
                peek_at = n;
                break;
            }
            peek_at += ahead[nahead++].size;
        }
        if (nahead > 1 && ahead[1].map != NULL) {
            ls_keymap_prefetch_keys(ahead[1].map, ahead[1].hash);
        }
        st.pre_map = nahead > 0 && ahead[0].pos == pos ? ahead[0].map : NULL;
        st.pre_hash = st.pre_map != NULL ? ahead[0].hash : 0;
        const unsigned char *p = buf + pos;
        int record_type = p[8];
        if (record_type != REC_SET && record_type != REC_DELETE && record_type != REC_GROUP) {
            break; /* checked by the Python path, which applies it */
        }
        size_t size = whole_frame(buf, n, pos);
        if (size == 0) {
            break;
        }
        size_t count = 0;
        if (record_type == REC_GROUP && size / GROUP_OP_SIZE > capacity) {
            /* room for as many ops as could fit in the record */
            size_t want = size / GROUP_OP_SIZE + 1;
            ParsedOp *more_ops = PyMem_Malloc(want * sizeof(ParsedOp));
            PyObject **more_keys = PyMem_Malloc(want * sizeof(PyObject *));
            PyObject **more_indexes = PyMem_Malloc(want * sizeof(PyObject *));
            if (more_ops == NULL || more_keys == NULL || more_indexes == NULL) {
                PyMem_Free(more_ops);
                PyMem_Free(more_keys);
                PyMem_Free(more_indexes);
                PyErr_NoMemory();
                goto done;
            }
            if (ops != small_ops) {
                PyMem_Free(ops);
                PyMem_Free(keys);
                PyMem_Free(indexes);
            }
            ops = more_ops;
            keys = more_keys;
            indexes = more_indexes;
            capacity = want;
        }
        if (!parse_record(&st, (size_t)pos, size, record_type, ops, capacity, &count)) {
            break;
        }
        int applied = apply_record(&st, ops, count, keys, indexes);
        if (applied < 0) {
            goto done;
        }
        if (applied == 0) {
            break;
        }
        uint64_t seq = rd_u64(p + FRAME_HEADER_SIZE);
        if (seq > max_seq) {
            max_seq = seq;
        }
        records++;
        pos += (Py_ssize_t)size;
        if (nahead > 0) {
            memmove(ahead, ahead + 1, (size_t)(nahead - 1) * sizeof(Ahead));
            nahead--;
        }
    }
finish:
    result = Py_BuildValue("nnKL", pos, records, (unsigned long long)max_seq, st.live_delta);
done:
    if (ops != small_ops) {
        PyMem_Free(ops);
        PyMem_Free(keys);
        PyMem_Free(indexes);
    }
    Py_XDECREF(st.high);
    PyBuffer_Release(&view);
    return result;
}

PyDoc_STRVAR(replay_records_doc,
"replay_records(window, offset, namespaces, segment, shift) -> (stop, records, seq, live)\n\n"
"Apply the records of window[offset:] that the C path handles (valid plain\n"
"set/delete records and uncompressed groups of sets and deletes) to the\n"
"namespace indexes, as logstate._keydir.Keydir.apply_frame does; stop at the\n"
"first record it does not handle, applying nothing of it. A location's file\n"
"offset is its window offset minus shift. Returns where it stopped, how many\n"
"records it applied, their highest seq (0: none) and the live bytes added.");

/* check_frames(data, offset, first_seq, bodies) -> (stop, count, seq) */
static PyObject *
check_frames(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t offset;
    PyObject *first;
    int bodies;
    if (!PyArg_ParseTuple(args, "y*nO!p:check_frames", &view, &offset, &PyLong_Type, &first,
                          &bodies)) {
        return NULL;
    }
    /* (OverflowError past the format's 64 bits, or below 0) */
    unsigned long long first_seq = PyLong_AsUnsignedLongLong(first);
    if (first_seq == (unsigned long long)-1 && PyErr_Occurred()) {
        PyBuffer_Release(&view);
        return NULL;
    }
    if (offset < 0 || offset > view.len) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "check_frames: offset out of range");
        return NULL;
    }
    ScanState st = {0};
    st.buf = view.buf;
    st.n = view.len;
    Py_ssize_t pos = offset;
    unsigned long long count = 0;
    uint64_t max_seq = 0;
    for (;;) {
        size_t size = whole_frame(st.buf, st.n, pos);
        if (size == 0) {
            break;
        }
        uint64_t seq = rd_u64(st.buf + pos + FRAME_HEADER_SIZE);
        if (first_seq != 0 && (seq != first_seq + count || first_seq + count < first_seq)) {
            break;
        }
        size_t ops;
        if (bodies && !parse_record(&st, (size_t)pos, size, st.buf[pos + 8], NULL, 0, &ops)) {
            break;
        }
        if (seq > max_seq) {
            max_seq = seq;
        }
        count++;
        pos += (Py_ssize_t)size;
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("nKK", pos, count, (unsigned long long)max_seq);
}

PyDoc_STRVAR(check_frames_doc,
"check_frames(data, offset, first_seq, bodies) -> (stop, count, seq)\n\n"
"Walk the whole, valid records of data[offset:] (type, length and CRC, as\n"
"logstate._scan.WindowedScan.frames checks them) and stop at the first that\n"
"is not one, or (first_seq > 0) whose seq is not first_seq + its index, or\n"
"(bodies) that is not a plain set/delete or an uncompressed group of them\n"
"whose body parses as logstate._scan.replay_frame parses it, names valid\n"
"UTF-8, no value tagged with an expiry time. The Python path decides about\n"
"the record it stopped at. Returns where it stopped, how many records\n"
"passed, their highest seq (0: none).");

/* utf8_valid(data) -> bool: the check of a key into a KeyMap (for the test
   that compares it with bytes.decode) */
static PyObject *
utf8_valid_py(PyObject *self, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    int valid = utf8_valid(view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    return PyBool_FromLong(valid);
}

static PyMethodDef scan_methods[] = {
    {"replay_records", replay_records, METH_VARARGS, replay_records_doc},
    {"check_frames", check_frames, METH_VARARGS, check_frames_doc},
    {"utf8_valid", utf8_valid_py, METH_O,
     "utf8_valid(data) -> bool: data is what bytes.decode('utf-8') accepts"},
    {NULL, NULL, 0, NULL},
};

int
ls_scan_init(PyObject *module)
{
    if (PyModule_AddFunctions(module, scan_methods) < 0) {
        return -1;
    }
    /* the constants copied from _format/_location, for the test that compares them */
    static const struct {
        const char *name;
        long value;
    } constants[] = {
        {"FRAME_HEADER_SIZE", FRAME_HEADER_SIZE}, {"RECORD_OVERHEAD", RECORD_OVERHEAD},
        {"MIN_PAYLOAD_SIZE", MIN_PAYLOAD_SIZE},   {"MAX_RECORD_SIZE", (long)MAX_RECORD_SIZE},
        {"MAX_RECORD_TYPE", MAX_RECORD_TYPE},     {"REC_SET", REC_SET},
        {"REC_DELETE", REC_DELETE},               {"REC_GROUP", REC_GROUP},
        {"GROUP_HEADER_SIZE", GROUP_HEADER_SIZE}, {"GROUP_OP_SIZE", GROUP_OP_SIZE},
        {"TAG_EXPIRES", TAG_EXPIRES},             {"SEGMENT_SHIFT", SEGMENT_SHIFT},
        {"OFFSET_SHIFT", OFFSET_SHIFT},           {"SIZE_SHIFT", SIZE_SHIFT},
        {"KIND_RECORD", KIND_RECORD},             {"KIND_GROUP_OP", KIND_GROUP_OP},
    };
    PyObject *layout = PyDict_New();
    if (layout == NULL) {
        return -1;
    }
    for (size_t i = 0; i < sizeof(constants) / sizeof(constants[0]); i++) {
        PyObject *value = PyLong_FromLong(constants[i].value);
        if (value == NULL || PyDict_SetItemString(layout, constants[i].name, value) < 0) {
            Py_XDECREF(value);
            Py_DECREF(layout);
            return -1;
        }
        Py_DECREF(value);
    }
    if (PyModule_AddObject(module, "SCAN_LAYOUT", layout) < 0) {
        Py_DECREF(layout);
        return -1;
    }
    return 0;
}
