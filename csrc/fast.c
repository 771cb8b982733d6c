/* logstate._cnative: the hot paths of set, get and flush (design "W").
 *
 * Owns: the C base types that hold the hot fields of the engine's parts
 * (LifeBase of _lifecycle.Lifecycle, SegmentBase of _segments.Segment,
 * SegmentSetBase of _segments.SegmentSet, KeydirBase of _keydir.Keydir,
 * AppendBase of _append.Appender, WriterBase of _writer.Writer, ReaderBase
 * of _reader.Reader): the Python parts read and write these fields as plain
 * attributes and stay the owners of every rule; the write lock type (Lock);
 * and the common case of Writer.set, Reader.get and the group of
 * Writer.write_keys (encode_keys, index_keys).
 * Must never: read a Python attribute by name on a hot path (but for the
 * calls made by interned name with a listener: the deques' append, then
 * Writer.deliver; and Writer._hold_back with a backlog), run Python code
 * (or allocate an object the garbage collector tracks) while it holds the write lock, re-implement an unusual case (a roll, a
 * failed or closed engine, a record in flight, an index that watches sets,
 * a test's file system, a backlog): those call the Python
 * path (Writer._set_python, Reader._get_python), which is the reference.
 * Every rule copied from Python is marked "copy of" here and there, and
 * tests/test_native_equal.py proves both write the same bytes.
 */
#include "native.h"

#include <errno.h>
#include <string.h>
#include <structmember.h>
#include <time.h>
#include <unistd.h>

/* _format: the record frame (copies of its structs; asserted at import by _writer) */
#define FRAME_HEADER_SIZE 9 /* crc u32, length u32, type u8 */
#define RECORD_OVERHEAD 17  /* + seq u64 */
#define SEGMENT_HEADER_SIZE 24
#define GROUP_OP_SIZE 9 /* op_crc u32, type u8, length u32 */
#define GROUP_HEADER_SIZE 5
#define REC_SET 1
#define REC_DELETE 2
#define REC_CHECKPOINT 7
#define MAX_NAME_SIZE 0xFFFF
/* _format.MAX_KEY_SIZE, _values.TAG_BYTES (copies, asserted at import by _handle) */
#define MAX_KEY_SIZE 4096
#define TAG_BYTES 7
/* _location: segment << 74 | offset << 34 | size << 2 | kind */
#define KIND_RECORD 0
#define KIND_GROUP_OP 1
#define SIZE_MASK 0xFFFFFFFFull

static PyObject *str_set_python;   /* "_set_python" */
static PyObject *str_get_python;   /* "_get_python" */
static PyObject *str_fail;         /* "fail" */
static PyObject *str_settle;       /* "settle" */
static PyObject *str_backlog;      /* "backlog" */
static PyObject *str_compacting;   /* "compacting" */
static PyObject *str_max_body;     /* "_MAX_BODY_SIZE" */
static PyObject *str_append;       /* "append" */
static PyObject *str_deliver;      /* "deliver" */
static PyObject *str_hold_back;    /* "_hold_back" */
static PyTypeObject *deque_type;   /* collections.deque */
static PyObject *int_64;           /* 64 */
static PyObject *int_74;           /* 74 */

static inline void
put_u16(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
}

static inline void
put_u32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

static inline void
put_u64(unsigned char *p, uint64_t v)
{
    put_u32(p, (uint32_t)v);
    put_u32(p + 4, (uint32_t)(v >> 32));
}

static inline uint32_t
get_u32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* ======================================================================= generic base types
 * Every base type keeps its object fields first, right after the header, so
 * one traverse/clear/dealloc serves them all (n_objects says how many). */
typedef struct {
    PyObject_HEAD
    PyObject *objects[1];
} AnyBase;

static Py_ssize_t
object_count(PyTypeObject *type);

static int
base_traverse(PyObject *self, visitproc visit, void *arg)
{
    Py_ssize_t n = object_count(Py_TYPE(self));
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_VISIT(((AnyBase *)self)->objects[i]);
    }
    return 0; /* (a heap subclass's own traverse visits its type) */
}

static int
base_clear(PyObject *self)
{
    Py_ssize_t n = object_count(Py_TYPE(self));
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_CLEAR(((AnyBase *)self)->objects[i]);
    }
    return 0;
}

static void
base_dealloc(PyObject *self)
{
    PyObject_GC_UnTrack(self);
    base_clear(self);
    Py_TYPE(self)->tp_free(self);
}

#define OBJ(name, type, field) {name, T_OBJECT_EX, offsetof(type, field), 0, NULL}
#define LL(name, type, field) {name, T_LONGLONG, offsetof(type, field), 0, NULL}

/* ----------------------------------------------------------------------- LifeBase */
typedef struct {
    PyObject_HEAD
    PyObject *blocked; /* any reason a write must take the slow check */
    PyObject *closed;
} LifeBase;

static PyMemberDef life_members[] = {
    OBJ("blocked", LifeBase, blocked),
    OBJ("closed", LifeBase, closed),
    {NULL, 0, 0, 0, NULL},
};

/* ----------------------------------------------------------------------- SegmentBase */
typedef struct {
    PyObject_HEAD
    PyObject *map;  /* mmap or None */
    PyObject *high; /* (not an attribute) cached number << 74, for high_number */
    long long number;
    long long size;
    long long mapped;
    long long high_number;
    int fd;
} SegmentBase;

