/* logstate._cnative: the C core's shared declarations.
 *
 * One extension module, one C file per part; each part adds its types and
 * functions to the module in its own init function, called by module.c.
 * Public C API only (no private CPython calls): it must build on 3.10-3.13.
 */
#ifndef LOGSTATE_NATIVE_H
#define LOGSTATE_NATIVE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>

/* crc.c: CRC-32C, the CPU instruction where there is one, else a table */
uint32_t ls_crc32c(uint32_t crc, const void *data, size_t size);
int ls_crc_init(PyObject *module);

/* keymap.c: the compact index (KeyMap) */
int ls_keymap_init(PyObject *module);
/* keymap.c, C API for other parts: a KeyMap by a key's UTF-8 bytes (valid
 * UTF-8: the caller checks) and a location as two u64 (lo: bits 0..63,
 * hi: bits 64..127), no Python object made. h is ls_keymap_hash(key, len).
 * Results: LS_KM_ABSENT (no such key), LS_KM_INT (old location in old[]
 * / loc[]), LS_KM_SIDE (the old value is a side object, e.g. a compressed
 * group's tuple: set and delete then change nothing), -1 with an error set. */
#define LS_KM_ABSENT 0
#define LS_KM_INT 1
#define LS_KM_SIDE 2
int ls_keymap_check_exact(PyObject *obj); /* a KeyMap (not a subclass) */
uint64_t ls_keymap_hash(const unsigned char *key, size_t len);
int ls_keymap_find(PyObject *map, const unsigned char *key, size_t len, uint64_t h, uint64_t loc[2]);
/* lo's kind (bits 0..1) must not be 3; len at most 0xFFFFFF */
int ls_keymap_set(PyObject *map, const unsigned char *key, size_t len, uint64_t h, uint64_t lo,
                  uint64_t hi, uint64_t old[2]);
/* make room for one new key of len bytes, so that a following ls_keymap_set of
 * it (with no other change between) cannot fail: 0, or -1 with an exception */
int ls_keymap_reserve(PyObject *map, size_t len);
int ls_keymap_delete(PyObject *map, const unsigned char *key, size_t len, uint64_t h,
                     uint64_t old[2]);
/* a hint only (no effect on the contents): bring the table slot of hash h,
 * then (once that is in cache) the first records it probes, into cache */
void ls_keymap_prefetch_slot(PyObject *map, uint64_t h);
void ls_keymap_prefetch_keys(PyObject *map, uint64_t h);
/* end of keymap.c's block */

/* fast.c: the hot paths of set, get and flush */
int ls_fast_init(PyObject *module);

/* fast.c: the raised exception taken out (a new reference, or NULL), and
 * raised again (stolen); the API of each Python version (3.12 changed it) */
PyObject *ls_take_exception(void);
void ls_raise_exception(PyObject *exc);

/* fast.c, for commit.c: the write lock and the sync target. The _nogil
 * calls may run without the GIL; the checks need it. */
int ls_lock_check(PyObject *obj); /* a _cnative.Lock */
/* 1: acquired within timeout_us (-1: no limit), 0: not */
int ls_lock_acquire_nogil(PyObject *lock, long long timeout_us);
void ls_lock_release_nogil(PyObject *lock);
/* a WriterBase whose lock, life, appender and segments have their C types */
int ls_writer_check(PyObject *writer);
/* under the writer's lock (taken within timeout_us, else -1): 1 with the
 * sync target (written_pos, the active segment's fd), or 0 when the engine
 * is blocked (failed, closing, closed, read-only): its Python target decides */
int ls_writer_sync_target(PyObject *writer, long long timeout_us, long long *pos, int *fd);

/* commit.c: group commit (CommitBase) */
int ls_commit_init(PyObject *module);
/* For fast.c: a set's commit with the GIL released once, for its write and
 * its commit. ls_commit_of (GIL): the CommitBase whose bound method commit
 * is (borrowed), or NULL (another callable: call it). ls_commit_begin
 * (GIL): 0, or -1 with an exception; ls_commit_run (no GIL, *ts the
 * caller's saved thread state, which it may restore and save again to run
 * a Python piece or a signal's handler): 0, or -1 with an exception;
 * ls_commit_end (GIL): after a begin that returned 0, always. */
typedef struct {
    PyObject *commit;
    PyObject *turn;
    PyObject *writer; /* NULL: the Python target and sync */
    unsigned long me;
} LsCommitCall;
PyObject *ls_commit_of(PyObject *bound);
int ls_commit_begin(PyObject *commit, LsCommitCall *call);
int ls_commit_run(LsCommitCall *call, long long end_pos, PyThreadState **ts);
void ls_commit_end(LsCommitCall *call);

/* scan.c: the segment scanner of an open without a snapshot */
int ls_scan_init(PyObject *module);

#endif
