/* logstate._cnative: keymap, the compact index (KeyMap).
 *
 * A mutable mapping str -> location that takes far less memory than a dict
 * of Python objects, and that an index snapshot stores as raw bytes.
 *
 * Layout (every field little-endian, so the arena is portable as it is):
 *   arena:  records, each at a multiple of 4 bytes, in insertion order:
 *             hdr:u32 (key length in UTF-8 bytes; bit 31: deleted)
 *             lo:u64 hi:u64 (the location, a 128-bit int, low half first)
 *             key bytes, then zero padding to a multiple of 4
 *   table:  open addressing, linear probing, u32 slots holding a record's
 *           offset / 4 (EMPTY, TOMB: free, deleted); hash ks_hash over the
 *           key's UTF-8 bytes, deterministic (no per-process seed).
 *   side:   a location that is not an int of up to 128 bits whose kind
 *           (its low 2 bits) is 0..2 (a compressed group's tuple, anything
 *           else) is a PyObject* in the side table; the record's location
 *           then is kind 3 with the side index in bits 2..63 and hi = 0.
 * Iteration is insertion order (as dict); an overwrite keeps the position.
 * A delete marks the record and leaves a tombstone; the arena is compacted
 * when more than half of it is deleted records. Any insert or delete bumps
 * ``mutations``: an iterator that sees it changed raises RuntimeError.
 */
#include "native.h"

#include <string.h>
#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#endif

#define KM_EMPTY 0xFFFFFFFFu
#define KM_TOMB 0xFFFFFFFEu
#define KM_DELETED 0x80000000u
#define KM_REC_HEAD 20 /* hdr + lo + hi */
#define KM_MAX_KEY 0x7FFFFFFFu
#define KM_MAX_ARENA ((size_t)0xFFFFFFF0u * 4u) /* offsets / 4 stay below KM_TOMB */
#define KM_MIN_TABLE 8
#define KM_NO_SLOT ((size_t)-1) /* km_put: find the free slot itself */
#define KM_MAX_SET_KEY 0xFFFFFFu /* the longest key a set stores, in UTF-8 bytes */

typedef struct {
    PyObject_HEAD
    unsigned char *arena;
    size_t arena_used;
    size_t arena_cap;
    size_t garbage; /* bytes of deleted records in the arena */
    uint32_t *table;
    size_t table_cap; /* a power of 2 */
    size_t table_fill; /* live + tombstones */
    Py_ssize_t count;
    PyObject **side; /* NULL: a free slot */
    size_t side_used; /* slots handed out (high-water mark) */
    size_t side_cap;
    size_t *side_free; /* stack of free slots below side_used */
    size_t side_nfree;
    uint64_t mutations; /* bumped by every insert, delete, and table or arena change */
    /* the last key looked up (a strong reference), while ``mutations`` is
     * unchanged: its hash and table slot (-1: absent). The write path does a
     * get, then a set, of the same key object: the set skips the search. */
    PyObject *last_key;
    uint64_t last_hash;
    Py_ssize_t last_slot;
    uint64_t last_mutations;
} KeyMapObject;

typedef struct {
    PyObject_HEAD
    KeyMapObject *map;
    size_t pos;
    uint64_t mutations;
    Py_ssize_t left;
    int mode;
} KeyMapIterObject;

typedef struct {
    PyObject_HEAD
    KeyMapObject *map;
    int mode;
} KeyMapViewObject;

enum { KM_KEYS = 0, KM_VALUES = 1, KM_ITEMS = 2 };

static PyTypeObject KeyMapType;
static PyTypeObject KeyMapIterType;
static PyTypeObject KeyMapViewType;
static PyObject *km_sixty_four; /* the int 64 */

/* ------------------------------------------------------------------ bytes */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define KM_LE32(v) __builtin_bswap32(v)
#define KM_LE64(v) __builtin_bswap64(v)
#else
#define KM_LE32(v) (v)
#define KM_LE64(v) (v)
#endif

static inline uint32_t
ld32(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return KM_LE32(v);
}

static inline uint64_t
ld64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return KM_LE64(v);
}

static inline void
st32(unsigned char *p, uint32_t v)
{
    v = KM_LE32(v);
    memcpy(p, &v, 4);
}

static inline void
st64(unsigned char *p, uint64_t v)
{
    v = KM_LE64(v);
    memcpy(p, &v, 8);
}

static inline size_t
rec_size(size_t key_len)
{
    return (KM_REC_HEAD + key_len + 3) & ~(size_t)3;
}

/* The hash of a key's UTF-8 bytes: fixed constants, the same on every
 * platform and in every process (a snapshot may rely on it). */
static uint64_t
ks_hash(const unsigned char *p, size_t n)
{
    const uint64_t m = 0x9E3779B97F4A7C15ull;
    const size_t total = n;
    uint64_t h = 0x243F6A8885A308D3ull ^ (n * m);
    while (n >= 8) {
        uint64_t k = ld64(p) * 0xBF58476D1CE4E5B9ull;
        k ^= k >> 31;
        h = (h ^ k) * m;
        h ^= h >> 29;
        p += 8;
        n -= 8;
    }
    uint64_t k = 0;
    if (n > 0 && total >= 8) { /* the last n bytes, in one load inside the key */
        k = ld64(p - 8 + n) >> (8 * (8 - n));
    }
    else {
        for (size_t i = 0; i < n; i++) {
            k |= (uint64_t)p[i] << (8 * i);
        }
    }
    h = (h ^ (k * 0x94D049BB133111EBull)) * m;
    h ^= h >> 32;
    h *= 0xD6E8FEB86659FD93ull;
    h ^= h >> 32;
    return h;
}

/* ------------------------------------------------------------------ table */
/* The slot holding key, or -1 with *insert set to where it would go. */
static Py_ssize_t
km_find(KeyMapObject *km, const unsigned char *key, size_t len, uint64_t h, size_t *insert)
{
    size_t mask = km->table_cap - 1;
    size_t i = (size_t)h & mask;
    size_t tomb = (size_t)-1;
    for (;;) {
        uint32_t s = km->table[i];
        if (s == KM_EMPTY) {
            if (insert != NULL) {
                *insert = tomb != (size_t)-1 ? tomb : i;
            }
            return -1;
        }
        if (s == KM_TOMB) {
            if (tomb == (size_t)-1) {
                tomb = i;
            }
        }
        else {
            const unsigned char *rec = km->arena + (size_t)s * 4;
            /* (keys of one length often share a prefix: their last 8 bytes first) */
            if (ld32(rec) == len
                && (len < 8 || ld64(rec + KM_REC_HEAD + len - 8) == ld64(key + len - 8))
                && memcmp(rec + KM_REC_HEAD, key, len) == 0) {
                return (Py_ssize_t)i;
            }
        }
        i = (i + 1) & mask;
    }
}

/* A table of at least KM_MIN_TABLE slots, all EMPTY, with room for
 * ``need`` keys at a load of at most 3/4. */