static PyMemberDef segment_members[] = {
    OBJ("map", SegmentBase, map),
    LL("number", SegmentBase, number),
    LL("size", SegmentBase, size),
    LL("mapped", SegmentBase, mapped),
    {"fd", T_INT, offsetof(SegmentBase, fd), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

/* number << 74 | low (a new reference) */
static PyObject *
segment_location(SegmentBase *seg, uint64_t low)
{
    if (seg->high == NULL || seg->high_number != seg->number) {
        PyObject *number = PyLong_FromLongLong(seg->number);
        if (number == NULL) {
            return NULL;
        }
        PyObject *high = PyNumber_Lshift(number, int_74);
        Py_DECREF(number);
        if (high == NULL) {
            return NULL;
        }
        Py_XSETREF(seg->high, high);
        seg->high_number = seg->number;
    }
    PyObject *low_obj = PyLong_FromUnsignedLongLong(low);
    if (low_obj == NULL) {
        return NULL;
    }
    PyObject *loc = PyNumber_Or(seg->high, low_obj);
    Py_DECREF(low_obj);
    return loc;
}

/* ----------------------------------------------------------------------- SegmentSetBase */
typedef struct {
    PyObject_HEAD
    PyObject *active;   /* the segment written to */
    PyObject *segments; /* number -> segment */
} SegmentSetBase;

static PyMemberDef segment_set_members[] = {
    OBJ("active", SegmentSetBase, active),
    OBJ("segments", SegmentSetBase, segments),
    {NULL, 0, 0, 0, NULL},
};

/* ----------------------------------------------------------------------- KeydirBase */
typedef struct {
    PyObject_HEAD
    PyObject *watch; /* sets are noted (ordered views, expiry): the Python path */
    long long live_bytes;
} KeydirBase;

static PyMemberDef keydir_members[] = {
    OBJ("watch", KeydirBase, watch),
    LL("live_bytes", KeydirBase, live_bytes),
    {NULL, 0, 0, 0, NULL},
};

/* ----------------------------------------------------------------------- AppendBase */
typedef struct {
    PyObject_HEAD
    PyObject *in_flight;   /* None, or the record whose bookkeeping is unfinished */
    PyObject *listener;    /* None, or the commit listener */
    PyObject *early;       /* None, or the early listener */
    PyObject *undelivered; /* deque of (seq, end pos, record) for the listener */
    PyObject *unoffered;   /* deque of (seq, end pos, record) for the early listener */
    long long seq;
    long long written_pos;
    long long roll_size;
    long long write_seq; /* odd while a record is in the index before its write (set_and_commit) */
} AppendBase;

static PyMemberDef append_members[] = {
    OBJ("in_flight", AppendBase, in_flight),
    OBJ("listener", AppendBase, listener),
    OBJ("early", AppendBase, early),
    OBJ("_undelivered", AppendBase, undelivered),
    OBJ("_unoffered", AppendBase, unoffered),
    LL("seq", AppendBase, seq),
    LL("written_pos", AppendBase, written_pos),
    LL("roll_size", AppendBase, roll_size),
    LL("_write_seq", AppendBase, write_seq),
    {NULL, 0, 0, 0, NULL},
};

/* ----------------------------------------------------------------------- WriterBase */
typedef struct {
    PyObject_HEAD
    PyObject *lock;
    PyObject *life;
    PyObject *appender;
    PyObject *namespaces;
    PyObject *keydir;
    PyObject *segments;
    PyObject *os_write;        /* None: a test's file system (every write through it) */
    PyObject *sync_always;
    PyObject *commit;          /* GroupCommit.commit */
    PyObject *scheduler_state; /* the scheduler's __dict__ (its "backlog", "compacting") */
    PyObject *module_state;    /* _writer's globals (its "_MAX_BODY_SIZE", monkeypatched by tests) */
    PyObject *fast;            /* False: always the Python path (_writer.FAST_PATHS) */
    long long one_release_sets; /* sets that took set_and_commit (tests read it) */
} WriterBase;

static PyMemberDef writer_members[] = {
    OBJ("_lock", WriterBase, lock),
    OBJ("_life", WriterBase, life),
    OBJ("_appender", WriterBase, appender),
    OBJ("_namespaces", WriterBase, namespaces),
    OBJ("_keydir", WriterBase, keydir),
    OBJ("_segments", WriterBase, segments),
    OBJ("_os_write", WriterBase, os_write),
    OBJ("_sync_always", WriterBase, sync_always),
    OBJ("_commit", WriterBase, commit),
    OBJ("_scheduler_state", WriterBase, scheduler_state),
    OBJ("_module_state", WriterBase, module_state),
    OBJ("_fast", WriterBase, fast),
    {"_one_release_sets", T_LONGLONG, offsetof(WriterBase, one_release_sets), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

/* ----------------------------------------------------------------------- HandleBase */
typedef struct {
    PyObject_HEAD
    PyObject *writer;   /* the engine's Writer, or None: the Python path (_handle.FAST_PATHS) */
    PyObject *ns;
    PyObject *ns_bytes;
    PyObject *closed;
    PyObject *engine;       /* (read by the Python methods: a slot is their fastest attribute) */
    PyObject *allow_pickle;
} HandleBase;

static PyMemberDef handle_members[] = {
    OBJ("_writer", HandleBase, writer),
    OBJ("_ns", HandleBase, ns),
    OBJ("_ns_bytes", HandleBase, ns_bytes),
    OBJ("_closed", HandleBase, closed),
    OBJ("_engine", HandleBase, engine),
    OBJ("_allow_pickle", HandleBase, allow_pickle),
    {NULL, 0, 0, 0, NULL},
};

/* ----------------------------------------------------------------------- ReaderBase */
typedef struct {
    PyObject_HEAD
    PyObject *life;
    PyObject *appender;
    PyObject *namespaces;
    PyObject *by_number;
    PyObject *fast; /* False: always the Python path (_reader.FAST_PATHS) */
} ReaderBase;

static PyMemberDef reader_members[] = {
    OBJ("_life", ReaderBase, life),
    OBJ("_appender", ReaderBase, appender),
    OBJ("_namespaces", ReaderBase, namespaces),
    OBJ("_by_number", ReaderBase, by_number),
    OBJ("_fast", ReaderBase, fast),
    {NULL, 0, 0, 0, NULL},
};

/* ======================================================================= Lock */
typedef struct {
    PyObject_HEAD
    PyThread_type_lock lock;
    char locked;
    PyObject *weakrefs;
} LockObject;

static PyTypeObject LockType;

static PyObject *
lock_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    if (PyTuple_GET_SIZE(args) || (kwargs && PyDict_GET_SIZE(kwargs))) {
        PyErr_SetString(PyExc_TypeError, "Lock() takes no arguments");
        return NULL;
    }
    LockObject *self = (LockObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->lock = PyThread_allocate_lock();
    self->locked = 0;
    self->weakrefs = NULL;
    if (self->lock == NULL) {
        Py_DECREF(self);
        PyErr_SetString(PyExc_MemoryError, "cannot allocate a lock");
        return NULL;
    }
    return (PyObject *)self;
}

static void
lock_dealloc(LockObject *self)
{
    if (self->weakrefs != NULL) {
        PyObject_ClearWeakRefs((PyObject *)self);
    }
    if (self->lock != NULL) {
        if (self->locked) {
            PyThread_release_lock(self->lock);
        }
        PyThread_free_lock(self->lock);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static double
monotonic_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Acquire, waiting at most timeout_s (< 0: forever) with the GIL released;
 * signal handlers run while it waits (an exception from one: -1).
 * 1: acquired, 0: timed out. (As threading.Lock's acquire.) */
static int
lock_acquire_timed(LockObject *self, double timeout_s)
{
    if (PyThread_acquire_lock_timed(self->lock, 0, 0) == PY_LOCK_ACQUIRED) {
        self->locked = 1;
        return 1;
    }
    if (timeout_s == 0) {
        return 0;
    }
    double deadline = timeout_s > 0 ? monotonic_s() + timeout_s : 0;
    for (;;) {
        PY_TIMEOUT_T wait_us = -1;
        if (timeout_s > 0) {
            double left = deadline - monotonic_s();
            if (left <= 0) {
                return 0;
            }
            /* (clamped before the conversion, which overflows past the max;
             * lock_acquire refuses a timeout above it, as threading does) */
            double us = left * 1e6;
            wait_us = us >= (double)PY_TIMEOUT_MAX ? PY_TIMEOUT_MAX : (PY_TIMEOUT_T)us;
        }
        PyLockStatus status;
        Py_BEGIN_ALLOW_THREADS
        status = PyThread_acquire_lock_timed(self->lock, wait_us, 1);
        Py_END_ALLOW_THREADS
        if (status == PY_LOCK_ACQUIRED) {
            self->locked = 1;
            return 1;
        }
        if (status == PY_LOCK_FAILURE) {
            return 0;
        }
        /* PY_LOCK_INTR: a signal arrived; run its handler (it may raise) */
        if (Py_MakePendingCalls() < 0) {
            return -1;
        }
    }
}

static PyObject *
lock_acquire(LockObject *self, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"blocking", "timeout", NULL};
    int blocking = 1;
    double timeout = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|pd:acquire", names, &blocking, &timeout)) {
        return NULL;
    }
    if (!blocking && timeout != -1) {
        PyErr_SetString(PyExc_ValueError, "can't specify a timeout for a non-blocking call");
        return NULL;
    }
    if (timeout != timeout || (timeout < 0 && timeout != -1)) { /* (NaN, a negative) */
        PyErr_SetString(PyExc_ValueError, "timeout value must be a non-negative number");
        return NULL;
    }
    if (timeout > (double)PY_TIMEOUT_MAX / 1e6) {
        PyErr_SetString(PyExc_OverflowError, "timeout value is too large");
        return NULL;
    }
    int got = lock_acquire_timed(self, blocking ? timeout : 0);
    if (got < 0) {
        return NULL;
    }
    return PyBool_FromLong(got);
}

static PyObject *
lock_enter(LockObject *self, PyObject *unused)
{
    int got = lock_acquire_timed(self, -1);
    if (got < 0) {
        return NULL;
    }
    Py_RETURN_TRUE;
}

static PyObject *
lock_release(LockObject *self, PyObject *unused)
{
    if (!self->locked) {
        PyErr_SetString(PyExc_RuntimeError, "release unlocked lock");
        return NULL;
    }
    self->locked = 0;
    PyThread_release_lock(self->lock);
    Py_RETURN_NONE;
}

static PyObject *
lock_exit(LockObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return lock_release(self, NULL);
}

static PyObject *
lock_locked(LockObject *self, PyObject *unused)
{
    return PyBool_FromLong(self->locked);
}

static PyMethodDef lock_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))lock_acquire, METH_VARARGS | METH_KEYWORDS,
     "acquire(blocking=True, timeout=-1) -> bool (as threading.Lock's)"},
    {"release", (PyCFunction)lock_release, METH_NOARGS, "release()"},
    {"locked", (PyCFunction)lock_locked, METH_NOARGS, "locked() -> bool"},
    {"__enter__", (PyCFunction)lock_enter, METH_NOARGS, "acquire()"},
    {"__exit__", (PyCFunction)(void (*)(void))lock_exit, METH_FASTCALL, "release()"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject LockType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "logstate._cnative.Lock",
    .tp_basicsize = sizeof(LockObject),
    .tp_dealloc = (destructor)lock_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The engine's write lock: threading.Lock's interface, taken directly by C.",
    .tp_weaklistoffset = offsetof(LockObject, weakrefs),
    .tp_methods = lock_methods,
    .tp_new = lock_new,
};

/* ======================================================================= the types */
static PyTypeObject LifeBaseType, SegmentBaseType, SegmentSetBaseType, KeydirBaseType,
    AppendBaseType, WriterBaseType, ReaderBaseType, HandleBaseType;

static Py_ssize_t
object_count(PyTypeObject *type)
{
    while (type != NULL) {
        if (type == &LifeBaseType) {
            return 2;
        }
        if (type == &SegmentBaseType) {
            return 2;
        }
        if (type == &SegmentSetBaseType) {
            return 2;
        }
        if (type == &KeydirBaseType) {
            return 1;
        }
        if (type == &AppendBaseType) {
            return 5;
        }
        if (type == &WriterBaseType) {
            return 12;
        }
        if (type == &HandleBaseType) {
            return 6;
        }
        if (type == &ReaderBaseType) {
            return 5;
        }
        type = type->tp_base;
    }
    return 0;
}

#define BASE_TYPE(var, name, ctype, members, doc)                                             \
    static PyTypeObject var = {                                                                \
        PyVarObject_HEAD_INIT(NULL, 0)                                                         \
        .tp_name = "logstate._cnative." name,                                                  \
        .tp_basicsize = sizeof(ctype),                                                         \
        .tp_dealloc = base_dealloc,                                                            \
        .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,             \
        .tp_doc = doc,                                                                         \
        .tp_traverse = base_traverse,                                                          \
        .tp_clear = base_clear,                                                                \
        .tp_members = members,                                                                 \
        .tp_new = PyType_GenericNew,                                                           \
    }

BASE_TYPE(LifeBaseType, "LifeBase", LifeBase, life_members,
          "Hot fields of _lifecycle.Lifecycle (blocked, closed).");
BASE_TYPE(SegmentBaseType, "SegmentBase", SegmentBase, segment_members,
          "Hot fields of _segments.Segment (number, fd, size, map, mapped).");
BASE_TYPE(SegmentSetBaseType, "SegmentSetBase", SegmentSetBase, segment_set_members,
          "Hot fields of _segments.SegmentSet (active, segments).");
BASE_TYPE(KeydirBaseType, "KeydirBase", KeydirBase, keydir_members,
          "Hot fields of _keydir.Keydir (watch, live_bytes).");
BASE_TYPE(AppendBaseType, "AppendBase", AppendBase, append_members,
          "Hot fields of _append.Appender (seq, written_pos, in_flight, roll_size, the "
          "listeners and their queues).");

/* ======================================================================= helpers */
/* the field, if obj is an instance of type (else NULL) */
#define AS(type, ctype, obj) (PyObject_TypeCheck((obj), &(type)) ? (ctype *)(obj) : NULL)

/* index[key]: a new reference, NULL with no error when missing, NULL with an
 * error on failure. A dict, or any mapping (KeyError: missing). */
static PyObject *
index_get(PyObject *index, PyObject *key)
{
    if (PyDict_CheckExact(index)) {
        PyObject *found = PyDict_GetItemWithError(index, key);
        Py_XINCREF(found);
        return found;
    }
    PyObject *found = PyObject_GetItem(index, key);
    if (found == NULL && PyErr_ExceptionMatches(PyExc_KeyError)) {
        PyErr_Clear();
    }
    return found;
}

static int
index_set(PyObject *index, PyObject *key, PyObject *loc)
{
    if (PyDict_CheckExact(index)) {
        return PyDict_SetItem(index, key, loc);
    }
    return PyObject_SetItem(index, key, loc);
}

/* the value at index[key] removed: 1 (and *old set, a new reference), 0 absent, -1 error */
static int
index_pop(PyObject *index, PyObject *key, PyObject **old)
{
    *old = index_get(index, key);
    if (*old == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    int done = PyDict_CheckExact(index) ? PyDict_DelItem(index, key) : PyObject_DelItem(index, key);
    if (done < 0) {
        Py_CLEAR(*old);
        return -1;
    }
    return 1;
}

/* the size field of a location: -1 for one that is not a plain int */
static long long
location_size(PyObject *loc)
{
    if (!PyLong_CheckExact(loc)) {
        return -1;
    }
    unsigned long long low = PyLong_AsUnsignedLongLongMask(loc);
    if (low == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    return (long long)((low >> 2) & SIZE_MASK);
}

/* An exact KeyMap index is reached by its C API (native.h, keymap block):
 * the key's UTF-8 bytes and a location as (lo, hi), no Python object made.
 * copy of location_size for a KeyMap's plain location (lo: bits 0..63) */
#define KM_LOC_SIZE(lo) ((long long)(((lo) >> 2) & SIZE_MASK))

/* ======================================================================= Writer.set */
/* the raised exception, taken out (3.12 changed the API; the old one is deprecated there) */
static PyObject *
take_exception(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *exc, *tb;
    PyErr_Fetch(&type, &exc, &tb);
    PyErr_NormalizeException(&type, &exc, &tb);
    if (tb != NULL && exc != NULL) {
        PyException_SetTraceback(exc, tb);
    }
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return exc;
#endif
}

static void
raise_exception(PyObject *exc) /* steals exc */
{
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(exc);
#else
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(exc)), exc, PyException_GetTraceback(exc));
#endif
}

PyObject *
ls_take_exception(void)
{
    return take_exception();
}

void
ls_raise_exception(PyObject *exc)
{
    raise_exception(exc);
}

static PyObject *
call_python(PyObject *self, PyObject *name, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *stack[6];
    stack[0] = self;
    for (Py_ssize_t i = 0; i < nargs; i++) {
        stack[i + 1] = args[i];
    }
    return PyObject_VectorcallMethod(name, stack, (size_t)(nargs + 1), NULL);
}

/* 1: true (or its truth failed: the Python path then finds out), 0: false */
static int
truth(PyObject *obj)
{
    if (obj == Py_False || obj == Py_None) {
        return 0;
    }
    if (obj == Py_True) {
        return 1;
    }
    int is_true = PyObject_IsTrue(obj);
    if (is_true < 0) {
        PyErr_Clear();
        return 1;
    }
    return is_true;
}

static long long
max_body_size(WriterBase *w)
{
    /* read at each call: a test monkeypatches _writer._MAX_BODY_SIZE */
    if (w->module_state == NULL || !PyDict_Check(w->module_state)) {
        return -1;
    }
    PyObject *limit = PyDict_GetItemWithError(w->module_state, str_max_body);
    if (limit == NULL || !PyLong_Check(limit)) {
        PyErr_Clear();
        return -1;
    }
    long long value = PyLong_AsLongLong(limit);
    if (value == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    return value;
}

/* write all of buf at the end of fd, the GIL released by the caller: 0, or errno */
static int
write_all_nogil(int fd, const char *buf, size_t size)
{
    size_t done = 0;
    while (done < size) {
        ssize_t n = write(fd, buf + done, size - done);
        if (n < 0) {
            if (errno == EINTR) {
                continue; /* nothing written: the signal is handled after the call */
            }
            return errno;
        }
        if (n == 0) {
            return EIO;
        }
        done += (size_t)n;
    }
    return 0;
}

/* write all of buf at the end of fd, the GIL released: 0, or errno */
static int
write_all(int fd, const char *buf, size_t size)
{
    int error;
    Py_BEGIN_ALLOW_THREADS
    error = write_all_nogil(fd, buf, size);
    Py_END_ALLOW_THREADS
    return error;
}

/* A set's key and value: objects (Writer.set's arguments), or the raw bytes
 * a handle's set has (HandleBase.set: an ASCII key's characters, a bytes
 * value with its tag in front), made objects only when the Python path needs
 * them (set_args_objects). Borrowed: the caller's arguments keep them alive. */
typedef struct {
    PyObject *key_bytes;   /* NULL: key_ptr, key_size */
    const char *key_ptr;
    Py_ssize_t key_size;
    PyObject *value;       /* the encoded value; NULL: tag, then raw */
    int tag;
    const char *raw;
    Py_ssize_t raw_size;
} SetArgs;

static Py_ssize_t
set_args_value_size(const SetArgs *a)
{
    return a->value != NULL ? PyBytes_GET_SIZE(a->value) : 1 + a->raw_size;
}

/* key_bytes and the encoded value as objects (new references), for the Python path */
static int
set_args_objects(const SetArgs *a, PyObject **key_bytes, PyObject **value)
{
    *key_bytes = a->key_bytes != NULL ? Py_NewRef(a->key_bytes)
                                      : PyBytes_FromStringAndSize(a->key_ptr, a->key_size);
    if (*key_bytes == NULL) {
        *value = NULL;
        return -1;
    }
    if (a->value != NULL) {
        *value = Py_NewRef(a->value);
        return 0;
    }
    /* copy of _values.encode_value's bytes case: BYTES_PREFIX + value */
    *value = PyBytes_FromStringAndSize(NULL, 1 + a->raw_size);
    if (*value == NULL) {
        Py_CLEAR(*key_bytes);
        return -1;
    }
    char *v = PyBytes_AS_STRING(*value);
    v[0] = (char)a->tag;
    memcpy(v + 1, a->raw, (size_t)a->raw_size);
    return 0;
}

/* Writer._set_python(ns, ns_bytes, key, key_bytes, value) */
static PyObject *
writer_set_python(WriterBase *self, PyObject *ns, PyObject *ns_bytes, PyObject *key,
                  const SetArgs *a)
{
    PyObject *key_bytes, *value;
    if (set_args_objects(a, &key_bytes, &value) < 0) {
        return NULL;
    }
    PyObject *args[5] = {ns, ns_bytes, key, key_bytes, value};
    PyObject *done = call_python((PyObject *)self, str_set_python, args, 5);
    Py_DECREF(key_bytes);
    Py_DECREF(value);
    return done;
}

static PyObject *writer_set_impl(WriterBase *self, PyObject *ns, PyObject *ns_bytes,
                                 PyObject *key, const SetArgs *a);

/* Writer.set(ns, ns_bytes, key, key_bytes, value) -- copy of Writer._set_python's
 * common case (docs/design.md "The C path"). */
static PyObject *
writer_set(WriterBase *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "set() takes 5 arguments");
        return NULL;
    }
    if (!PyBytes_CheckExact(args[3]) || !PyBytes_CheckExact(args[4])) {
        return call_python((PyObject *)self, str_set_python, args, nargs);
    }
    SetArgs a = {args[3], PyBytes_AS_STRING(args[3]), PyBytes_GET_SIZE(args[3]), args[4], 0, NULL, 0};
    return writer_set_impl(self, args[0], args[1], args[2], &a);
}

/* The listener's queues are plain deques (else the Python path queues). */
static int
listener_queues_plain(const AppendBase *ap)
{
    return ap->undelivered != NULL && Py_IS_TYPE(ap->undelivered, deque_type)
           && ap->early != NULL
           && (ap->early == Py_None
               || (ap->unoffered != NULL && Py_IS_TYPE(ap->unoffered, deque_type)));
}

/* Appender.queue(seq, end_pos, record) with its tuple made: 0, or -1 with an
 * error (memory) and the record maybe in the first deque (settle looks). */
static int
queue_record(AppendBase *ap, PyObject *queued)
{
    PyObject *done = PyObject_CallMethodOneArg(ap->undelivered, str_append, queued);
    if (done == NULL) {
        return -1;
    }
    Py_DECREF(done);
    if (ap->early != Py_None) {
        done = PyObject_CallMethodOneArg(ap->unoffered, str_append, queued);
        if (done == NULL) {
            return -1;
        }
        Py_DECREF(done);
    }
    return 0;
}


static PyObject *writer_hold_back_if_behind(WriterBase *self);

/* A write failed with errno error: copy of the Python path's "except OSError:
 * self._life.fail(exc); raise". Always leaves an exception set (the OSError,
 * or fail's own error). */
static void
fail_write(WriterBase *self, int error)
{
    errno = error;
    PyErr_SetFromErrno(PyExc_OSError);
    PyObject *exc = take_exception();
    PyObject *failed = exc ? PyObject_CallMethodOneArg(self->life, str_fail, exc) : NULL;
    if (failed == NULL) {
        Py_XDECREF(exc); /* (fail's own error is raised) */
        return;
    }
    Py_DECREF(failed);
    raise_exception(exc);
}

/* The end of writer_set_impl's common case with sync="always", a KeyMap index,
 * no listener and the C commit (csrc/commit.c): the record, framed, is stored
 * in the index and counted before the write, under the write lock (a reader
 * without the lock finds its location beyond the mapped bytes, and settles
 * under the lock, after the write), so that the GIL is released once, from
 * the write to the end of the commit, instead of twice. A failed write undoes
 * the store and the counts (neither can fail: an overwrite in place, or a
 * delete), then fails the engine as the Python path does. Takes over the
 * caller's references (lock, active, index, record) and the write lock. */
static PyObject *
set_and_commit(WriterBase *self, PyObject *commit, LockObject *lock, SegmentBase *active,
               PyObject *index, PyObject *record, const unsigned char *raw_key,
               Py_ssize_t key_size, uint64_t hash, uint64_t loc_lo, uint64_t loc_hi,
               long long offset, long long size, long long old_size, long long seq,
               long long pos_before)
{
    AppendBase *ap = (AppendBase *)self->appender;
    KeydirBase *keydir = (KeydirBase *)self->keydir;
    LsCommitCall call;
    int began = ls_commit_begin(commit, &call);
    uint64_t was[2];
    /* odd from the store to the end of the write (or of its undo): the index
     * alone (Reader.contains, Reader.count) is then read under the lock */
    ap->write_seq++;
    int stored = began < 0 ? -1
                           : ls_keymap_set(index, raw_key, (size_t)key_size, hash, loc_lo, loc_hi, was);
    if (stored < 0 || stored == LS_KM_SIDE) {
        /* nothing changed: -1 (room was reserved: not expected) raises, and so
         * does a side object (a compressed group's, which the lock excludes) */
        if (began == 0) {
            ls_commit_end(&call);
        }
        if (stored == LS_KM_SIDE) {
            PyErr_SetString(PyExc_RuntimeError, "a side object in the index under the write lock");
        }
        ap->write_seq++;
        goto unlock;
    }
    long long end_pos = pos_before + size;
    active->size = offset + size;
    ap->seq = seq;
    ap->written_pos = end_pos;
    keydir->live_bytes += size - old_size;
    PyThreadState *ts = PyEval_SaveThread();
    int error = write_all_nogil(active->fd, PyBytes_AS_STRING(record), (size_t)size);
    if (error) {
        PyEval_RestoreThread(ts);
        /* undo, under the lock: the index as it was, the counts */
        uint64_t undone[2];
        if (stored == LS_KM_INT) {
            ls_keymap_set(index, raw_key, (size_t)key_size, hash, was[0], was[1], undone);
        }
        else {
            ls_keymap_delete(index, raw_key, (size_t)key_size, hash, undone);
        }
        PyErr_Clear(); /* (neither fails: an overwrite in place, a delete) */
        keydir->live_bytes -= size - old_size;
        ap->written_pos = pos_before;
        ap->seq = seq - 1;
        active->size = offset;
        ap->write_seq++; /* (after the undo) */
        ls_commit_end(&call);
        fail_write(self, error);
        goto unlock;
    }
    ap->write_seq++; /* (plain stores: the write lock is held) */
    self->one_release_sets++;
    lock->locked = 0;
    PyThread_release_lock(lock->lock);
    int failed = ls_commit_run(&call, end_pos, &ts);
    PyEval_RestoreThread(ts);
    ls_commit_end(&call);
    Py_DECREF(lock);
    Py_DECREF(active);
    Py_DECREF(index);
    Py_DECREF(record);
    return failed ? NULL : writer_hold_back_if_behind(self);

unlock: /* (an error raised, the write lock held) */
    lock->locked = 0;
    PyThread_release_lock(lock->lock);
    Py_DECREF(lock);
    Py_DECREF(active);
    Py_DECREF(index);
    Py_DECREF(record);
    return NULL;
}

static PyObject *
writer_set_impl(WriterBase *self, PyObject *ns, PyObject *ns_bytes, PyObject *key,
                const SetArgs *a)
{
    PyObject *queued = NULL; /* the listener's queue entry (see below) */
    if (!PyUnicode_CheckExact(ns) || !PyBytes_CheckExact(ns_bytes) || !PyUnicode_CheckExact(key)
        || self->fast != Py_True
        || self->lock == NULL
        || Py_TYPE(self->lock) != &LockType) {
        goto python;
    }
    LockObject *lock = (LockObject *)self->lock; /* (a reference held below) */
    LifeBase *life = self->life ? AS(LifeBaseType, LifeBase, self->life) : NULL;
    AppendBase *ap = self->appender ? AS(AppendBaseType, AppendBase, self->appender) : NULL;
    KeydirBase *keydir = self->keydir ? AS(KeydirBaseType, KeydirBase, self->keydir) : NULL;
    SegmentSetBase *segments =
        self->segments ? AS(SegmentSetBaseType, SegmentSetBase, self->segments) : NULL;
    if (life == NULL || ap == NULL || keydir == NULL || segments == NULL
        || self->namespaces == NULL || !PyDict_Check(self->namespaces)
        || self->os_write == NULL || self->os_write == Py_None
        || self->scheduler_state == NULL || !PyDict_Check(self->scheduler_state)) {
        goto python;
    }
    /* With a commit listener, the tuple of its queue entry is made before the
     * lock: a tuple is tracked by the garbage collector, and making one may run
     * a collection, so Python code (finalizers), which must not run under the
     * lock. Under it only the tuple's ints are made (not tracked). */
    if (ap->listener != NULL && ap->listener != Py_None && (queued = PyTuple_New(3)) == NULL) {
        return NULL;
    }
    if (PyThread_acquire_lock_timed(lock->lock, 0, 0) != PY_LOCK_ACQUIRED) {
        goto python; /* taken: wait for it in Python (interruptible) */
    }
    lock->locked = 1;
    Py_INCREF(lock); /* (the GIL is released around the write: held whatever Python does) */
    /* from here to the release no Python code runs: an interrupt lands before or after */
    PyObject *record = NULL, *loc = NULL, *old = NULL, *index = NULL;
    SegmentBase *active = NULL;
    long long end_pos = 0;
    /* a commit listener: the record is queued for it as Appender.queue does */
    int listening = ap->listener != NULL && ap->listener != Py_None;
    if (life->blocked == NULL || truth(life->blocked) != 0 || ap->in_flight != Py_None
        || (listening && (queued == NULL || !listener_queues_plain(ap))) || keydir->watch == NULL
        || truth(keydir->watch) != 0) {
        goto unlock_python;
    }
    PyObject *backlog = PyDict_GetItemWithError(self->scheduler_state, str_backlog);
    if (backlog == NULL || truth(backlog) != 0) {
        goto unlock_python;
    }
    /* A background compaction runs: the Python path, whose pace the compactor
     * keeps up with (the disk bound of a hot store, tests/test_disk_bound.py,
     * holds only while compaction reclaims as fast as the writers append). */
    PyObject *compacting = PyDict_GetItemWithError(self->scheduler_state, str_compacting);
    if (compacting == NULL || truth(compacting) != 0) {
        goto unlock_python;
    }
    index = PyDict_GetItemWithError(self->namespaces, ns);
    if (index == NULL) {
        goto unlock_python; /* deleted: Python raises */
    }
    Py_INCREF(index);
    Py_ssize_t ns_size = PyBytes_GET_SIZE(ns_bytes), key_size = a->key_size,
               value_size = set_args_value_size(a);
    long long body_size = (long long)ns_size + 2 + key_size + value_size;
    long long limit = max_body_size(self);
    if (limit < 0 || body_size > limit || key_size > MAX_NAME_SIZE) {
        goto unlock_python;
    }
    if (segments->active == NULL || !PyObject_TypeCheck(segments->active, &SegmentBaseType)) {
        goto unlock_python;
    }
    active = (SegmentBase *)Py_NewRef(segments->active);
    long long size = RECORD_OVERHEAD + body_size;
    long long offset = active->size;
    if (offset + size > ap->roll_size && offset > SEGMENT_HEADER_SIZE) {
        goto unlock_python; /* a roll is due */
    }
    long long old_size = 0;
    const unsigned char *raw_key = (const unsigned char *)a->key_ptr;
    int direct = ls_keymap_check_exact(index); /* a KeyMap: by key_bytes (key's UTF-8) */
    uint64_t hash = 0;
    if (direct) {
        uint64_t was[2];
        hash = ls_keymap_hash(raw_key, (size_t)key_size);
        int found = ls_keymap_find(index, raw_key, (size_t)key_size, hash, was);
        if (found == LS_KM_SIDE) {
            goto unlock_python; /* a compressed group's tuple: before any change */
        }
        old_size = found == LS_KM_INT ? KM_LOC_SIZE(was[0]) : 0;
    }
    else {
        old = index_get(index, key);
        if (old == NULL) {
            if (PyErr_Occurred()) {
                goto unlock_error; /* (nothing changed yet: raised as the look-up raised it) */
            }
        }
        else {
            old_size = location_size(old);
            if (old_size < 0) {
                goto unlock_python; /* a compressed group's tuple */
            }
        }
    }
    /* copy of fmt.encode_record(REC_SET, seq, ns key value) */
    long long seq = ap->seq + 1;
    record = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)size);
    if (record == NULL) {
        goto unlock_error;
    }
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(record);
    put_u32(p + 4, (uint32_t)(8 + body_size));
    p[8] = REC_SET;
    put_u64(p + 9, (uint64_t)seq);
    unsigned char *q = p + RECORD_OVERHEAD;
    memcpy(q, PyBytes_AS_STRING(ns_bytes), (size_t)ns_size);
    q += ns_size;
    put_u16(q, (uint32_t)key_size);
    memcpy(q + 2, a->key_ptr, (size_t)key_size);
    q += 2 + key_size;
    if (a->value != NULL) {
        memcpy(q, PyBytes_AS_STRING(a->value), (size_t)value_size);
    }
    else {
        q[0] = (unsigned char)a->tag;
        memcpy(q + 1, a->raw, (size_t)a->raw_size);
    }
    put_u32(p, ls_crc32c(0, p + 4, (size_t)(size - 4)));
    /* the location, before the write: nothing can fail after it but the store
     * (a KeyMap's as (lo, hi): copy of segment_location's number << 74 | low) */
    uint64_t loc_lo = (uint64_t)offset << 34 | (uint64_t)size << 2 | KIND_RECORD;
    uint64_t loc_hi = (uint64_t)active->number << 10 | (uint64_t)offset >> 30;
    if (!direct) {
        loc = segment_location(active, loc_lo);
        if (loc == NULL) {
            goto unlock_error;
        }
    }
    /* After the write nothing may fail: a KeyMap's store gets its room now
     * (ls_keymap_reserve); any other index gets the settling record of a
     * store that fails, made now (Appender.settle finishes it from the file) */
    long long pos_before = ap->written_pos;
    PyObject *pending = NULL;
    if (direct ? ls_keymap_reserve(index, (size_t)key_size) < 0
               : (pending = Py_BuildValue("(OLLLO)", (PyObject *)active, offset, size, pos_before,
                                          Py_False))
                     == NULL) {
        goto unlock_error;
    }
    /* the listener's queue entry too (copy of Appender.queue's tuple) */
    if (listening) {
        PyObject *seq_obj = PyLong_FromLongLong(seq);
        PyObject *end_obj = PyLong_FromLongLong(pos_before + size);
        if (seq_obj == NULL || end_obj == NULL) {
            Py_XDECREF(seq_obj);
            Py_XDECREF(end_obj);
            Py_XDECREF(pending);
            goto unlock_error;
        }
        PyTuple_SET_ITEM(queued, 0, seq_obj);
        PyTuple_SET_ITEM(queued, 1, end_obj);
        PyTuple_SET_ITEM(queued, 2, Py_NewRef(record));
    }
    /* sync="always" with the C commit: the GIL released once, for the write and the commit */
    if (direct && !listening && self->sync_always == Py_True) {
        PyObject *commit = ls_commit_of(self->commit);
        if (commit != NULL) {
            return set_and_commit(self, commit, lock, active, index, record, raw_key, key_size,
                                  hash, loc_lo, loc_hi, offset, size, old_size, seq, pos_before);
        }
    }
    int error = write_all(active->fd, (const char *)p, (size_t)size);
    if (error) {
        Py_XDECREF(pending);
        fail_write(self, error);
        goto unlock_error;
    }
    active->size = offset + size;
    ap->seq = seq;
    ap->written_pos = end_pos = pos_before + size;
    int stored;
    if (direct) {
        uint64_t was[2];
        stored = ls_keymap_set(index, raw_key, (size_t)key_size, hash, loc_lo, loc_hi, was);
        if (stored == LS_KM_SIDE) {
            /* (a side object appeared meanwhile, which the lock excludes:
             * unchanged, so stored as the generic path does) */
            loc = segment_location(active, loc_lo);
            stored = loc == NULL ? -1 : index_set(index, key, loc);
        }
    }
    else {
        stored = index_set(index, key, loc);
    }
    /* copy of Appender.queue (the deques' append: no Python code runs) */
    if (stored >= 0 && listening) {
        stored = queue_record(ap, queued);
    }
    if (stored < 0) {
        /* copy of the Python path's "except BaseException": settle from the file
         * (which queues the record for the listener if it is not queued yet) */
        PyObject *exc = take_exception();
        if (pending == NULL) { /* (a KeyMap's store that failed after all) */
            pending = Py_BuildValue("(OLLLO)", (PyObject *)active, offset, size, pos_before,
                                    Py_False);
        }
        if (pending != NULL) {
            Py_XSETREF(ap->in_flight, pending);
            PyObject *settled = PyObject_CallMethodNoArgs(self->appender, str_settle);
            Py_XDECREF(settled);
        }
        if (PyErr_Occurred()) {
            Py_XDECREF(exc); /* settle's own error is raised */
        }
        else if (exc != NULL) {
            raise_exception(exc);
        }
        goto unlock_error;
    }
    Py_XDECREF(pending);
    Py_XDECREF(queued);
    keydir->live_bytes += size - old_size;
    Py_DECREF(active);
    Py_DECREF(index);
    Py_XDECREF(old);
    Py_XDECREF(loc);
    Py_DECREF(record);
    lock->locked = 0;
    PyThread_release_lock(lock->lock);
    Py_DECREF(lock);
    /* copy of Writer._after_write's common case: sync="always" waits for its commit */
    if (self->sync_always != NULL && truth(self->sync_always) == 1 && self->commit != NULL) {
        PyObject *pos = PyLong_FromLongLong(end_pos);
        if (pos == NULL) {
            return NULL;
        }
        PyObject *done = PyObject_CallOneArg(self->commit, pos);
        Py_DECREF(pos);
        if (done == NULL) {
            return NULL;
        }
        Py_DECREF(done);
    }
    /* copy of Writer._after_write's next step: give the listener what is durable */
    if (listening) {
        PyObject *done = PyObject_CallMethodNoArgs((PyObject *)self, str_deliver);
        if (done == NULL) {
            return NULL;
        }
        Py_DECREF(done);
    }
    return writer_hold_back_if_behind(self);

unlock_error:
    Py_XDECREF(active);
    Py_XDECREF(index);
    Py_XDECREF(old);
    Py_XDECREF(loc);
    Py_XDECREF(record);
    lock->locked = 0;
    PyThread_release_lock(lock->lock);
    Py_DECREF(lock);
    Py_XDECREF(queued); /* (after the lock: nothing is freed under it) */
    return NULL;

unlock_python:
    PyErr_Clear(); /* (a failed look-up: the Python path does it again, and raises) */
    Py_XDECREF(active);
    Py_XDECREF(index);
    Py_XDECREF(old);
    lock->locked = 0;
    PyThread_release_lock(lock->lock);
    Py_DECREF(lock);
python:
    Py_XDECREF(queued);
    return writer_set_python(self, ns, ns_bytes, key, a);
}

/* copy of Writer._after_write's last step: a compaction a whole segment behind
 * holds the writer back (set meanwhile by another writer's roll): None, or NULL */
static PyObject *
writer_hold_back_if_behind(WriterBase *self)
{
    PyObject *behind = PyDict_GetItemWithError(self->scheduler_state, str_backlog);
    int held = behind == NULL ? (PyErr_Occurred() ? -1 : 0) : truth(behind);
    if (held < 0) {
        return NULL;
    }
    if (held) {
        PyObject *done = PyObject_CallMethodNoArgs((PyObject *)self, str_hold_back);
        if (done == NULL) {
            return NULL;
        }
        Py_DECREF(done);
    }
    Py_RETURN_NONE;
}