static uint32_t *
km_alloc_table(size_t need, size_t *cap_out)
{
    size_t cap = KM_MIN_TABLE;
    while (cap * 3 < need * 4 + 4) {
        cap <<= 1;
    }
    uint32_t *table = PyMem_Malloc(cap * sizeof(uint32_t));
    if (table == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    memset(table, 0xFF, cap * sizeof(uint32_t));
    *cap_out = cap;
    return table;
}

/* Install ``table`` (from km_alloc_table), filled from the arena's live
 * records. ``dups``: set when two records hold the same key (only a loaded
 * snapshot can have that). Cannot fail. */
static void
km_fill_table(KeyMapObject *km, uint32_t *table, size_t cap, int *dups)
{
    size_t mask = cap - 1;
    size_t fill = 0;
    for (size_t off = 0; off < km->arena_used;) {
        const unsigned char *rec = km->arena + off;
        uint32_t hdr = ld32(rec);
        size_t len = hdr & KM_MAX_KEY;
        if (!(hdr & KM_DELETED)) {
            const unsigned char *key = rec + KM_REC_HEAD;
            size_t i = (size_t)ks_hash(key, len) & mask;
            while (table[i] != KM_EMPTY) {
                if (dups != NULL) {
                    const unsigned char *other = km->arena + (size_t)table[i] * 4;
                    if (ld32(other) == len && memcmp(other + KM_REC_HEAD, key, len) == 0) {
                        *dups = 1;
                    }
                }
                i = (i + 1) & mask;
            }
            table[i] = (uint32_t)(off / 4);
            fill++;
        }
        off += rec_size(len);
    }
    PyMem_Free(km->table);
    km->table = table;
    km->table_cap = cap;
    km->table_fill = fill;
    km->mutations++;
}

/* Scratch memory of a table build, mapped and unmapped whole where the
 * system has mmap: a malloc'd block this large, once freed, would stay in
 * the process's heap (glibc raises its mmap threshold after freeing the
 * snapshot's buffers), and the resident size after an open would count it. */
static void *
km_scratch_alloc(size_t size)
{
#if defined(MAP_ANONYMOUS)
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
#else
    return PyMem_RawMalloc(size);
#endif
}

static void
km_scratch_free(void *p, size_t size)
{
    if (p == NULL) {
        return;
    }
#if defined(MAP_ANONYMOUS)
    munmap(p, size);
#else
    PyMem_RawFree(p);
#endif
}

typedef struct {
    uint32_t home; /* the slot the key hashes to */
    uint32_t tag;  /* the hash's high half: two keys of one tag are compared */
    uint32_t off4; /* the record's offset / 4 */
} km_entry;

#define KM_BUCKET_BITS 12

/* km_fill_table for a large map, in cache-sized steps: the records' slots
 * are computed in one pass over the arena, grouped by the region of the
 * table they fall in (a counting sort on their top bits), and inserted
 * region by region, so that the inserts (and the duplicate checks, on the
 * tags) touch a few KiB at a time instead of the whole table at random.
 * The table is a valid linear-probing table whatever the insertion order.
 * Returns -1 (no error set, table untouched) when its scratch memory
 * cannot be had: the caller then uses km_fill_table. */
static int
km_fill_table_bucketed(KeyMapObject *km, uint32_t *table, size_t cap, int *dups)
{
    size_t n = (size_t)km->count;
    size_t mask = cap - 1;
    unsigned shift = 0;
    while (((size_t)1 << (shift + KM_BUCKET_BITS)) < cap) {
        shift++;
    }
    size_t buckets = (size_t)1 << KM_BUCKET_BITS;
    size_t entries_size = 2 * n * sizeof(km_entry) + 1;
    size_t tags_size = cap * sizeof(uint32_t);
    km_entry *entries = km_scratch_alloc(entries_size);
    size_t *starts = PyMem_RawCalloc(buckets + 1, sizeof(size_t));
    uint32_t *tags = dups != NULL ? km_scratch_alloc(tags_size) : NULL;
    if (entries == NULL || starts == NULL || (dups != NULL && tags == NULL)) {
        km_scratch_free(entries, entries_size);
        PyMem_RawFree(starts);
        km_scratch_free(tags, tags_size);
        return -1;
    }
    km_entry *sorted = entries + n;
    size_t k = 0;
    for (size_t off = 0; off < km->arena_used && k < n;) {
        const unsigned char *rec = km->arena + off;
        uint32_t hdr = ld32(rec);
        size_t len = hdr & KM_MAX_KEY;
        if (!(hdr & KM_DELETED)) {
            uint64_t h = ks_hash(rec + KM_REC_HEAD, len);
            entries[k].home = (uint32_t)(h & mask);
            entries[k].tag = (uint32_t)(h >> 32);
            entries[k].off4 = (uint32_t)(off / 4);
            starts[(entries[k].home >> shift) + 1]++;
            k++;
        }
        off += rec_size(len);
    }
    n = k;
    for (size_t b = 0; b < buckets; b++) {
        starts[b + 1] += starts[b];
    }
    for (size_t i = 0; i < n; i++) {
        sorted[starts[entries[i].home >> shift]++] = entries[i];
    }
    for (size_t i = 0; i < n; i++) {
        const km_entry *e = &sorted[i];
        size_t j = e->home;
        while (table[j] != KM_EMPTY) {
            if (tags != NULL && tags[j] == e->tag) {
                const unsigned char *a = km->arena + (size_t)table[j] * 4;
                const unsigned char *b = km->arena + (size_t)e->off4 * 4;
                uint32_t len = ld32(a);
                if (len == ld32(b) && memcmp(a + KM_REC_HEAD, b + KM_REC_HEAD, len) == 0) {
                    *dups = 1;
                }
            }
            j = (j + 1) & mask;
        }
        table[j] = e->off4;
        if (tags != NULL) {
            tags[j] = e->tag;
        }
    }
    km_scratch_free(entries, entries_size);
    PyMem_RawFree(starts);
    km_scratch_free(tags, tags_size);
    PyMem_Free(km->table);
    km->table = table;
    km->table_cap = cap;
    km->table_fill = n;
    km->mutations++;
    return 0;
}

/* Rebuild the table with room for ``need`` keys (unchanged on failure). */
static int
km_rebuild(KeyMapObject *km, size_t need, int *dups)
{
    size_t cap;
    uint32_t *table = km_alloc_table(need, &cap);
    if (table == NULL) {
        return -1;
    }
    if (km->count < 65536 || km_fill_table_bucketed(km, table, cap, dups) < 0) {
        km_fill_table(km, table, cap, dups);
    }
    return 0;
}

/* Move the live records down over the deleted ones; rebuild the table
 * (allocated first: on failure nothing changed). */
static int
km_compact(KeyMapObject *km)
{
    size_t cap;
    uint32_t *table = km_alloc_table((size_t)km->count, &cap);
    if (table == NULL) {
        return -1;
    }
    size_t to = 0;
    for (size_t off = 0; off < km->arena_used;) {
        unsigned char *rec = km->arena + off;
        uint32_t hdr = ld32(rec);
        size_t size = rec_size(hdr & KM_MAX_KEY);
        if (!(hdr & KM_DELETED)) {
            if (to != off) {
                memmove(km->arena + to, rec, size);
            }
            to += size;
        }
        off += size;
    }
    km->arena_used = to;
    km->garbage = 0;
    km->mutations++;
    if (km->count < 65536 || km_fill_table_bucketed(km, table, cap, NULL) < 0) {
        km_fill_table(km, table, cap, NULL);
    }
    return 0;
}

static int
km_reserve_arena(KeyMapObject *km, size_t more)
{
    if (km->arena_used + more <= km->arena_cap) {
        return 0;
    }
    if (km->arena_used + more > KM_MAX_ARENA) {
        PyErr_SetString(PyExc_OverflowError, "KeyMap arena full (16 GiB)");
        return -1;
    }
    /* (a large block grows in place or by mremap: a small step costs no copy) */
    size_t cap = km->arena_cap < 256 ? 256 : km->arena_cap + km->arena_cap / 4;
    if (cap < km->arena_used + more) {
        cap = km->arena_used + more;
    }
    if (cap > KM_MAX_ARENA) {
        cap = KM_MAX_ARENA;
    }
    unsigned char *arena = PyMem_Realloc(km->arena, cap);
    if (arena == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    km->arena = arena;
    km->arena_cap = cap;
    return 0;
}

/* ------------------------------------------------------------------ locations */
static int
side_put(KeyMapObject *km, PyObject *value, uint64_t *lo)
{
    size_t i;
    if (km->side_nfree > 0) {
        i = km->side_free[--km->side_nfree];
    }
    else {
        if (km->side_used == km->side_cap) {
            size_t cap = km->side_cap < 16 ? 16 : km->side_cap * 2;
            PyObject **side = PyMem_Realloc(km->side, cap * sizeof(PyObject *));
            if (side == NULL) {
                PyErr_NoMemory();
                return -1;
            }
            km->side = side;
            size_t *free_ = PyMem_Realloc(km->side_free, cap * sizeof(size_t));
            if (free_ == NULL) {
                PyErr_NoMemory();
                return -1;
            }
            km->side_free = free_;
            km->side_cap = cap;
        }
        i = km->side_used++;
    }
    Py_INCREF(value);
    km->side[i] = value;
    *lo = (uint64_t)i << 2 | 3;
    return 0;
}

/* Take the side slot of a kind-3 location; returns its (owned) object. */
static PyObject *
side_take(KeyMapObject *km, uint64_t lo)
{
    size_t i = (size_t)(lo >> 2);
    PyObject *obj = km->side[i];
    km->side[i] = NULL;
    km->side_free[km->side_nfree++] = i;
    return obj;
}

#if PY_VERSION_HEX < 0x030D0000 /* (3.13 has PyLong_AsNativeBytes and its inverse) */
/* The high half of an int whose low 64 bits are ``low``, from its value
 * as a double, without an allocation: exact when the int is below 2**112
 * (the double's rounding error, and that of the subtraction, are then at
 * most 2**58 each: far below 2**63, half the distance between two
 * candidates ``hi * 2**64 + low``). 0: not in that range. */
static int
high_from_double(double d, uint64_t low, uint64_t *hi)
{
    if (!(d >= 0.0 && d < 0x1p112)) {
        return 0;
    }
    double h = (d - (double)low) * 0x1p-64;
    h = h < 0.0 ? 0.0 : h + 0.5;
    *hi = (uint64_t)h;
    return 1;
}

/* Pack ``value`` into (lo, hi): an exact int in [0, 2**128) of kind 0..2,
 * else into the side table. */
#endif

static int
loc_pack(KeyMapObject *km, PyObject *value, uint64_t *lo, uint64_t *hi)
{
#if PY_VERSION_HEX >= 0x030D0000
    if (PyLong_CheckExact(value)) {
        unsigned char buf[16];
        Py_ssize_t need = PyLong_AsNativeBytes(
            value, buf, 16,
            Py_ASNATIVEBYTES_LITTLE_ENDIAN | Py_ASNATIVEBYTES_UNSIGNED_BUFFER
                | Py_ASNATIVEBYTES_REJECT_NEGATIVE);
        if (need < 0) {
            if (!PyErr_ExceptionMatches(PyExc_ValueError)) {
                return -1;
            }
            PyErr_Clear(); /* negative: the side table */
        }
        else if (need <= 16 && (buf[0] & 3) != 3) {
            *lo = ld64(buf);
            *hi = ld64(buf + 8);
            return 0;
        }
    }
#else
    if (PyLong_CheckExact(value)) {
        uint64_t low = PyLong_AsUnsignedLongLongMask(value);
        if (low == (uint64_t)-1 && PyErr_Occurred()) {
            return -1;
        }
        if ((low & 3) != 3) {
            double d = PyLong_AsDouble(value); /* (OverflowError past 2**1024) */
            if (d == -1.0 && PyErr_Occurred()) {
                if (!PyErr_ExceptionMatches(PyExc_OverflowError)) {
                    return -1;
                }
                PyErr_Clear();
            }
            else if (high_from_double(d, low, hi)) {
                *lo = low;
                return 0;
            }
            PyObject *high = PyNumber_Rshift(value, km_sixty_four);
            if (high == NULL) {
                return -1;
            }
            uint64_t h = PyLong_AsUnsignedLongLong(high);
            Py_DECREF(high);
            if (!(h == (uint64_t)-1 && PyErr_Occurred())) {
                *lo = low;
                *hi = h;
                return 0;
            }
            if (!PyErr_ExceptionMatches(PyExc_OverflowError)) {
                return -1;
            }
            PyErr_Clear(); /* negative or past 128 bits: the side table */
        }
    }
#endif
    *hi = 0;
    return side_put(km, value, lo);
}

#if PY_VERSION_HEX < 0x030D0000
/* ``hi << 64`` as ints, the last few made (every location of one segment
 * shares its high half while offsets stay below 1 GiB). Strong references,
 * kept for the module's life. */
#define KM_HI_CACHE 64
static PyObject *km_hi_objects[KM_HI_CACHE];
static uint64_t km_hi_keys[KM_HI_CACHE];

static PyObject *
high_object(uint64_t hi)
{
    size_t i = (size_t)(hi ^ (hi >> 10)) % KM_HI_CACHE;
    if (km_hi_objects[i] != NULL && km_hi_keys[i] == hi) {
        Py_INCREF(km_hi_objects[i]);
        return km_hi_objects[i];
    }
    PyObject *h = PyLong_FromUnsignedLongLong(hi);
    if (h == NULL) {
        return NULL;
    }
    PyObject *shifted = PyNumber_Lshift(h, km_sixty_four);
    Py_DECREF(h);
    if (shifted == NULL) {
        return NULL;
    }
    PyObject *old = km_hi_objects[i];
    km_hi_objects[i] = shifted;
    km_hi_keys[i] = hi;
    Py_XDECREF(old);
    Py_INCREF(shifted);
    return shifted;
}

#endif

static PyObject *
loc_object(KeyMapObject *km, uint64_t lo, uint64_t hi)
{
    if ((lo & 3) == 3) {
        PyObject *obj = km->side[lo >> 2];
        Py_INCREF(obj);
        return obj;
    }
    if (hi == 0) {
        return PyLong_FromUnsignedLongLong(lo);
    }
#if PY_VERSION_HEX >= 0x030D0000
    unsigned char buf[16];
    st64(buf, lo);
    st64(buf + 8, hi);
    return PyLong_FromUnsignedNativeBytes(buf, 16, Py_ASNATIVEBYTES_LITTLE_ENDIAN);
#else
    PyObject *shifted = high_object(hi);
    if (shifted == NULL) {
        return NULL;
    }
    PyObject *l = PyLong_FromUnsignedLongLong(lo);
    if (l == NULL) {
        Py_DECREF(shifted);
        return NULL;
    }
    PyObject *result = PyNumber_Or(shifted, l);
    Py_DECREF(shifted);
    Py_DECREF(l);
    return result;
#endif
}

static PyObject *
rec_value(KeyMapObject *km, const unsigned char *rec)
{
    return loc_object(km, ld64(rec + 4), ld64(rec + 12));
}

static PyObject *
rec_key(const unsigned char *rec)
{
    return PyUnicode_DecodeUTF8((const char *)rec + KM_REC_HEAD, ld32(rec) & KM_MAX_KEY, NULL);
}

/* ------------------------------------------------------------------ keys */
/* The UTF-8 bytes of ``key``: 1; not a str or not encodable: 0 (no error
 * set: such a key is never in a KeyMap); -1 on another error. */
static int
key_bytes(PyObject *key, const unsigned char **p, size_t *n)
{
    if (!PyUnicode_Check(key)) {
        return 0;
    }
    Py_ssize_t size;
    const char *s = PyUnicode_AsUTF8AndSize(key, &size);
    if (s == NULL) {
        if (PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) {
            PyErr_Clear();
            return 0;
        }
        return -1;
    }
    *p = (const unsigned char *)s;
    *n = (size_t)size;
    return 1;
}

static void
remember(KeyMapObject *km, PyObject *key, uint64_t h, Py_ssize_t slot)
{
    PyObject *old = km->last_key;
    Py_INCREF(key);
    km->last_key = key;
    km->last_hash = h;
    km->last_slot = slot;
    km->last_mutations = km->mutations;
    Py_XDECREF(old); /* (an exact str, as km_lookup remembers: its release runs no code) */
}

/* The record of ``key``, or NULL (and no error when absent). */
static unsigned char *
km_lookup(KeyMapObject *km, PyObject *key, Py_ssize_t *slot)
{
    Py_ssize_t i;
    if (key == km->last_key && km->mutations == km->last_mutations) {
        i = km->last_slot;
    }
    else {
        const unsigned char *p;
        size_t n;
        int ok = key_bytes(key, &p, &n);
        if (ok <= 0 || km->count == 0) {
            return NULL;
        }
        uint64_t h = ks_hash(p, n);
        i = km_find(km, p, n, h, NULL);
        if (PyUnicode_CheckExact(key)) {
            /* only an exact str: releasing the one remembered before runs no
             * code (a subclass's release could run __del__ and change the
             * map under the slot just found) */
            remember(km, key, h, i);
        }
    }
    if (i < 0) {
        return NULL;
    }
    if (slot != NULL) {
        *slot = i;
    }
    return km->arena + (size_t)km->table[i] * 4;
}

/* ------------------------------------------------------------------ mutation */
static int km_put(KeyMapObject *km, const unsigned char *p, size_t n, uint64_t h, Py_ssize_t i,
                  size_t insert, uint64_t lo, uint64_t hi);

static int
km_set(KeyMapObject *km, PyObject *key, PyObject *value)
{
    const unsigned char *p;
    size_t n;
    int ok = key_bytes(key, &p, &n);
    if (ok < 0) {
        return -1;
    }
    if (ok == 0) {
        if (!PyUnicode_Check(key)) {
            PyErr_Format(PyExc_TypeError, "KeyMap keys must be str, not %.100s",
                         Py_TYPE(key)->tp_name);
            return -1;
        }
        PyErr_SetString(PyExc_ValueError, "KeyMap keys must be encodable as UTF-8");
        return -1;
    }
    if (n > KM_MAX_SET_KEY) {
        PyErr_SetString(PyExc_ValueError, "KeyMap key too long");
        return -1;
    }
    uint64_t h;
    Py_ssize_t i;
    size_t insert = KM_NO_SLOT;
    if (key == km->last_key && km->mutations == km->last_mutations) {
        h = km->last_hash; /* (found by the get before this set) */
        i = km->last_slot;
    }
    else {
        h = ks_hash(p, n);
        i = km->count ? km_find(km, p, n, h, &insert) : -1;
    }
    uint64_t lo, hi;
    if (loc_pack(km, value, &lo, &hi) < 0) {
        return -1;
    }
    if (km_put(km, p, n, h, i, insert, lo, hi) < 0) {
        if ((lo & 3) == 3) {
            Py_DECREF(side_take(km, lo));
        }
        return -1;
    }
    return 0;
}

/* Store (lo, hi) for the n bytes of a key at p (hash h), found in table
 * slot i (-1: absent; then insert is the free slot km_find gave, or
 * KM_NO_SLOT): the one place a record is written or overwritten (km_set
 * and ls_keymap_set). -1 (nothing changed) on error. */
static int
km_put(KeyMapObject *km, const unsigned char *p, size_t n, uint64_t h, Py_ssize_t i,
       size_t insert, uint64_t lo, uint64_t hi)
{
    if (i >= 0) { /* overwrite in place: the position stays */
        unsigned char *rec = km->arena + (size_t)km->table[i] * 4;
        uint64_t old = ld64(rec + 4);
        st64(rec + 4, lo);
        st64(rec + 12, hi);
        if ((old & 3) == 3) {
            Py_DECREF(side_take(km, old));
        }
        return 0;
    }
    size_t size = rec_size(n);
    if ((km->table_fill + 1) * 4 > km->table_cap * 3) {
        if (km_rebuild(km, (size_t)km->count + 1 + (size_t)km->count / 2, NULL) < 0) {
            return -1;
        }
        insert = KM_NO_SLOT; /* (a new table) */
    }
    if (km_reserve_arena(km, size) < 0) {
        return -1;
    }
    size_t slot = insert;
    if (slot == KM_NO_SLOT) {
        km_find(km, p, n, h, &slot);
    }
    unsigned char *rec = km->arena + km->arena_used;
    st32(rec, (uint32_t)n);
    st64(rec + 4, lo);
    st64(rec + 12, hi);
    memcpy(rec + KM_REC_HEAD, p, n);
    memset(rec + KM_REC_HEAD + n, 0, size - KM_REC_HEAD - n);
    if (km->table[slot] == KM_EMPTY) {
        km->table_fill++;
    }
    km->table[slot] = (uint32_t)(km->arena_used / 4);
    km->arena_used += size;
    km->count++;
    km->mutations++;
    return 0;
}

/* Delete the record in table slot ``slot``; its value is returned (owned)
 * when ``want``, else released. */
static int
km_del_slot(KeyMapObject *km, Py_ssize_t slot, PyObject **want)
{
    unsigned char *rec = km->arena + (size_t)km->table[slot] * 4;
    uint32_t hdr = ld32(rec);
    uint64_t lo = ld64(rec + 4), hi = ld64(rec + 12);
    PyObject *value = NULL;
    if (want != NULL) {
        value = loc_object(km, lo, hi);
        if (value == NULL) {
            return -1;
        }
    }
    PyObject *old = (lo & 3) == 3 ? side_take(km, lo) : NULL;
    st32(rec, hdr | KM_DELETED);
    km->table[slot] = KM_TOMB;
    km->garbage += rec_size(hdr & KM_MAX_KEY);
    km->count--;
    km->mutations++;
    int rc = 0;
    if (km->count == 0) {
        km->arena_used = 0;
        km->garbage = 0;
        memset(km->table, 0xFF, km->table_cap * sizeof(uint32_t));
        km->table_fill = 0;
    }
    else if (km->garbage > 4096 && km->garbage * 2 > km->arena_used) {
        rc = km_compact(km); /* (on failure the table is still valid) */
        if (rc < 0) {
            PyErr_Clear();
            rc = 0;
        }
    }
    Py_XDECREF(old);
    if (want != NULL) {
        *want = value;
    }
    return rc;
}

/* ------------------------------------------------------------------ C API
 * For the other C parts (declared in native.h, keymap block): find, set and
 * delete by a key's raw UTF-8 bytes (the caller has checked they are valid
 * UTF-8) and a location as (lo, hi), making no Python object. The rules are
 * km_find's, km_put's and km_del_slot's, shared with the mapping methods. */
static int km_init_empty(KeyMapObject *km);

int
ls_keymap_check_exact(PyObject *obj)
{
    return Py_IS_TYPE(obj, &KeyMapType);
}

uint64_t
ls_keymap_hash(const unsigned char *key, size_t len)
{
    return ks_hash(key, len);
}

/* The table slot of the key (-1: absent, *insert where it would go, or
 * KM_NO_SLOT); *rec its record. */
static Py_ssize_t
km_raw_slot(KeyMapObject *km, const unsigned char *key, size_t len, uint64_t h,
            const unsigned char **rec, size_t *insert)
{
    *insert = KM_NO_SLOT;
    if (km->count == 0) {
        return -1;
    }
    Py_ssize_t i = km_find(km, key, len, h, insert);
    if (i >= 0) {
        *rec = km->arena + (size_t)km->table[i] * 4;
    }
    return i;
}

#if defined(__GNUC__) || defined(__clang__)
#define KM_PREFETCH(p) __builtin_prefetch(p)
#else
#define KM_PREFETCH(p) ((void)(p))
#endif

void
ls_keymap_prefetch_slot(PyObject *map, uint64_t h)
{
    KeyMapObject *km = (KeyMapObject *)map;
    if (km->table != NULL) {
        KM_PREFETCH(&km->table[(size_t)h & (km->table_cap - 1)]);
    }
}

void
ls_keymap_prefetch_keys(PyObject *map, uint64_t h)
{
    KeyMapObject *km = (KeyMapObject *)map;
    if (km->table == NULL) {
        return;
    }
    size_t mask = km->table_cap - 1;
    for (size_t k = 0; k < 4; k++) {
        uint32_t s = km->table[((size_t)h + k) & mask];
        if (s == KM_EMPTY) {
            return;
        }
        if (s != KM_TOMB) {
            KM_PREFETCH(km->arena + (size_t)s * 4);
        }
    }
}

int
ls_keymap_find(PyObject *map, const unsigned char *key, size_t len, uint64_t h, uint64_t loc[2])
{
    const unsigned char *rec = NULL;
    size_t insert;
    if (km_raw_slot((KeyMapObject *)map, key, len, h, &rec, &insert) < 0) {
        return LS_KM_ABSENT;
    }
    loc[0] = ld64(rec + 4);
    loc[1] = ld64(rec + 12);
    return (loc[0] & 3) == 3 ? LS_KM_SIDE : LS_KM_INT;
}

int
ls_keymap_set(PyObject *map, const unsigned char *key, size_t len, uint64_t h, uint64_t lo,
              uint64_t hi, uint64_t old[2])
{
    KeyMapObject *km = (KeyMapObject *)map;
    if ((lo & 3) == 3 || len > KM_MAX_SET_KEY) {
        PyErr_SetString(PyExc_ValueError, "ls_keymap_set: a kind-3 location or a key too long");
        return -1;
    }
    if (km->table == NULL && km_init_empty(km) < 0) {
        return -1;
    }
    const unsigned char *rec = NULL;
    size_t insert;
    Py_ssize_t i = km_raw_slot(km, key, len, h, &rec, &insert);
    if (i >= 0) {
        old[0] = ld64(rec + 4);
        old[1] = ld64(rec + 12);
        if ((old[0] & 3) == 3) {
            return LS_KM_SIDE; /* unchanged: the caller takes the Python path */
        }
    }
    if (km_put(km, key, len, h, i, insert, lo, hi) < 0) {
        return -1;
    }
    return i >= 0 ? LS_KM_INT : LS_KM_ABSENT;
}

int
ls_keymap_reserve(PyObject *map, size_t len)
{
    /* what km_put may allocate for one new key, allocated now: its table
     * rebuild (the same rule) and its arena room */
    KeyMapObject *km = (KeyMapObject *)map;
    if (len > KM_MAX_SET_KEY) {
        PyErr_SetString(PyExc_ValueError, "ls_keymap_reserve: a key too long");
        return -1;
    }
    if (km->table == NULL && km_init_empty(km) < 0) {
        return -1;
    }
    if ((km->table_fill + 1) * 4 > km->table_cap * 3
        && km_rebuild(km, (size_t)km->count + 1 + (size_t)km->count / 2, NULL) < 0) {
        return -1;
    }
    return km_reserve_arena(km, rec_size(len));
}

int
ls_keymap_delete(PyObject *map, const unsigned char *key, size_t len, uint64_t h, uint64_t old[2])
{
    KeyMapObject *km = (KeyMapObject *)map;
    const unsigned char *rec = NULL;
    size_t insert;
    Py_ssize_t i = km_raw_slot(km, key, len, h, &rec, &insert);
    if (i < 0) {
        return LS_KM_ABSENT;
    }
    old[0] = ld64(rec + 4);
    old[1] = ld64(rec + 12);
    if ((old[0] & 3) == 3) {
        return LS_KM_SIDE; /* unchanged: the caller takes the Python path */
    }
    if (km_del_slot(km, i, NULL) < 0) {
        return -1;
    }
    return LS_KM_INT;
}

static void
km_release(KeyMapObject *km)
{
    Py_CLEAR(km->last_key);
    PyObject **side = km->side;
    size_t used = km->side_used;
    km->side = NULL;
    km->side_used = km->side_cap = km->side_nfree = 0;
    PyMem_Free(km->side_free);
    km->side_free = NULL;
    PyMem_Free(km->arena);
    km->arena = NULL;
    km->arena_used = km->arena_cap = km->garbage = 0;
    PyMem_Free(km->table);
    km->table = NULL;
    km->table_cap = km->table_fill = 0;
    km->count = 0;
    km->mutations++;
    for (size_t i = 0; i < used; i++) {
        Py_XDECREF(side[i]);
    }
    PyMem_Free(side);
}

static int
km_init_empty(KeyMapObject *km)
{
    km->table = PyMem_Malloc(KM_MIN_TABLE * sizeof(uint32_t));
    if (km->table == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memset(km->table, 0xFF, KM_MIN_TABLE * sizeof(uint32_t));
    km->table_cap = KM_MIN_TABLE;
    return 0;
}

static KeyMapObject *
km_new_empty(void)
{
    KeyMapObject *km = PyObject_GC_New(KeyMapObject, &KeyMapType);
    if (km == NULL) {
        return NULL;
    }
    km->arena = NULL;
    km->arena_used = km->arena_cap = km->garbage = 0;
    km->table = NULL;
    km->table_cap = km->table_fill = 0;
    km->count = 0;
    km->side = NULL;
    km->side_used = km->side_cap = km->side_nfree = 0;
    km->side_free = NULL;
    km->mutations = 0;
    km->last_key = NULL;
    km->last_hash = 0;
    km->last_slot = -1;
    km->last_mutations = 0;
    if (km_init_empty(km) < 0) {
        Py_DECREF(km);
        return NULL;
    }
    PyObject_GC_Track(km);
    return km;
}

static int km_update(KeyMapObject *km, PyObject *other);

/* ------------------------------------------------------------------ type slots */
static PyObject *
km_tp_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *init = NULL;
    if (kwds != NULL && PyDict_GET_SIZE(kwds) > 0) {
        PyErr_SetString(PyExc_TypeError, "KeyMap() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_UnpackTuple(args, "KeyMap", 0, 1, &init)) {
        return NULL;
    }
    if (type != &KeyMapType) {
        PyErr_SetString(PyExc_TypeError, "KeyMap cannot be subclassed");
        return NULL;
    }
    KeyMapObject *km = km_new_empty();
    if (km == NULL) {
        return NULL;
    }
    if (init != NULL && km_update(km, init) < 0) {
        Py_DECREF(km);
        return NULL;
    }
    return (PyObject *)km;
}

static int
km_traverse(KeyMapObject *km, visitproc visit, void *arg)
{
    for (size_t i = 0; i < km->side_used; i++) {
        Py_VISIT(km->side[i]);
    }
    return 0;
}

static int
km_clear(KeyMapObject *km)
{
    km_release(km);
    if (km_init_empty(km) < 0) {
        PyErr_Clear(); /* (an empty map without a table: every method checks count first) */
    }
    return 0;
}

static void
km_dealloc(KeyMapObject *km)
{
    PyObject_GC_UnTrack(km);
    km_release(km);
    Py_TYPE(km)->tp_free((PyObject *)km);
}

static Py_ssize_t
km_length(KeyMapObject *km)
{
    return km->count;
}

static PyObject *
km_subscript(KeyMapObject *km, PyObject *key)
{
    unsigned char *rec = km_lookup(km, key, NULL);
    if (rec == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetObject(PyExc_KeyError, key);
        }
        return NULL;
    }
    return rec_value(km, rec);
}

static int
km_ass_subscript(KeyMapObject *km, PyObject *key, PyObject *value)
{
    if (value != NULL) {
        if (km->table == NULL && km_init_empty(km) < 0) {
            return -1;
        }
        return km_set(km, key, value);
    }
    Py_ssize_t slot;
    unsigned char *rec = km_lookup(km, key, &slot);
    if (rec == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetObject(PyExc_KeyError, key);
        }
        return -1;
    }
    return km_del_slot(km, slot, NULL);
}

static int
km_contains(KeyMapObject *km, PyObject *key)
{
    unsigned char *rec = km_lookup(km, key, NULL);
    if (rec == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    return 1;
}

static PyObject *
km_iter_new(KeyMapObject *km, int mode)
{
    KeyMapIterObject *it = PyObject_GC_New(KeyMapIterObject, &KeyMapIterType);
    if (it == NULL) {
        return NULL;
    }
    Py_INCREF(km);
    it->map = km;
    it->pos = 0;
    it->mutations = km->mutations;
    it->left = km->count;
    it->mode = mode;
    PyObject_GC_Track(it);
    return (PyObject *)it;
}

static PyObject *
km_iter(KeyMapObject *km)
{
    return km_iter_new(km, KM_KEYS);
}

/* ------------------------------------------------------------------ methods */
static PyObject *
km_get(KeyMapObject *km, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get expected 1 or 2 arguments");
        return NULL;
    }
    unsigned char *rec = km_lookup(km, args[0], NULL);
    if (rec == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        PyObject *dflt = nargs == 2 ? args[1] : Py_None;
        Py_INCREF(dflt);
        return dflt;
    }
    return rec_value(km, rec);
}

static PyObject *
km_pop(KeyMapObject *km, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "pop expected 1 or 2 arguments");
        return NULL;
    }
    Py_ssize_t slot;
    unsigned char *rec = km_lookup(km, args[0], &slot);
    if (rec == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        if (nargs == 2) {
            Py_INCREF(args[1]);
            return args[1];
        }
        PyErr_SetObject(PyExc_KeyError, args[0]);
        return NULL;
    }
    PyObject *value;
    if (km_del_slot(km, slot, &value) < 0) {
        return NULL;
    }
    return value;
}