/* ======================================================================= write_keys */
/* encode_keys(ns_bytes, keys, values, checkpoint) -> the body of the group record
 * (flags 0, count, ops) -- copy of fmt.GROUP_HEADER.pack(0, count) +
 * b"".join(fmt.encode_key_ops(ns_bytes, keys, values) [+ encode_op(checkpoint)]);
 * keys are valid str (encode_key checked them), values bytes or None (a delete). */
static PyObject *
encode_keys(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyBytes_CheckExact(args[0]) || !PyList_CheckExact(args[1])
        || !PyList_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError, "encode_keys(ns_bytes, keys: list, values: list, "
                                         "checkpoint)");
        return NULL;
    }
    PyObject *ns_bytes = args[0], *keys = args[1], *values = args[2], *checkpoint = args[3];
    Py_ssize_t count = PyList_GET_SIZE(keys);
    if (PyList_GET_SIZE(values) != count) {
        PyErr_SetString(PyExc_ValueError, "keys and values differ in length");
        return NULL;
    }
    if (checkpoint != Py_None && !PyBytes_CheckExact(checkpoint)) {
        PyErr_SetString(PyExc_TypeError, "checkpoint must be bytes or None");
        return NULL;
    }
    Py_ssize_t ns_size = PyBytes_GET_SIZE(ns_bytes);
    size_t total = GROUP_HEADER_SIZE;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *key = PyList_GET_ITEM(keys, i), *value = PyList_GET_ITEM(values, i);
        Py_ssize_t key_size;
        if (!PyUnicode_CheckExact(key) || PyUnicode_AsUTF8AndSize(key, &key_size) == NULL) {
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_TypeError, "keys must be str");
            }
            return NULL;
        }
        if (value != Py_None && !PyBytes_CheckExact(value)) {
            PyErr_SetString(PyExc_TypeError, "values must be bytes or None");
            return NULL;
        }
        if (key_size > MAX_NAME_SIZE) {
            PyErr_SetString(PyExc_ValueError, "key too long");
            return NULL;
        }
        total += GROUP_OP_SIZE + (size_t)ns_size + 2 + (size_t)key_size
                 + (value == Py_None ? 0 : (size_t)PyBytes_GET_SIZE(value));
    }
    if (checkpoint != Py_None) {
        total += GROUP_OP_SIZE + (size_t)PyBytes_GET_SIZE(checkpoint);
    }
    if (total > (size_t)PY_SSIZE_T_MAX) {
        return PyErr_NoMemory(); /* (encode_record refuses anything near this) */
    }
    PyObject *body = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (body == NULL) {
        return NULL;
    }
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(body);
    p[0] = 0;
    put_u32(p + 1, (uint32_t)(count + (checkpoint != Py_None)));
    p += GROUP_HEADER_SIZE;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *key = PyList_GET_ITEM(keys, i), *value = PyList_GET_ITEM(values, i);
        Py_ssize_t key_size;
        const char *raw = PyUnicode_AsUTF8AndSize(key, &key_size); /* cached: no error */
        Py_ssize_t value_size = value == Py_None ? 0 : PyBytes_GET_SIZE(value);
        size_t body_size = (size_t)ns_size + 2 + (size_t)key_size + (size_t)value_size;
        p[4] = value == Py_None ? REC_DELETE : REC_SET;
        put_u32(p + 5, (uint32_t)body_size);
        unsigned char *q = p + GROUP_OP_SIZE;
        memcpy(q, PyBytes_AS_STRING(ns_bytes), (size_t)ns_size);
        q += ns_size;
        put_u16(q, (uint32_t)key_size);
        memcpy(q + 2, raw, (size_t)key_size);
        q += 2 + key_size;
        if (value_size) {
            memcpy(q, PyBytes_AS_STRING(value), (size_t)value_size);
        }
        put_u32(p, ls_crc32c(0, p + 4, 5 + body_size));
        p += GROUP_OP_SIZE + body_size;
    }
    if (checkpoint != Py_None) {
        Py_ssize_t size = PyBytes_GET_SIZE(checkpoint);
        p[4] = REC_CHECKPOINT;
        put_u32(p + 5, (uint32_t)size);
        memcpy(p + GROUP_OP_SIZE, PyBytes_AS_STRING(checkpoint), (size_t)size);
        put_u32(p, ls_crc32c(0, p + 4, 5 + (size_t)size));
    }
    return body;
}