static PyObject *
km_setdefault(KeyMapObject *km, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "setdefault expected 1 or 2 arguments");
        return NULL;
    }
    unsigned char *rec = km_lookup(km, args[0], NULL);
    if (rec != NULL) {
        return rec_value(km, rec);
    }
    if (PyErr_Occurred()) {
        return NULL;
    }
    PyObject *dflt = nargs == 2 ? args[1] : Py_None;
    if (km_ass_subscript(km, args[0], dflt) < 0) {
        return NULL;
    }
    Py_INCREF(dflt);
    return dflt;
}

static KeyMapObject *
km_copy_of(KeyMapObject *km)
{
    KeyMapObject *out = km_new_empty();
    if (out == NULL) {
        return NULL;
    }
    /* the live records in order, side objects renumbered */
    if (km->arena_used > 0) {
        out->arena = PyMem_Malloc(km->arena_used - km->garbage + 4);
        if (out->arena == NULL) {
            Py_DECREF(out);
            PyErr_NoMemory();
            return NULL;
        }
        out->arena_cap = km->arena_used - km->garbage + 4;
    }
    for (size_t off = 0; off < km->arena_used;) {
        const unsigned char *rec = km->arena + off;
        uint32_t hdr = ld32(rec);
        size_t size = rec_size(hdr & KM_MAX_KEY);
        if (!(hdr & KM_DELETED)) {
            unsigned char *to = out->arena + out->arena_used;
            memcpy(to, rec, size);
            uint64_t lo = ld64(rec + 4);
            if ((lo & 3) == 3) {
                if (side_put(out, km->side[lo >> 2], &lo) < 0) {
                    Py_DECREF(out);
                    return NULL;
                }
                st64(to + 4, lo);
            }
            out->arena_used += size;
            out->count++;
        }
        off += size;
    }
    if (km_rebuild(out, (size_t)out->count, NULL) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

static PyObject *
km_copy(KeyMapObject *km, PyObject *unused)
{
    return (PyObject *)km_copy_of(km);
}

static PyObject *
km_clear_method(KeyMapObject *km, PyObject *unused)
{
    km_release(km);
    if (km_init_empty(km) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static int
km_update(KeyMapObject *km, PyObject *other)
{
    if (PyDict_Check(other)) {
        Py_ssize_t pos = 0;
        PyObject *key, *value;
        while (PyDict_Next(other, &pos, &key, &value)) {
            Py_INCREF(key);
            Py_INCREF(value);
            int rc = km_set(km, key, value);
            Py_DECREF(key);
            Py_DECREF(value);
            if (rc < 0) {
                return -1;
            }
        }
        return 0;
    }
    PyObject *items = PyMapping_Items(other);
    if (items == NULL) {
        return -1;
    }
    Py_ssize_t n = PyList_GET_SIZE(items);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(items, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            Py_DECREF(items);
            PyErr_SetString(PyExc_TypeError, "items() must give pairs");
            return -1;
        }
        if (km_set(km, PyTuple_GET_ITEM(item, 0), PyTuple_GET_ITEM(item, 1)) < 0) {
            Py_DECREF(items);
            return -1;
        }
    }
    Py_DECREF(items);
    return 0;
}

static PyObject *
km_update_method(KeyMapObject *km, PyObject *other)
{
    if (km_update(km, other) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
km_view(KeyMapObject *km, int mode)
{
    KeyMapViewObject *v = PyObject_GC_New(KeyMapViewObject, &KeyMapViewType);
    if (v == NULL) {
        return NULL;
    }
    Py_INCREF(km);
    v->map = km;
    v->mode = mode;
    PyObject_GC_Track(v);
    return (PyObject *)v;
}

static PyObject *
km_keys(KeyMapObject *km, PyObject *unused)
{
    return km_view(km, KM_KEYS);
}

static PyObject *
km_values(KeyMapObject *km, PyObject *unused)
{
    return km_view(km, KM_VALUES);
}

static PyObject *
km_items(KeyMapObject *km, PyObject *unused)
{
    return km_view(km, KM_ITEMS);
}

/* The sum of the locations' sizes on disk: (loc >> 2) & 0xFFFFFFFF of an
 * int, item 5 of a tuple. Copies _location.location_size (marked there;
 * tests/test_keymap.py proves them equal). */
static PyObject *
km_total_size(KeyMapObject *km, PyObject *unused)
{
    uint64_t total = 0;
    PyObject *extra = NULL; /* sizes of side objects, summed in Python ints */
    const uint64_t mutations = km->mutations; /* the sums below may run code */
    for (size_t off = 0; off < km->arena_used;) {
        if (km->mutations != mutations) {
            PyErr_SetString(PyExc_RuntimeError, "KeyMap changed during total_size");
            Py_XDECREF(extra);
            return NULL;
        }
        const unsigned char *rec = km->arena + off;
        uint32_t hdr = ld32(rec);
        off += rec_size(hdr & KM_MAX_KEY);
        if (hdr & KM_DELETED) {
            continue;
        }
        uint64_t lo = ld64(rec + 4);
        if ((lo & 3) != 3) {
            total += (lo >> 2) & 0xFFFFFFFFu;
            continue;
        }
        PyObject *obj = km->side[lo >> 2];
        PyObject *share;
        if (PyTuple_Check(obj)) {
            if (PyTuple_GET_SIZE(obj) < 6) {
                PyErr_SetString(PyExc_TypeError, "KeyMap holds a tuple location of under 6 items");
                Py_XDECREF(extra);
                return NULL;
            }
            share = PyTuple_GET_ITEM(obj, 5);
            Py_INCREF(share);
        }
        else if (PyLong_Check(obj)) { /* an int outside the packed range: the same rule */
            PyObject *two = PyLong_FromLong(2);
            PyObject *mask = PyLong_FromUnsignedLong(0xFFFFFFFFul);
            PyObject *shifted = two && mask ? PyNumber_Rshift(obj, two) : NULL;
            share = shifted ? PyNumber_And(shifted, mask) : NULL;
            Py_XDECREF(two);
            Py_XDECREF(mask);
            Py_XDECREF(shifted);
            if (share == NULL) {
                Py_XDECREF(extra);
                return NULL;
            }
        }
        else {
            PyErr_Format(PyExc_TypeError, "KeyMap holds a location of type %.100s",
                         Py_TYPE(obj)->tp_name);
            Py_XDECREF(extra);
            return NULL;
        }
        if (extra == NULL) {
            extra = share;
        }
        else {
            PyObject *sum = PyNumber_Add(extra, share);
            Py_DECREF(share);
            Py_DECREF(extra);
            extra = sum;
            if (extra == NULL) {
                return NULL;
            }
        }
    }
    if (km->mutations != mutations) {
        PyErr_SetString(PyExc_RuntimeError, "KeyMap changed during total_size");
        Py_XDECREF(extra);
        return NULL;
    }
    PyObject *result = PyLong_FromUnsignedLongLong(total);
    if (result == NULL || extra == NULL) {
        Py_XDECREF(extra);
        return result;
    }
    PyObject *sum = PyNumber_Add(result, extra);
    Py_DECREF(result);
    Py_DECREF(extra);
    return sum;
}

/* Assert the invariants: every live record is found through the table at
 * its own offset, the counts and the garbage add up, the side table's
 * slots are each used once. Raises AssertionError. */
static PyObject *
km_check(KeyMapObject *km, PyObject *unused)
{
#define KM_FAIL(msg)                                       \
    do {                                                   \
        PyErr_SetString(PyExc_AssertionError, "KeyMap: " msg); \
        return NULL;                                       \
    } while (0)
    Py_ssize_t live = 0;
    size_t garbage = 0, sides = 0;
    if (km->table == NULL) {
        if (km->count != 0) {
            KM_FAIL("no table");
        }
        Py_RETURN_NONE;
    }
    for (size_t off = 0; off < km->arena_used;) {
        const unsigned char *rec = km->arena + off;
        uint32_t hdr = ld32(rec);
        size_t len = hdr & KM_MAX_KEY;
        size_t size = rec_size(len);
        if (off + size > km->arena_used) {
            KM_FAIL("record past the arena's end");
        }
        if (hdr & KM_DELETED) {
            garbage += size;
        }
        else {
            live++;
            Py_ssize_t i = km_find(km, rec + KM_REC_HEAD, len, ks_hash(rec + KM_REC_HEAD, len), NULL);
            if (i < 0 || (size_t)km->table[i] * 4 != off) {
                KM_FAIL("record not found through the table");
            }
            uint64_t lo = ld64(rec + 4);
            if ((lo & 3) == 3) {
                if ((lo >> 2) >= km->side_used || km->side[lo >> 2] == NULL || ld64(rec + 12)) {
                    KM_FAIL("bad side table reference");
                }
                sides++;
            }
        }
        off += size;
    }
    size_t fill = 0;
    for (size_t i = 0; i < km->table_cap; i++) {
        fill += km->table[i] != KM_EMPTY;
    }
    if (live != km->count || garbage != km->garbage || fill != km->table_fill
        || fill * 4 > km->table_cap * 3 + 4 || sides + km->side_nfree != km->side_used) {
        KM_FAIL("counts disagree");
    }
    Py_RETURN_NONE;
#undef KM_FAIL
}

/* (bytes of the arena's live records in order, [side objects in the order
 * their records refer to them]): the raw form an index snapshot stores. A
 * kind-3 location's side index is renumbered to its rank in that list. */
static PyObject *
km_raw(KeyMapObject *km, PyObject *unused)
{
    PyObject *arena = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(km->arena_used - km->garbage));
    if (arena == NULL) {
        return NULL;
    }
    PyObject *sides = PyList_New(0);
    if (sides == NULL) {
        Py_DECREF(arena);
        return NULL;
    }
    unsigned char *to = (unsigned char *)PyBytes_AS_STRING(arena);
    for (size_t off = 0; off < km->arena_used;) {
        const unsigned char *rec = km->arena + off;
        uint32_t hdr = ld32(rec);
        size_t size = rec_size(hdr & KM_MAX_KEY);
        off += size;
        if (hdr & KM_DELETED) {
            continue;
        }
        memcpy(to, rec, size);
        uint64_t lo = ld64(rec + 4);
        if ((lo & 3) == 3) {
            st64(to + 4, (uint64_t)PyList_GET_SIZE(sides) << 2 | 3);
            if (PyList_Append(sides, km->side[lo >> 2]) < 0) {
                Py_DECREF(arena);
                Py_DECREF(sides);
                return NULL;
            }
        }
        to += size;
    }
    return Py_BuildValue("(nNN)", km->count, arena, sides);
}

static PyObject *
km_sizeof(KeyMapObject *km, PyObject *unused)
{
    size_t n = sizeof(KeyMapObject) + km->arena_cap + km->table_cap * sizeof(uint32_t)
               + km->side_cap * (sizeof(PyObject *) + sizeof(size_t));
    return PyLong_FromSize_t(n);
}

static PyObject *
km_richcompare(PyObject *a, PyObject *b, int op)
{
    if ((op != Py_EQ && op != Py_NE) || !PyObject_TypeCheck(a, &KeyMapType)
        || !(PyDict_Check(b) || PyObject_TypeCheck(b, &KeyMapType))) {
        if (PyObject_TypeCheck(b, &KeyMapType) && PyDict_Check(a)) {
            return km_richcompare(b, a, op);
        }
        Py_RETURN_NOTIMPLEMENTED;
    }
    KeyMapObject *km = (KeyMapObject *)a;
    int equal = PyObject_Length(b) == km->count;
    if (PyErr_Occurred()) {
        return NULL;
    }
    for (size_t off = 0; equal && off < km->arena_used;) {
        const unsigned char *rec = km->arena + off;
        uint32_t hdr = ld32(rec);
        off += rec_size(hdr & KM_MAX_KEY);
        if (hdr & KM_DELETED) {
            continue;
        }
        uint64_t mutations = km->mutations;
        PyObject *key = rec_key(rec);
        if (key == NULL) {
            return NULL;
        }
        PyObject *mine = rec_value(km, rec);
        if (mine == NULL) {
            Py_DECREF(key);
            return NULL;
        }
        PyObject *theirs = PyObject_GetItem(b, key);
        Py_DECREF(key);
        if (theirs == NULL) {
            Py_DECREF(mine);
            if (!PyErr_ExceptionMatches(PyExc_KeyError)) {
                return NULL;
            }
            PyErr_Clear();
            equal = 0;
            break;
        }
        int same = PyObject_RichCompareBool(mine, theirs, Py_EQ);
        Py_DECREF(mine);
        Py_DECREF(theirs);
        if (same < 0) {
            return NULL;
        }
        equal = same;
        if (mutations != km->mutations) {
            PyErr_SetString(PyExc_RuntimeError, "KeyMap changed size during comparison");
            return NULL;
        }
    }
    return PyBool_FromLong(op == Py_EQ ? equal : !equal);
}

static PyObject *
km_repr(KeyMapObject *km)
{
    int rc = Py_ReprEnter((PyObject *)km);
    if (rc != 0) {
        return rc > 0 ? PyUnicode_FromString("KeyMap(...)") : NULL;
    }
    PyObject *d = PyDict_New();
    PyObject *result = NULL;
    if (d != NULL && PyDict_Update(d, (PyObject *)km) == 0) {
        result = PyUnicode_FromFormat("KeyMap(%R)", d);
    }
    Py_XDECREF(d);
    Py_ReprLeave((PyObject *)km);
    return result;
}

static PyObject *
km_reduce(KeyMapObject *km, PyObject *unused)
{
    PyObject *d = PyDict_New();
    if (d == NULL) {
        return NULL;
    }
    if (PyDict_Update(d, (PyObject *)km) < 0) {
        Py_DECREF(d);
        return NULL;
    }
    return Py_BuildValue("(O(N))", (PyObject *)Py_TYPE(km), d);
}

static PyMethodDef km_methods[] = {
    {"get", (PyCFunction)(void (*)(void))km_get, METH_FASTCALL, "get(key, default=None)"},
    {"pop", (PyCFunction)(void (*)(void))km_pop, METH_FASTCALL, "pop(key[, default])"},
    {"setdefault", (PyCFunction)(void (*)(void))km_setdefault, METH_FASTCALL,
     "setdefault(key, default=None)"},
    {"copy", (PyCFunction)km_copy, METH_NOARGS, "A shallow copy (compacted)."},
    {"clear", (PyCFunction)km_clear_method, METH_NOARGS, "Remove every key."},
    {"update", (PyCFunction)km_update_method, METH_O, "update(mapping)"},
    {"keys", (PyCFunction)km_keys, METH_NOARGS, "A view of the keys (insertion order)."},
    {"values", (PyCFunction)km_values, METH_NOARGS, "A view of the values."},
    {"items", (PyCFunction)km_items, METH_NOARGS, "A view of the (key, value) pairs."},
    {"total_size", (PyCFunction)km_total_size, METH_NOARGS,
     "The sum of _location.location_size over the values."},
    {"raw", (PyCFunction)km_raw, METH_NOARGS,
     "(count, arena bytes, side objects): the form an index snapshot stores."},
    {"_check", (PyCFunction)km_check, METH_NOARGS, "Assert the invariants."},
    {"__sizeof__", (PyCFunction)km_sizeof, METH_NOARGS, NULL},
    {"__reduce__", (PyCFunction)km_reduce, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyMappingMethods km_as_mapping = {
    (lenfunc)km_length,
    (binaryfunc)km_subscript,
    (objobjargproc)km_ass_subscript,
};

static PySequenceMethods km_as_sequence = {
    .sq_contains = (objobjproc)km_contains,
};

static PyTypeObject KeyMapType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "logstate._cnative.KeyMap",
    .tp_basicsize = sizeof(KeyMapObject),
    .tp_dealloc = (destructor)km_dealloc,
    .tp_repr = (reprfunc)km_repr,
    .tp_as_sequence = &km_as_sequence,
    .tp_as_mapping = &km_as_mapping,
    .tp_hash = PyObject_HashNotImplemented,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "KeyMap([mapping]): a compact str -> location mapping (insertion order).",
    .tp_traverse = (traverseproc)km_traverse,
    .tp_clear = (inquiry)km_clear,
    .tp_richcompare = km_richcompare,
    .tp_iter = (getiterfunc)km_iter,
    .tp_methods = km_methods,
    .tp_new = km_tp_new,
};

/* ------------------------------------------------------------------ iterator */
static int
kmi_traverse(KeyMapIterObject *it, visitproc visit, void *arg)
{
    Py_VISIT(it->map);
    return 0;
}

static void
kmi_dealloc(KeyMapIterObject *it)
{
    PyObject_GC_UnTrack(it);
    Py_XDECREF(it->map);
    PyObject_GC_Del(it);
}

static PyObject *
kmi_next(KeyMapIterObject *it)
{
    KeyMapObject *km = it->map;
    if (km == NULL) {
        return NULL;
    }
    if (km->mutations != it->mutations) {
        it->left = -1; /* (and stays raised, as dict's) */
        PyErr_SetString(PyExc_RuntimeError, "KeyMap changed size during iteration");
        return NULL;
    }
    while (it->pos < km->arena_used) {
        const unsigned char *rec = km->arena + it->pos;
        uint32_t hdr = ld32(rec);
        it->pos += rec_size(hdr & KM_MAX_KEY);
        if (hdr & KM_DELETED) {
            continue;
        }
        it->left--;
        if (it->mode == KM_KEYS) {
            return rec_key(rec);
        }
        if (it->mode == KM_VALUES) {
            return rec_value(km, rec);
        }
        PyObject *key = rec_key(rec);
        if (key == NULL) {
            return NULL;
        }
        PyObject *value = rec_value(km, rec);
        if (value == NULL) {
            Py_DECREF(key);
            return NULL;
        }
        PyObject *pair = PyTuple_New(2);
        if (pair == NULL) {
            Py_DECREF(key);
            Py_DECREF(value);
            return NULL;
        }
        PyTuple_SET_ITEM(pair, 0, key);
        PyTuple_SET_ITEM(pair, 1, value);
        return pair;
    }
    it->map = NULL;
    Py_DECREF(km);
    return NULL;
}

static PyObject *
kmi_length_hint(KeyMapIterObject *it, PyObject *unused)
{
    Py_ssize_t n = it->map != NULL && it->map->mutations == it->mutations ? it->left : 0;
    return PyLong_FromSsize_t(n > 0 ? n : 0);
}

static PyMethodDef kmi_methods[] = {
    {"__length_hint__", (PyCFunction)kmi_length_hint, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject KeyMapIterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "logstate._cnative.KeyMapIterator",
    .tp_basicsize = sizeof(KeyMapIterObject),
    .tp_dealloc = (destructor)kmi_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)kmi_traverse,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)kmi_next,
    .tp_methods = kmi_methods,
};

/* ------------------------------------------------------------------ views */
static int
kmv_traverse(KeyMapViewObject *v, visitproc visit, void *arg)
{
    Py_VISIT(v->map);
    return 0;
}

static void
kmv_dealloc(KeyMapViewObject *v)
{
    PyObject_GC_UnTrack(v);
    Py_XDECREF(v->map);
    PyObject_GC_Del(v);
}

static Py_ssize_t
kmv_length(KeyMapViewObject *v)
{
    return v->map->count;
}

static PyObject *
kmv_iter(KeyMapViewObject *v)
{
    return km_iter_new(v->map, v->mode);
}

static int
kmv_contains(KeyMapViewObject *v, PyObject *x)
{
    if (v->mode == KM_KEYS) {
        return km_contains(v->map, x);
    }
    if (v->mode == KM_ITEMS) {
        if (!PyTuple_Check(x) || PyTuple_GET_SIZE(x) != 2) {
            return 0;
        }
        unsigned char *rec = km_lookup(v->map, PyTuple_GET_ITEM(x, 0), NULL);
        if (rec == NULL) {
            return PyErr_Occurred() ? -1 : 0;
        }
        PyObject *value = rec_value(v->map, rec);
        if (value == NULL) {
            return -1;
        }
        int rc = PyObject_RichCompareBool(value, PyTuple_GET_ITEM(x, 1), Py_EQ);
        Py_DECREF(value);
        return rc;
    }
    PyObject *it = kmv_iter(v);
    if (it == NULL) {
        return -1;
    }
    PyObject *item;
    int found = 0;
    while (!found && (item = PyIter_Next(it)) != NULL) {
        found = PyObject_RichCompareBool(item, x, Py_EQ);
        Py_DECREF(item);
        if (found < 0) {
            Py_DECREF(it);
            return -1;
        }
    }
    Py_DECREF(it);
    return PyErr_Occurred() ? -1 : found;
}

/* A set operation with a keys or items view on either side: on sets. */
static PyObject *
kmv_setop(PyObject *a, PyObject *b, binaryfunc op)
{
    PyObject *sa = PyObject_TypeCheck(a, &KeyMapViewType) ? PySet_New(a) : (Py_INCREF(a), a);
    if (sa == NULL) {
        return NULL;
    }
    PyObject *sb = PyObject_TypeCheck(b, &KeyMapViewType) ? PySet_New(b) : (Py_INCREF(b), b);
    if (sb == NULL) {
        Py_DECREF(sa);
        return NULL;
    }
    if (!PyAnySet_Check(sa)) { /* (e.g. a list on the left) */
        PyObject *s = PySet_New(sa);
        Py_DECREF(sa);
        if (s == NULL) {
            Py_DECREF(sb);
            return NULL;
        }
        sa = s;
    }
    if (!PyAnySet_Check(sb)) {
        PyObject *s = PySet_New(sb);
        Py_DECREF(sb);
        if (s == NULL) {
            Py_DECREF(sa);
            return NULL;
        }
        sb = s;
    }
    PyObject *result = op(sa, sb);
    Py_DECREF(sa);
    Py_DECREF(sb);
    return result;
}

static PyObject *
kmv_or(PyObject *a, PyObject *b)
{
    return kmv_setop(a, b, PyNumber_Or);
}

static PyObject *
kmv_and(PyObject *a, PyObject *b)
{
    return kmv_setop(a, b, PyNumber_And);
}

static PyObject *
kmv_xor(PyObject *a, PyObject *b)
{
    return kmv_setop(a, b, PyNumber_Xor);
}

static PyObject *
kmv_sub(PyObject *a, PyObject *b)
{
    return kmv_setop(a, b, PyNumber_Subtract);
}

static PyObject *
kmv_richcompare(PyObject *a, PyObject *b, int op)
{
    KeyMapViewObject *v = (KeyMapViewObject *)a;
    if (v->mode == KM_VALUES || (op != Py_EQ && op != Py_NE)) {
        Py_RETURN_NOTIMPLEMENTED;
    }
    PyObject *s = PySet_New(a);
    if (s == NULL) {
        return NULL;
    }
    PyObject *other = PyObject_TypeCheck(b, &KeyMapViewType) ? PySet_New(b) : (Py_INCREF(b), b);
    if (other == NULL) {
        Py_DECREF(s);
        return NULL;
    }
    PyObject *result = PyObject_RichCompare(s, other, op);
    Py_DECREF(s);
    Py_DECREF(other);
    return result;
}

static PyObject *
kmv_repr(KeyMapViewObject *v)
{
    static const char *names[] = {"KeyMap.keys", "KeyMap.values", "KeyMap.items"};
    PyObject *list = PySequence_List((PyObject *)v);
    if (list == NULL) {
        return NULL;
    }
    PyObject *result = PyUnicode_FromFormat("%s(%R)", names[v->mode], list);
    Py_DECREF(list);
    return result;
}

static PyNumberMethods kmv_as_number = {
    .nb_subtract = kmv_sub,
    .nb_and = kmv_and,
    .nb_xor = kmv_xor,
    .nb_or = kmv_or,
};

static PySequenceMethods kmv_as_sequence = {
    .sq_length = (lenfunc)kmv_length,
    .sq_contains = (objobjproc)kmv_contains,
};

static PyTypeObject KeyMapViewType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "logstate._cnative.KeyMapView",
    .tp_basicsize = sizeof(KeyMapViewObject),
    .tp_dealloc = (destructor)kmv_dealloc,
    .tp_repr = (reprfunc)kmv_repr,
    .tp_as_number = &kmv_as_number,
    .tp_as_sequence = &kmv_as_sequence,
    .tp_hash = PyObject_HashNotImplemented,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)kmv_traverse,
    .tp_richcompare = kmv_richcompare,
    .tp_iter = (getiterfunc)kmv_iter,
};

/* ------------------------------------------------------------------ snapshot load */
typedef struct {
    uint64_t number;
    uint64_t size;
} km_mark;

static int
mark_cmp(const void *a, const void *b)
{
    uint64_t x = ((const km_mark *)a)->number, y = ((const km_mark *)b)->number;
    return x < y ? -1 : x > y;
}

static const km_mark *
mark_find(const km_mark *marks, size_t n, uint64_t number)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (marks[mid].number < number) {
            lo = mid + 1;
        }
        else {
            hi = mid;
        }
    }
    return lo < n && marks[lo].number == number ? &marks[lo] : NULL;
}