/* index_keys(index, ns_size, keys, values, high, op_offset) -> live bytes change.
 * Copy of Writer.write_keys' loop without ordered views or expiry (the caller
 * takes its Python loop for those): each key set points at its group op
 * (high | op_offset << 34 | op_size << 2, high = segment << 74 | KIND_GROUP_OP),
 * each None value deletes. A location that is not an int (a compressed
 * group's tuple) is measured by its share (location[5]), as location_size. */
static PyObject *
index_keys(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6 || !PyList_CheckExact(args[2]) || !PyList_CheckExact(args[3])) {
        PyErr_SetString(PyExc_TypeError,
                        "index_keys(index, ns_size, keys: list, values: list, high, op_offset)");
        return NULL;
    }
    PyObject *index = args[0], *keys = args[2], *values = args[3], *high = args[4];
    Py_ssize_t ns_size = PyLong_AsSsize_t(args[1]);
    long long op_offset = PyLong_AsLongLong(args[5]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t count = PyList_GET_SIZE(keys);
    if (PyList_GET_SIZE(values) != count) {
        PyErr_SetString(PyExc_ValueError, "keys and values differ in length");
        return NULL;
    }
    long long live = 0;
    /* an exact KeyMap: by its C API, high split as (lo, hi) once */
    int direct = ls_keymap_check_exact(index);
    uint64_t high_lo = 0, high_hi = 0;
    if (direct) {
        PyObject *top = PyNumber_Rshift(high, int_64);
        high_hi = top ? PyLong_AsUnsignedLongLong(top) : 0;
        Py_XDECREF(top);
        high_lo = PyErr_Occurred() ? 0 : PyLong_AsUnsignedLongLongMask(high);
        if (PyErr_Occurred()) {
            PyErr_Clear(); /* (not a location's high part: the generic code raises) */
            direct = 0;
        }
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *key = PyList_GET_ITEM(keys, i), *value = PyList_GET_ITEM(values, i);
        Py_ssize_t key_size;
        const char *raw;
        if (!PyUnicode_CheckExact(key) || (raw = PyUnicode_AsUTF8AndSize(key, &key_size)) == NULL) {
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_TypeError, "keys must be str");
            }
            goto error;
        }
        if (value != Py_None && !PyBytes_CheckExact(value)) { /* (encode_keys checked the
                                                                 same lists: cheap to be sure) */
            PyErr_SetString(PyExc_TypeError, "values must be bytes or None");
            goto error;
        }
        long long op_size = GROUP_OP_SIZE + ns_size + 2 + key_size
                            + (value == Py_None ? 0 : PyBytes_GET_SIZE(value));
        if (direct) {
            const unsigned char *p = (const unsigned char *)raw;
            uint64_t h = ls_keymap_hash(p, (size_t)key_size), was[2];
            int found;
            if (value == Py_None) {
                found = ls_keymap_delete(index, p, (size_t)key_size, h, was);
            }
            else { /* copy of the generic high | op_offset << 34 | op_size << 2 */
                uint64_t lo = high_lo | (uint64_t)op_offset << 34 | (uint64_t)op_size << 2;
                uint64_t hi = high_hi | (uint64_t)op_offset >> 30;
                found = ls_keymap_set(index, p, (size_t)key_size, h, lo, hi, was);
            }
            if (found < 0) {
                goto error;
            }
            if (found != LS_KM_SIDE) {
                live += value == Py_None ? 0 : op_size;
                live -= found == LS_KM_INT ? KM_LOC_SIZE(was[0]) : 0;
                op_offset += op_size;
                continue;
            }
            /* a compressed group's tuple, unchanged: this key by the generic code */
        }
        PyObject *old = NULL;
        if (value == Py_None) {
            int found = index_pop(index, key, &old);
            if (found < 0) {
                goto error;
            }
        }
        else {
            old = index_get(index, key);
            if (old == NULL && PyErr_Occurred()) {
                goto error;
            }
            PyObject *low = PyLong_FromUnsignedLongLong((uint64_t)op_offset << 34
                                                        | (uint64_t)op_size << 2);
            PyObject *loc = low ? PyNumber_Or(high, low) : NULL;
            Py_XDECREF(low);
            if (loc == NULL || index_set(index, key, loc) < 0) {
                Py_XDECREF(loc);
                Py_XDECREF(old);
                goto error;
            }
            Py_DECREF(loc);
            live += op_size;
        }
        if (old != NULL) {
            long long old_size = location_size(old);
            if (old_size < 0) { /* a compressed group's tuple: its share */
                PyObject *share = PyTuple_Check(old) && PyTuple_GET_SIZE(old) > 5
                                      ? PyTuple_GET_ITEM(old, 5)
                                      : NULL;
                old_size = share ? PyLong_AsLongLong(share) : -1;
                if (old_size < 0) {
                    Py_DECREF(old);
                    if (!PyErr_Occurred()) {
                        PyErr_SetString(PyExc_ValueError, "a location that is neither int "
                                                          "nor a compressed group's tuple");
                    }
                    goto error;
                }
            }
            live -= old_size;
            Py_DECREF(old);
        }
        op_offset += op_size;
    }
    return PyLong_FromLongLong(live);