/* Strict UTF-8 (what PyUnicode_DecodeUTF8 accepts): no overlong forms, no
 * surrogates, nothing past U+10FFFF. */
static int
utf8_valid(const unsigned char *p, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned char c = p[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t need;
        uint32_t cp;
        if (c >= 0xC2 && c <= 0xDF) {
            need = 1;
            cp = c & 0x1F;
        }
        else if (c >= 0xE0 && c <= 0xEF) {
            need = 2;
            cp = c & 0x0F;
        }
        else if (c >= 0xF0 && c <= 0xF4) {
            need = 3;
            cp = c & 0x07;
        }
        else {
            return 0;
        }
        if (n - i <= need) {
            return 0;
        }
        for (size_t k = 1; k <= need; k++) {
            if ((p[i + k] & 0xC0) != 0x80) {
                return 0;
            }
            cp = cp << 6 | (p[i + k] & 0x3F);
        }
        if ((need == 2 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF)))
            || (need == 3 && (cp < 0x10000 || cp > 0x10FFFF))) {
            return 0;
        }
        i += need + 1;
    }
    return 1;
}

/* keymap_load(data, offset, count, arena_size, side_count, marks, limits)
 *   -> (KeyMap, total size of its locations)
 *
 * Builds a KeyMap from the raw form ``KeyMap.raw`` gave, as an index
 * snapshot stores it: ``arena_size`` bytes of records at ``offset`` of
 * ``data``, then ``side_count`` compressed-group locations of six u64 each.
 * Every record and location is checked: ``marks`` is [(segment number,
 * size)] of the snapshot's segments, ``limits`` (header_size, min_record,
 * min_group_op, min_group_record, max_record_size, max_key_size). The
 * checks copy _snapshot._int_locations_size and _mixed_locations_size
 * (marked there; tests/test_keymap_snapshot.py proves them equal).
 * Raises ValueError naming the first thing wrong. */
static PyObject *
keymap_load(PyObject *module, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t offset, count, arena_size, side_count;
    PyObject *marks_obj;
    unsigned long long header_size, min_record, min_group_op, min_group_record, max_record;
    unsigned long long max_key;
    if (!PyArg_ParseTuple(args, "y*nnnnO(KKKKKK)", &view, &offset, &count, &arena_size,
                          &side_count, &marks_obj, &header_size, &min_record, &min_group_op,
                          &min_group_record, &max_record, &max_key)) {
        return NULL;
    }
    KeyMapObject *km = NULL;
    km_mark *marks = NULL;
    PyObject *result = NULL;
    const char *why = NULL;
    PyObject *fast = PySequence_Fast(marks_obj, "marks must be a sequence");
    if (fast == NULL) {
        goto done;
    }
    size_t nmarks = (size_t)PySequence_Fast_GET_SIZE(fast);
    marks = PyMem_Malloc((nmarks + 1) * sizeof(km_mark));
    if (marks == NULL) {
        PyErr_NoMemory();
        Py_DECREF(fast);
        goto done;
    }
    for (size_t i = 0; i < nmarks; i++) {
        PyObject *m = PySequence_Fast_GET_ITEM(fast, i);
        if (!PyArg_ParseTuple(m, "KK", &marks[i].number, &marks[i].size)) {
            Py_DECREF(fast);
            goto done;
        }
    }
    Py_DECREF(fast);
    qsort(marks, nmarks, sizeof(km_mark), mark_cmp);
    const unsigned char *data = view.buf;
    size_t size = (size_t)view.len;
    if (offset < 0 || count < 0 || arena_size < 0 || side_count < 0 || (size_t)offset > size
        || (size_t)arena_size > size - (size_t)offset || arena_size % 4
        || (size_t)side_count > (size - (size_t)offset - (size_t)arena_size) / 48
        || (size_t)arena_size > KM_MAX_ARENA || (size_t)count > (size_t)arena_size / KM_REC_HEAD) {
        why = "keymap sizes out of range";
        goto done;
    }
    km = km_new_empty();
    if (km == NULL) {
        goto done;
    }
    if (arena_size > 0) {
        km->arena = PyMem_Malloc((size_t)arena_size);
        if (km->arena == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        km->arena_cap = (size_t)arena_size;
        memcpy(km->arena, data + offset, (size_t)arena_size);
    }
    const unsigned char *side_data = data + offset + arena_size;
    uint64_t total = 0;
    Py_ssize_t seen = 0;
    size_t sides = 0;
    for (size_t off = 0; off < (size_t)arena_size;) {
        unsigned char *rec = km->arena + off;
        if ((size_t)arena_size - off < KM_REC_HEAD) {
            why = "keymap record truncated";
            goto done;
        }
        uint32_t len = ld32(rec);
        size_t rsize = rec_size(len & KM_MAX_KEY);
        if (len > max_key || rsize > (size_t)arena_size - off) {
            why = "keymap key too long";
            goto done;
        }
        for (size_t k = KM_REC_HEAD + len; k < rsize; k++) {
            if (rec[k] != 0) {
                why = "keymap padding not zero";
                goto done;
            }
        }
        if (!utf8_valid(rec + KM_REC_HEAD, len)) {
            why = "keymap key not UTF-8";
            goto done;
        }
        uint64_t lo = ld64(rec + 4), hi = ld64(rec + 12);
        unsigned kind = (unsigned)(lo & 3);
        if (kind == 0 || kind == 1) {
            /* location = segment << 74 | offset << 34 | size << 2 | kind */
            uint64_t segment = hi >> 10;
            uint64_t loc_offset = (lo >> 34) | (hi & 0x3FF) << 30;
            uint64_t loc_size = (lo >> 2) & 0xFFFFFFFFu;
            const km_mark *mark = mark_find(marks, nmarks, segment);
            if (mark == NULL || loc_size < (kind == 0 ? min_record : min_group_op)
                || loc_offset < header_size || loc_offset + loc_size > mark->size) {
                why = "keymap location out of bounds";
                goto done;
            }
            total += loc_size;
        }
        else if (kind == 3 && hi == 0 && (lo >> 2) == sides && sides < (size_t)side_count) {
            const unsigned char *e = side_data + 48 * sides;
            uint64_t f[6];
            for (int k = 0; k < 6; k++) {
                f[k] = ld64(e + 8 * k);
            }
            /* (number, record_offset, record_size, op_offset, op_size, share) */
            const km_mark *mark = mark_find(marks, nmarks, f[0]);
            if (!(mark != NULL && f[1] >= header_size && f[1] <= mark->size
                  && min_group_record <= f[2] && f[2] <= mark->size - f[1] && f[3] <= max_record
                  && min_group_op <= f[4] && f[4] <= max_record - f[3] && f[5] <= f[2])) {
                why = "keymap compressed location out of bounds";
                goto done;
            }
            PyObject *t = Py_BuildValue("(KKKKKK)", f[0], f[1], f[2], f[3], f[4], f[5]);
            if (t == NULL) {
                goto done;
            }
            uint64_t slot;
            int rc = side_put(km, t, &slot);
            Py_DECREF(t);
            if (rc < 0) {
                goto done;
            }
            sides++;
            total += f[5];
        }
        else {
            why = "keymap location of a bad kind";
            goto done;
        }
        seen++;
        km->arena_used = off + rsize; /* (a failure frees only what is counted) */
        off += rsize;
    }
    if (seen != count || sides != (size_t)side_count) {
        why = "keymap counts disagree";
        goto done;
    }
    km->count = count;
    int dups = 0;
    if (km_rebuild(km, (size_t)count, &dups) < 0) {
        goto done;
    }
    if (dups) {
        why = "keymap holds a key twice";
        goto done;
    }
    result = Py_BuildValue("(OK)", (PyObject *)km, (unsigned long long)total);
done:
    if (why != NULL) {
        PyErr_SetString(PyExc_ValueError, why);
    }
    Py_XDECREF(km);
    PyMem_Free(marks);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef keymap_functions[] = {
    {"keymap_load", keymap_load, METH_VARARGS,
     "keymap_load(data, offset, count, arena_size, side_count, marks, limits) -> (KeyMap, size)"},
    {NULL, NULL, 0, NULL},
};

int
ls_keymap_init(PyObject *module)
{
    km_sixty_four = PyLong_FromLong(64);
    if (km_sixty_four == NULL) {
        return -1;
    }
    if (PyType_Ready(&KeyMapType) < 0 || PyType_Ready(&KeyMapIterType) < 0
        || PyType_Ready(&KeyMapViewType) < 0) {
        return -1;
    }
    Py_INCREF(&KeyMapType);
    if (PyModule_AddObject(module, "KeyMap", (PyObject *)&KeyMapType) < 0) {
        Py_DECREF(&KeyMapType);
        return -1;
    }
    return PyModule_AddFunctions(module, keymap_functions);
}