error:
    return NULL;
}

/* ======================================================================= Reader.get */
/* Reader.get(ns, ns_bytes, key) -- copy of Reader._get_python's common case:
 * the record checked in the segment's mapping without a copy (type, length,
 * ns + key prefix, CRC), the value copied out. */
static PyObject *
reader_get(ReaderBase *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "get() takes 3 arguments");
        return NULL;
    }
    PyObject *ns = args[0], *ns_bytes = args[1], *key = args[2];
    if (!PyUnicode_CheckExact(ns) || !PyBytes_CheckExact(ns_bytes) || !PyUnicode_CheckExact(key)
        || self->fast != Py_True || self->life == NULL || self->appender == NULL || self->namespaces == NULL
        || self->by_number == NULL || !PyDict_Check(self->namespaces)
        || !PyDict_Check(self->by_number)) {
        goto python;
    }
    LifeBase *life = AS(LifeBaseType, LifeBase, self->life);
    AppendBase *ap = AS(AppendBaseType, AppendBase, self->appender);
    if (life == NULL || ap == NULL || life->closed == NULL || truth(life->closed) != 0
        || ap->in_flight != Py_None) {
        goto python;
    }
    PyObject *index = PyDict_GetItemWithError(self->namespaces, ns);
    if (index == NULL) {
        goto python_clear;
    }
    Py_ssize_t key_size;
    const char *raw_key = PyUnicode_AsUTF8AndSize(key, &key_size);
    if (raw_key == NULL) {
        goto python_clear; /* (not UTF-8: the Python path finds it absent or raises) */
    }
    unsigned long long low, high;
    if (ls_keymap_check_exact(index)) { /* by the C API: as KeyMap's __getitem__ finds it */
        const unsigned char *p = (const unsigned char *)raw_key;
        uint64_t found_loc[2];
        int found = ls_keymap_find(index, p, (size_t)key_size, ls_keymap_hash(p, (size_t)key_size),
                                   found_loc);
        if (found == LS_KM_ABSENT) {
            Py_RETURN_NONE;
        }
        if (found != LS_KM_INT) {
            goto python; /* a compressed group's tuple */
        }
        low = found_loc[0];
        high = found_loc[1];
    }
    else {
        Py_INCREF(index);
        PyObject *loc = index_get(index, key);
        Py_DECREF(index);
        if (loc == NULL) {
            if (PyErr_Occurred()) {
                goto python_clear;
            }
            Py_RETURN_NONE;
        }
        if (!PyLong_CheckExact(loc)) {
            Py_DECREF(loc);
            goto python;
        }
        low = PyLong_AsUnsignedLongLongMask(loc);
        PyObject *high_obj = PyNumber_Rshift(loc, int_64);
        Py_DECREF(loc);
        if (high_obj == NULL) {
            goto python_clear;
        }
        high = PyLong_AsUnsignedLongLong(high_obj);
        Py_DECREF(high_obj);
        if (PyErr_Occurred()) {
            goto python_clear;
        }
    }
    unsigned long long number = high >> 10;
    unsigned long long offset = (high & 0x3FF) << 30 | low >> 34;
    unsigned long long size = (low >> 2) & SIZE_MASK;
    int kind = (int)(low & 3);
    PyObject *number_obj = PyLong_FromUnsignedLongLong(number);
    if (number_obj == NULL) {
        goto python_clear;
    }
    PyObject *segment = PyDict_GetItemWithError(self->by_number, number_obj);
    Py_DECREF(number_obj);
    if (segment == NULL || !PyObject_TypeCheck(segment, &SegmentBaseType)) {
        goto python_clear;
    }
    SegmentBase *seg = (SegmentBase *)segment;
    if (seg->map == NULL || seg->map == Py_None || (long long)(offset + size) > seg->mapped) {
        goto python; /* not mapped (the active segment): Python preads */
    }
    Py_buffer view;
    PyObject *map = Py_NewRef(seg->map);
    int exported = PyObject_GetBuffer(map, &view, PyBUF_SIMPLE);
    Py_DECREF(map); /* (the view holds its own reference) */
    if (exported < 0) {
        goto python_clear; /* unmapped meanwhile */
    }
    PyObject *result = NULL;
    if ((unsigned long long)view.len >= offset + size) {
        const unsigned char *data = (const unsigned char *)view.buf + offset;
        Py_ssize_t ns_size = PyBytes_GET_SIZE(ns_bytes);
        size_t prefix_size = (size_t)ns_size + 2 + (size_t)key_size;
        size_t head = kind == KIND_RECORD ? RECORD_OVERHEAD : GROUP_OP_SIZE;
        size_t type_at = kind == KIND_RECORD ? 8 : 4;
        size_t length_at = kind == KIND_RECORD ? 4 : 5;
        if ((kind == KIND_RECORD || kind == KIND_GROUP_OP) && size > head + prefix_size
            && data[type_at] == REC_SET && (uint64_t)get_u32(data + length_at) + 9 == size
            && memcmp(data + head, PyBytes_AS_STRING(ns_bytes), (size_t)ns_size) == 0
            && data[head + ns_size] == (unsigned char)key_size
            && data[head + ns_size + 1] == (unsigned char)(key_size >> 8)
            && memcmp(data + head + ns_size + 2, raw_key, (size_t)key_size) == 0
            && get_u32(data) == ls_crc32c(0, data + 4, (size_t)size - 4)) {
            result = PyBytes_FromStringAndSize((const char *)data + head + prefix_size,
                                               (Py_ssize_t)(size - head - prefix_size));
            if (result == NULL) {
                PyBuffer_Release(&view);
                return NULL;
            }
        }
    }
    PyBuffer_Release(&view);
    if (result != NULL) {
        return result;
    }
    goto python; /* a mismatch: the Python path reads again and reports */

python_clear:
    PyErr_Clear();
python:
    return call_python((PyObject *)self, str_get_python, args, nargs);
}

/* ======================================================================= the method tables */
/* ======================================================================= HandleBase.set */
/* copy of LocalFileStorage._set_python's docstring (tests/test_native_handle.py compares them) */
#define HANDLE_SET_DOC \
    "Store ``value`` under ``key`` (replacing any previous value).\n" \
    "\n" \
    "Args:\n" \
    "    ttl: seconds after which the key expires (the storage's clock,\n" \
    "        wall-clock time by default): from then on it reads as\n" \
    "        missing for ``get``, ``in``, ``len`` and every listing, and\n" \
    "        compaction drops it. None: it never expires (a set without\n" \
    "        ``ttl`` also clears an earlier one's).\n" \
    "\n" \
    "Raises:\n" \
    "    TypeError: key not a str; value not storable (e.g. not picklable);\n" \
    "        ttl not a number.\n" \
    "    ValueError: key empty or too long; ttl not positive or not finite.\n" \
    "    PickleNotAllowedError: value needs pickle and allow_pickle is False.\n" \
    "    StorageClosedError / StorageFailedError / SubStorageDeletedError.\n" \
    "    OSError: the write (or, with sync=\"always\", the sync) failed; the\n" \
    "        storage then refuses writes until reopened."


/* LocalFileStorage.set(key, value, ttl=None) -- copy of LocalFileStorage._set_python's
 * common case: an open handle, an exact str key of 1 to MAX_KEY_SIZE ASCII
 * characters (its UTF-8 is its characters), an exact bytes value (its
 * encoding is TAG_BYTES then the bytes), no ttl; then Writer.set's common
 * case with those raw bytes (writer_set_impl: no key bytes, no encoded value
 * made). Anything else runs LocalFileStorage._set_python, which checks,
 * raises and encodes every other case. */
static PyObject *
handle_set(HandleBase *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (kwnames != NULL || !(nargs == 2 || (nargs == 3 && args[2] == Py_None))
        || self->closed != Py_False || self->writer == NULL
        || !PyObject_TypeCheck(self->writer, &WriterBaseType) || self->ns == NULL
        || self->ns_bytes == NULL) {
        goto python;
    }
    PyObject *key = args[0], *value = args[1];
    if (!PyUnicode_CheckExact(key) || !PyBytes_CheckExact(value)) {
        goto python;
    }
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(key) < 0) {
        return NULL;
    }
#endif
    Py_ssize_t key_size = PyUnicode_GET_LENGTH(key);
    if (!PyUnicode_IS_ASCII(key) || key_size == 0 || key_size > MAX_KEY_SIZE) {
        goto python;
    }
    SetArgs a = {NULL, (const char *)PyUnicode_DATA(key), key_size,
                 NULL, TAG_BYTES, PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value)};
    /* owned for the call: Python code that the set may run (a mapping index
     * that is not a dict, the Python path) may rebind the handle's fields */
    PyObject *writer = Py_NewRef(self->writer), *ns = Py_NewRef(self->ns),
             *ns_bytes = Py_NewRef(self->ns_bytes);
    PyObject *done = writer_set_impl((WriterBase *)writer, ns, ns_bytes, key, &a);
    Py_DECREF(writer);
    Py_DECREF(ns);
    Py_DECREF(ns_bytes);
    return done;

python:;
    PyObject *method = PyObject_GetAttr((PyObject *)self, str_set_python);
    if (method == NULL) {
        return NULL;
    }
    PyObject *result = PyObject_Vectorcall(method, args, nargs, kwnames);
    Py_DECREF(method);
    return result;
}

static PyMethodDef handle_methods[] = {
    {"set", (PyCFunction)(void (*)(void))handle_set, METH_FASTCALL | METH_KEYWORDS,
     "set($self, key, value, ttl=None)\n--\n\n"
     HANDLE_SET_DOC},
    {NULL, NULL, 0, NULL},
};

static PyMethodDef writer_methods[] = {
    {"set", (PyCFunction)(void (*)(void))writer_set, METH_FASTCALL,
     "set(ns, ns_bytes, key, key_bytes, value): Writer.set's common case in C; "
     "anything else runs Writer._set_python."},
    {NULL, NULL, 0, NULL},
};

static PyMethodDef reader_methods[] = {
    {"get", (PyCFunction)(void (*)(void))reader_get, METH_FASTCALL,
     "get(ns, ns_bytes, key): Reader.get's common case in C; anything else runs "
     "Reader._get_python."},
    {NULL, NULL, 0, NULL},
};

#define BASE_TYPE_M(var, name, ctype, members, methods, doc)                                  \
    static PyTypeObject var = {                                                                \
        PyVarObject_HEAD_INIT(NULL, 0)                                                         \
        .tp_name = "logstate._cnative." name,                                                  \
        .tp_basicsize = sizeof(ctype),                                                         \
        .tp_dealloc = base_dealloc,                                                            \
        .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,             \
        .tp_doc = doc,                                                                         \
        .tp_traverse = base_traverse,                                                          \
        .tp_clear = base_clear,                                                                \
        .tp_methods = methods,                                                                 \
        .tp_members = members,                                                                 \
        .tp_new = PyType_GenericNew,                                                           \
    }

BASE_TYPE_M(WriterBaseType, "WriterBase", WriterBase, writer_members, writer_methods,
            "Hot fields of _writer.Writer, and its C set.");
BASE_TYPE_M(ReaderBaseType, "ReaderBase", ReaderBase, reader_members, reader_methods,
            "Hot fields of _reader.Reader, and its C get.");
BASE_TYPE_M(HandleBaseType, "HandleBase", HandleBase, handle_members, handle_methods,
            "Hot fields of _handle.Handle, and LocalFileStorage's C set.");

/* ======================================================================= for commit.c */
int
ls_lock_check(PyObject *obj)
{
    return Py_IS_TYPE(obj, &LockType);
}

int
ls_lock_acquire_nogil(PyObject *obj, long long timeout_us)
{
    LockObject *lock = (LockObject *)obj;
    if (PyThread_acquire_lock_timed(lock->lock, (PY_TIMEOUT_T)timeout_us, 0) != PY_LOCK_ACQUIRED) {
        return 0;
    }
    lock->locked = 1;
    return 1;
}

void
ls_lock_release_nogil(PyObject *obj)
{
    LockObject *lock = (LockObject *)obj;
    lock->locked = 0;
    PyThread_release_lock(lock->lock);
}

int
ls_writer_check(PyObject *obj)
{
    if (!PyObject_TypeCheck(obj, &WriterBaseType)) {
        return 0;
    }
    WriterBase *w = (WriterBase *)obj;
    return w->lock != NULL && Py_IS_TYPE(w->lock, &LockType) && w->life != NULL
           && PyObject_TypeCheck(w->life, &LifeBaseType) && w->appender != NULL
           && PyObject_TypeCheck(w->appender, &AppendBaseType) && w->segments != NULL
           && PyObject_TypeCheck(w->segments, &SegmentSetBaseType);
}

/* copy of Appender.sync_target's common case, read under the write lock:
 * the engine neither failed nor closes (life.blocked is False) */
int
ls_writer_sync_target(PyObject *obj, long long timeout_us, long long *pos, int *fd)
{
    WriterBase *w = (WriterBase *)obj;
    PyObject *lock = w->lock;
    if (!ls_lock_acquire_nogil(lock, timeout_us)) {
        return -1;
    }
    LifeBase *life = (LifeBase *)w->life;
    PyObject *active = ((SegmentSetBase *)w->segments)->active;
    int done = 0;
    if (life->blocked == Py_False && active != NULL && PyObject_TypeCheck(active, &SegmentBaseType)) {
        *pos = ((AppendBase *)w->appender)->written_pos;
        *fd = ((SegmentBase *)active)->fd;
        done = 1;
    }
    ls_lock_release_nogil(lock);
    return done;
}

static PyMethodDef fast_functions[] = {
    {"encode_keys", (PyCFunction)(void (*)(void))encode_keys, METH_FASTCALL,
     "encode_keys(ns_bytes, keys, values, checkpoint) -> bytes: the body of a flush's group "
     "record."},
    {"index_keys", (PyCFunction)(void (*)(void))index_keys, METH_FASTCALL,
     "index_keys(index, ns_size, keys, values, high, op_offset) -> int: a flush's index "
     "update; the change of live bytes."},
    {NULL, NULL, 0, NULL},
};

static int
intern(PyObject **slot, const char *text)
{
    *slot = PyUnicode_InternFromString(text);
    return *slot == NULL ? -1 : 0;
}

int
ls_fast_init(PyObject *module)
{
    if (intern(&str_set_python, "_set_python") < 0 || intern(&str_get_python, "_get_python") < 0
        || intern(&str_fail, "fail") < 0 || intern(&str_settle, "settle") < 0
        || intern(&str_backlog, "backlog") < 0 || intern(&str_compacting, "compacting") < 0
        || intern(&str_max_body, "_MAX_BODY_SIZE") < 0 || intern(&str_append, "append") < 0
        || intern(&str_deliver, "deliver") < 0 || intern(&str_hold_back, "_hold_back") < 0) {
        return -1;
    }
    PyObject *collections = PyImport_ImportModule("collections");
    if (collections == NULL) {
        return -1;
    }
    deque_type = (PyTypeObject *)PyObject_GetAttrString(collections, "deque");
    Py_DECREF(collections);
    if (deque_type == NULL) {
        return -1;
    }
    if (!PyType_Check(deque_type)) {
        Py_CLEAR(deque_type);
        PyErr_SetString(PyExc_TypeError, "collections.deque is not a type");
        return -1;
    }
    int_64 = PyLong_FromLong(64);
    int_74 = PyLong_FromLong(74);
    if (int_64 == NULL || int_74 == NULL) {
        return -1;
    }
    struct {
        PyTypeObject *type;
        const char *name;
    } types[] = {
        {&LockType, "Lock"},
        {&LifeBaseType, "LifeBase"},
        {&SegmentBaseType, "SegmentBase"},
        {&SegmentSetBaseType, "SegmentSetBase"},
        {&KeydirBaseType, "KeydirBase"},
        {&AppendBaseType, "AppendBase"},
        {&WriterBaseType, "WriterBase"},
        {&ReaderBaseType, "ReaderBase"},
        {&HandleBaseType, "HandleBase"},
    };
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
        if (PyType_Ready(types[i].type) < 0) {
            return -1;
        }
        Py_INCREF(types[i].type);
        if (PyModule_AddObject(module, types[i].name, (PyObject *)types[i].type) < 0) {
            Py_DECREF(types[i].type);
            return -1;
        }
    }
    if (PyModule_AddIntConstant(module, "FAST_MAX_KEY_SIZE", MAX_KEY_SIZE) < 0
        || PyModule_AddIntConstant(module, "FAST_TAG_BYTES", TAG_BYTES) < 0) {
        return -1;
    }
    if (PyModule_AddIntConstant(module, "FAST_RECORD_OVERHEAD", RECORD_OVERHEAD) < 0) {
        return -1;
    }
    return PyModule_AddFunctions(module, fast_functions);
}
