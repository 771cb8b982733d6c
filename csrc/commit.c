/* logstate._cnative: group commit (CommitBase, the C base of _commit.NativeCommit).
 *
 * Owns: the protocol of _commit.GroupCommit.commit (leader and followers,
 * the cohort wait, one fdatasync at a time) and .advance, with the GIL
 * released from a commit's arrival to the end of its round, and the state
 * they share (synced_pos, the round counters, the cohort's threads), kept
 * under a mutex of its own. GroupCommit (pure Python) is the reference: the
 * rules are its, copied here ("copy of" marks each), and
 * tests/test_commit.py and tests/test_commit_cohort.py run against both.
 *
 * Two ways to reach the disk. The fast one, with the engine's file system and
 * clock: the target is read under the write lock from the writer's C fields
 * (ls_writer_sync_target), the fdatasync is fdatasync(2), the time is
 * CLOCK_MONOTONIC, all without the GIL. Otherwise (a test's file system or
 * clock, no writer, or a writer whose engine failed or closes) the same
 * protocol calls the Python pieces with the GIL: self._target(),
 * self._fs.fdatasync(fd), self._clock(). The listener and the before-sync
 * hook are Python calls in both ways, made with the GIL and no mutex held.
 *
 * Must never: hold the mutex while it waits for the GIL, the turn or the
 * write lock (the mutex is a leaf: taken last, held for a few stores, or
 * while waiting on its own conditions, which release it); move synced_pos
 * before an fdatasync returned; sync after a failure (the target, read
 * under the write lock, refuses then); wait on anything without the GIL
 * for longer than SLICE_NS at a time without looking for a signal to handle.
 */
#include "native.h"

#include <errno.h>
#include <pthread.h>
#include <structmember.h>
#include <time.h>
#include <unistd.h>

/* copies of _commit's COHORT_ROUNDS and WAIT_FRACTION (asserted at import by _commit) */
#define COHORT_ROUNDS 4
#define WAIT_FRACTION 0.5
#define MAX_SLOTS 64           /* threads tracked for the cohort (more: the oldest dropped) */
#define SLICE_NS 20000000LL    /* 20 ms: the longest wait between two looks for a signal */

static PyTypeObject CommitBaseType;

typedef struct {
    unsigned long ident;   /* the thread */
    long long seen;        /* the round of its last commit (GroupCommit._seen) */
    long long pending;     /* the end of its last commit (GroupCommit._pending) */
} Slot;

typedef struct {
    PyObject_HEAD
    PyObject *turn;        /* the fdatasync turn: a _cnative.Lock */
    PyObject *writer;      /* None, or the Writer the fast target is read from */
    PyObject *listener;    /* None, or called with the new synced_pos after a sync */
    PyObject *before_sync; /* None, or set: self._offer(target) before the fdatasync */
    PyObject *native_sync; /* True: fdatasync(2); else self._fs.fdatasync */
    PyObject *native_clock;/* True: CLOCK_MONOTONIC; else self._clock() */
    /* under mu */
    pthread_mutex_t mu;
    pthread_cond_t round_cv;  /* a round ended (broadcast) */
    pthread_cond_t leader_cv; /* the waiting leader's cohort arrived */
    long long synced_pos;
    long long rounds;
    long long waits;
    long long waits_timed_out;
    double last_sync_s;
    double max_wait_s;
    int leading;           /* a round runs: its leader took the lead and has not ended it */
    int leader_waiting;    /* the leader waits for its cohort */
    long long expected;    /* the arrivals it waits for */
    int nslots;
    Slot slots[MAX_SLOTS];
} CommitBase;

static PyObject *str_target; /* "_target" */
static PyObject *str_fs;     /* "_fs" */
static PyObject *str_life;   /* "_life" */
static PyObject *str_clock;  /* "_clock" */
static PyObject *str_offer;  /* "_offer" */
static PyObject *str_fdatasync; /* "fdatasync" */
static PyObject *str_fail;   /* "fail" */

/* ----------------------------------------------------------------------- time */
static long long
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static struct timespec
deadline_ts(long long ns)
{
    struct timespec ts = {(time_t)(ns / 1000000000LL), (long)(ns % 1000000000LL)};
    return ts;
}

/* ----------------------------------------------------------------------- state (mu held) */
static int
init_sync(CommitBase *self)
{
    pthread_condattr_t attr;
    if (pthread_mutex_init(&self->mu, NULL) != 0) {
        return -1;
    }
    if (pthread_condattr_init(&attr) != 0) {
        return -1;
    }
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    int failed = pthread_cond_init(&self->round_cv, &attr) != 0
                 || pthread_cond_init(&self->leader_cv, &attr) != 0;
    pthread_condattr_destroy(&attr);
    return failed ? -1 : 0;
}

/* copy of GroupCommit._arrived: threads whose commit no sync covered yet */
static long long
arrived(const CommitBase *self)
{
    long long n = 0;
    for (int i = 0; i < self->nslots; i++) {
        n += self->slots[i].pending > self->synced_pos;
    }
    return n;
}

/* copy of the arrival in GroupCommit.commit (_pending, _seen) and _arrive */
static void
arrive(CommitBase *self, unsigned long me, long long end_pos)
{
    int at = -1;
    for (int i = 0; i < self->nslots; i++) {
        if (self->slots[i].ident == me) {
            at = i;
            break;
        }
    }
    if (at < 0) {
        if (self->nslots < MAX_SLOTS) {
            at = self->nslots++;
        }
        else { /* full: the thread that committed longest ago makes room */
            at = 0;
            for (int i = 1; i < self->nslots; i++) {
                if (self->slots[i].seen < self->slots[at].seen) {
                    at = i;
                }
            }
        }
        self->slots[at].ident = me;
    }
    self->slots[at].pending = end_pos;
    self->slots[at].seen = self->rounds;
}

/* The cohort wait's bound (mu held): copy of GroupCommit._await_cohort's
 * count of the cohort (threads gone from it dropped) and of its bound. 0: no
 * wait (fewer than two threads in the cohort, no bound); else the bound in
 * ns, with self->expected set. */
static long long
cohort_bound(CommitBase *self)
{
    long long low = self->rounds - COHORT_ROUNDS, expected = 0;
    int kept = 0;
    for (int i = 0; i < self->nslots; i++) {
        if (self->slots[i].seen >= low) {
            self->slots[kept++] = self->slots[i];
            expected++;
        }
    }
    self->nslots = kept;
    double bound_s = self->last_sync_s * WAIT_FRACTION;
    if (self->max_wait_s < bound_s) {
        bound_s = self->max_wait_s;
    }
    if (expected < 2 || !(bound_s > 0.0)) {
        return 0;
    }
    self->expected = expected;
    long long ns = (long long)(bound_s * 1e9);
    return ns > 0 ? ns : 1;
}

/* ----------------------------------------------------------------------- waits without the GIL */
/* The GIL for a moment, to run a signal's handler: 0, or -1 with its exception. */
static int
check_signals(PyThreadState **ts)
{
    PyEval_RestoreThread(*ts);
    int failed = PyErr_CheckSignals();
    *ts = PyEval_SaveThread();
    return failed;
}

/* Take a Lock without the GIL, looking for signals every SLICE_NS: 0, or -1
 * with an exception (a handler's). */
static int
acquire(PyObject *lock, PyThreadState **ts)
{
    while (!ls_lock_acquire_nogil(lock, SLICE_NS / 1000)) {
        if (check_signals(ts) < 0) {
            return -1;
        }
    }
    return 0;
}

/* mu held: wait for the round to end, at most SLICE_NS; at the end of the
 * slice a signal's handler runs. 0 (mu held, look again), or -1 with the
 * handler's exception (mu not held). */
static int
wait_round(CommitBase *self, PyThreadState **ts)
{
    struct timespec until = deadline_ts(now_ns() + SLICE_NS);
    if (pthread_cond_timedwait(&self->round_cv, &self->mu, &until) == ETIMEDOUT) {
        pthread_mutex_unlock(&self->mu);
        if (check_signals(ts) < 0) {
            return -1;
        }
        pthread_mutex_lock(&self->mu);
    }
    return 0;
}

/* ----------------------------------------------------------------------- the round's Python pieces */
/* The time in seconds (mu not held): CLOCK_MONOTONIC, or self._clock() with
 * the GIL. 0, or -1 with its exception. */
static int
clock_s(CommitBase *self, PyThreadState **ts, double *t)
{
    if (self->native_clock == Py_True) {
        *t = (double)now_ns() * 1e-9;
        return 0;
    }
    PyEval_RestoreThread(*ts);
    PyObject *fn = PyObject_GetAttr((PyObject *)self, str_clock);
    PyObject *r = fn ? PyObject_CallNoArgs(fn) : NULL;
    Py_XDECREF(fn);
    if (r != NULL) {
        *t = PyFloat_AsDouble(r);
        Py_DECREF(r);
    }
    int failed = PyErr_Occurred() ? -1 : 0;
    *ts = PyEval_SaveThread();
    return failed;
}

/* The target, in the turn: (written_pos, fd). 0, or -1 with an exception
 * (StorageFailedError, StorageClosedError: copy of Appender.sync_target's
 * refusal, which the Python target raises). */
static int
read_target(CommitBase *self, PyObject *writer, PyThreadState **ts, long long *pos, int *fd)
{
    if (writer != NULL) {
        int r;
        while ((r = ls_writer_sync_target(writer, SLICE_NS / 1000, pos, fd)) < 0) {
            if (check_signals(ts) < 0) { /* (the write lock not taken within the slice) */
                return -1;
            }
        }
        if (r == 1) {
            return 0;
        }
        /* 0: the engine failed, closes or is closed: the Python target decides */
    }
    PyEval_RestoreThread(*ts);
    int failed = -1;
    PyObject *fn = PyObject_GetAttr((PyObject *)self, str_target);
    PyObject *r = fn ? PyObject_CallNoArgs(fn) : NULL;
    Py_XDECREF(fn);
    if (r != NULL) {
        if (!PyTuple_Check(r)) {
            PyErr_SetString(PyExc_TypeError, "the sync target is (int, int)");
        }
        else if (PyArg_ParseTuple(r, "Li;the sync target is (int, int)", pos, fd)) {
            failed = 0;
        }
        Py_DECREF(r);
    }
    *ts = PyEval_SaveThread();
    return failed;
}

/* copy of GroupCommit.commit's "try: fdatasync except OSError: life.fail(exc); raise":
 * 0, or -1 with the exception (the GIL taken for it) */
static int
sync_fd(CommitBase *self, PyThreadState **ts, int fd)
{
    if (self->native_sync == Py_True) {
        int error = 0;
        while (fdatasync(fd) != 0) {
            error = errno;
            if (error != EINTR) {
                break; /* (EINTR: nothing failed; a signal's handler runs at the next slice) */
            }
            error = 0;
        }
        if (error == 0) {
            return 0;
        }
        PyEval_RestoreThread(*ts);
        errno = error;
        PyErr_SetFromErrno(PyExc_OSError);
    }
    else {
        PyEval_RestoreThread(*ts);
        PyObject *fs = PyObject_GetAttr((PyObject *)self, str_fs);
        PyObject *fd_obj = fs ? PyLong_FromLong(fd) : NULL;
        PyObject *r = fd_obj ? PyObject_CallMethodOneArg(fs, str_fdatasync, fd_obj) : NULL;
        Py_XDECREF(fd_obj);
        Py_XDECREF(fs);
        if (r != NULL) {
            Py_DECREF(r);
            *ts = PyEval_SaveThread();
            return 0;
        }
    }
    /* the GIL held, an exception set */
    if (PyErr_ExceptionMatches(PyExc_OSError)) {
        PyObject *exc = ls_take_exception();
        PyObject *life = exc ? PyObject_GetAttr((PyObject *)self, str_life) : NULL;
        PyObject *r = life ? PyObject_CallMethodOneArg(life, str_fail, exc) : NULL;
        Py_XDECREF(life);
        if (r == NULL) {
            Py_XDECREF(exc); /* (fail's own error is raised) */
        }
        else {
            Py_DECREF(r);
            ls_raise_exception(exc);
        }
    }
    *ts = PyEval_SaveThread();
    return -1;
}

/* A Python call with the GIL (mu not held): self._offer(target) (listener
 * 0) or self.listener(target) (listener 1; None: nothing). 0, or -1 with its
 * exception. */
static int
call_with_gil(CommitBase *self, PyThreadState **ts, int listener, long long target)
{
    PyEval_RestoreThread(*ts);
    int failed = 0;
    PyObject *fn = listener ? Py_NewRef(self->listener ? self->listener : Py_None) : NULL;
    if (!listener || fn != Py_None) {
        failed = -1;
        PyObject *arg = PyLong_FromLongLong(target);
        if (arg != NULL) {
            PyObject *r = listener ? PyObject_CallOneArg(fn, arg)
                                   : PyObject_CallMethodOneArg((PyObject *)self, str_offer, arg);
            Py_DECREF(arg);
            if (r != NULL) {
                Py_DECREF(r);
                failed = 0;
            }
        }
    }
    Py_XDECREF(fn);
    *ts = PyEval_SaveThread();
    return failed;
}

/* ----------------------------------------------------------------------- commit */
/* End the round (mu not held): the next leader may start, followers look again. */
static void
end_round(CommitBase *self)
{
    pthread_mutex_lock(&self->mu);
    self->leading = 0;
    pthread_cond_broadcast(&self->round_cv);
    pthread_mutex_unlock(&self->mu);
}

/* The leader's round (the cohort waited for already), mu not held, the GIL
 * released: 0, or -1 with an exception. call->writer: read the target from
 * it without Python (NULL: self._target()). */
static int
lead(CommitBase *self, LsCommitCall *call, PyThreadState **ts, long long end_pos)
{
    PyObject *turn = call->turn;
    if (acquire(turn, ts) < 0) {
        end_round(self);
        return -1;
    }
    int failed = -1;
    pthread_mutex_lock(&self->mu);
    int covered = self->synced_pos >= end_pos; /* (another writer's or a roll's sync) */
    int cohort = self->nslots > 1; /* (one thread: no timing) */
    long long synced = self->synced_pos;
    pthread_mutex_unlock(&self->mu);
    if (covered) {
        failed = 0;
        goto done;
    }
    long long target;
    int fd;
    if (read_target(self, call->writer, ts, &target, &fd) < 0) {
        goto done;
    }
    /* (before_sync read without the GIL: a pointer, set before the commits it is for) */
    if (self->before_sync != NULL && self->before_sync != Py_None && target > synced
        && call_with_gil(self, ts, 0, target) < 0) { /* (_offer logs the hook's error) */
        goto done;
    }
    double started = 0.0, ended = 0.0;
    if (cohort && clock_s(self, ts, &started) < 0) {
        goto done;
    }
    if (sync_fd(self, ts, fd) < 0) {
        goto done;
    }
    if (cohort && clock_s(self, ts, &ended) < 0) {
        goto done;
    }
    int moved = 0;
    pthread_mutex_lock(&self->mu);
    if (cohort) {
        self->last_sync_s = ended - started;
    }
    self->rounds++;
    if (target > self->synced_pos) {
        self->synced_pos = target;
        moved = 1;
    }
    pthread_mutex_unlock(&self->mu);
    failed = moved ? call_with_gil(self, ts, 1, target) : 0;
done:
    end_round(self);
    ls_lock_release_nogil(turn);
    return failed;
}

/* ls_commit_begin: with the GIL. See native.h. */
int
ls_commit_begin(PyObject *obj, LsCommitCall *call)
{
    CommitBase *self = (CommitBase *)obj;
    if (self->turn == NULL || !ls_lock_check(self->turn)) {
        PyErr_SetString(PyExc_TypeError, "the sync turn must be a logstate._cnative.Lock");
        return -1;
    }
    call->commit = Py_NewRef(obj);
    call->turn = Py_NewRef(self->turn); /* (after_fork may replace the field) */
    int fast = self->native_sync == Py_True && self->writer != NULL && self->writer != Py_None
               && ls_writer_check(self->writer);
    call->writer = fast ? Py_NewRef(self->writer) : NULL; /* (held: read without the GIL) */
    call->me = PyThread_get_thread_ident();
    return 0;
}

/* ls_commit_end: with the GIL. */
void
ls_commit_end(LsCommitCall *call)
{
    Py_CLEAR(call->writer);
    Py_CLEAR(call->turn);
    Py_CLEAR(call->commit);
}

/* ls_commit_run: copy of GroupCommit.commit, without the GIL. The leader
 * returns after its round, whatever it covered (as GroupCommit's); a
 * follower when a round covered it. */
int
ls_commit_run(LsCommitCall *call, long long end_pos, PyThreadState **ts)
{
    CommitBase *self = (CommitBase *)call->commit;
    int failed = 0;
    pthread_mutex_lock(&self->mu);
    arrive(self, call->me, end_pos);
    while (self->synced_pos < end_pos) {
        if (self->leading) { /* a round runs: wait for its end, then look again */
            if (wait_round(self, ts) < 0) {
                return -1;
            }
            continue;
        }
        if (self->leader_waiting) {
            /* A thread waits for its cohort (GroupCommit._await_cohort): the
             * arrival that completes it leads the round itself, at once,
             * instead of waking that thread to lead it (a wake-up less
             * between two syncs); the waiting thread then waits for the
             * round as a follower. */
            if (arrived(self) < self->expected) {
                if (wait_round(self, ts) < 0) {
                    return -1;
                }
                continue;
            }
            self->leader_waiting = 0;
            pthread_cond_signal(&self->leader_cv);
        }
        else if (self->nslots > 1) {
            long long bound_ns = cohort_bound(self);
            if (bound_ns > 0 && arrived(self) < self->expected) {
                self->waits++;
                self->leader_waiting = 1;
                long long deadline = now_ns() + bound_ns;
                while (self->leader_waiting) {
                    long long now = now_ns(), until_ns = deadline;
                    if (now >= deadline) {
                        break;
                    }
                    if (until_ns - now > SLICE_NS) {
                        until_ns = now + SLICE_NS;
                    }
                    struct timespec until = deadline_ts(until_ns);
                    if (pthread_cond_timedwait(&self->leader_cv, &self->mu, &until) == ETIMEDOUT
                        && until_ns < deadline) {
                        /* a slice ended: a signal's handler may raise; then the
                         * wait ends, and a waiting arrival may lead instead */
                        pthread_mutex_unlock(&self->mu);
                        int interrupted = check_signals(ts);
                        pthread_mutex_lock(&self->mu);
                        if (interrupted < 0) {
                            if (self->leader_waiting) {
                                self->leader_waiting = 0;
                                pthread_cond_broadcast(&self->round_cv);
                            }
                            pthread_mutex_unlock(&self->mu);
                            return -1;
                        }
                    }
                }
                if (!self->leader_waiting) {
                    continue; /* the last arrival leads: wait for its round */
                }
                self->leader_waiting = 0;
                if (arrived(self) < self->expected) {
                    self->waits_timed_out++;
                }
            }
        }
        self->leading = 1;
        pthread_mutex_unlock(&self->mu);
        return lead(self, call, ts, end_pos);
    }
    pthread_mutex_unlock(&self->mu);
    return failed;
}

static PyObject *commit_commit(CommitBase *self, PyObject *arg);

/* ls_commit_of: with the GIL. See native.h. */
PyObject *
ls_commit_of(PyObject *bound)
{
    if (bound == NULL || !PyCFunction_Check(bound)
        || PyCFunction_GET_FUNCTION(bound) != (PyCFunction)commit_commit) {
        return NULL;
    }
    PyObject *self = PyCFunction_GET_SELF(bound);
    return self != NULL && PyObject_TypeCheck(self, &CommitBaseType) ? self : NULL;
}

/* commit(end_pos): see ls_commit_run */
static PyObject *
commit_commit(CommitBase *self, PyObject *arg)
{
    long long end_pos = PyLong_AsLongLong(arg);
    if (end_pos == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (self->synced_pos >= end_pos) { /* (a racing store only moves it forward) */
        Py_RETURN_NONE;
    }
    LsCommitCall call;
    if (ls_commit_begin((PyObject *)self, &call) < 0) {
        return NULL;
    }
    PyThreadState *ts = PyEval_SaveThread();
    int failed = ls_commit_run(&call, end_pos, &ts);
    PyEval_RestoreThread(ts);
    ls_commit_end(&call);
    if (failed) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* advance(durable_pos): copy of GroupCommit.advance (a roll synced it) */
static PyObject *
commit_advance(CommitBase *self, PyObject *arg)
{
    long long pos = PyLong_AsLongLong(arg);
    if (pos == -1 && PyErr_Occurred()) {
        return NULL;
    }
    pthread_mutex_lock(&self->mu);
    if (self->synced_pos < pos) {
        self->synced_pos = pos;
    }
    pthread_mutex_unlock(&self->mu);
    Py_RETURN_NONE;
}

/* _reset_after_fork(): in a forked child, new mutex and conditions (a
 * parent thread may have held the mutex) and no round, no cohort */
static PyObject *
commit_reset_after_fork(CommitBase *self, PyObject *unused)
{
    if (init_sync(self) < 0) {
        PyErr_SetString(PyExc_OSError, "cannot make the group commit's mutex");
        return NULL;
    }
    self->leading = 0;
    self->leader_waiting = 0;
    self->nslots = 0;
    Py_RETURN_NONE;
}

/* _state(): (leading, leader_waiting, threads tracked, arrived) read at once (tests, _check) */
static PyObject *
commit_state(CommitBase *self, PyObject *unused)
{
    pthread_mutex_lock(&self->mu);
    int leading = self->leading, waiting = self->leader_waiting, tracked = self->nslots;
    long long n = arrived(self);
    pthread_mutex_unlock(&self->mu);
    return Py_BuildValue("(OOiL)", leading ? Py_True : Py_False, waiting ? Py_True : Py_False,
                         tracked, n);
}

/* _pending_of(ident): the end of the thread's last commit, or None (tests) */
static PyObject *
commit_pending_of(CommitBase *self, PyObject *arg)
{
    unsigned long ident = PyLong_AsUnsignedLong(arg);
    if (ident == (unsigned long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    long long end = -1;
    pthread_mutex_lock(&self->mu);
    for (int i = 0; i < self->nslots; i++) {
        if (self->slots[i].ident == ident) {
            end = self->slots[i].pending;
        }
    }
    pthread_mutex_unlock(&self->mu);
    if (end < 0) {
        Py_RETURN_NONE;
    }
    return PyLong_FromLongLong(end);
}

/* _hold_mutex(), _release_mutex(): tests (tests/test_fork.py) hold the mutex
 * as a thread inside the protocol does, to fork with it held. With the GIL:
 * no holder of the mutex ever waits for the GIL. */
static PyObject *
commit_hold_mutex(CommitBase *self, PyObject *unused)
{
    pthread_mutex_lock(&self->mu);
    Py_RETURN_NONE;
}

static PyObject *
commit_release_mutex(CommitBase *self, PyObject *unused)
{
    pthread_mutex_unlock(&self->mu);
    Py_RETURN_NONE;
}

/* ----------------------------------------------------------------------- the type */
static PyObject *
commit_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    CommitBase *self = (CommitBase *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    if (init_sync(self) < 0) {
        Py_DECREF(self);
        PyErr_SetString(PyExc_OSError, "cannot make the group commit's mutex");
        return NULL;
    }
    self->max_wait_s = 200e-6;
    PyObject **fields[] = {&self->writer, &self->listener, &self->before_sync,
                           &self->native_sync, &self->native_clock};
    for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++) {
        *fields[i] = Py_NewRef(i < 3 ? Py_None : Py_False);
    }
    return (PyObject *)self;
}

static int
commit_traverse(CommitBase *self, visitproc visit, void *arg)
{
    Py_VISIT(self->turn);
    Py_VISIT(self->writer);
    Py_VISIT(self->listener);
    Py_VISIT(self->before_sync);
    Py_VISIT(self->native_sync);
    Py_VISIT(self->native_clock);
    return 0; /* (a heap subclass's own traverse visits its type) */
}

static int
commit_clear(CommitBase *self)
{
    Py_CLEAR(self->turn);
    Py_CLEAR(self->writer);
    Py_CLEAR(self->listener);
    Py_CLEAR(self->before_sync);
    Py_CLEAR(self->native_sync);
    Py_CLEAR(self->native_clock);
    return 0;
}

static void
commit_dealloc(CommitBase *self)
{
    PyObject_GC_UnTrack(self);
    commit_clear(self);
    pthread_cond_destroy(&self->round_cv);
    pthread_cond_destroy(&self->leader_cv);
    pthread_mutex_destroy(&self->mu);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

#define OBJ(name, field) {name, T_OBJECT_EX, offsetof(CommitBase, field), 0, NULL}
#define RO(name, field) {name, T_LONGLONG, offsetof(CommitBase, field), READONLY, NULL}

static PyMemberDef commit_members[] = {
    OBJ("turn", turn),
    OBJ("writer", writer),
    OBJ("listener", listener),
    OBJ("before_sync", before_sync),
    OBJ("_native_sync", native_sync),
    OBJ("_native_clock", native_clock),
    RO("synced_pos", synced_pos),
    RO("rounds", rounds),
    RO("waits", waits),
    RO("waits_timed_out", waits_timed_out),
    {"max_wait_s", T_DOUBLE, offsetof(CommitBase, max_wait_s), 0, NULL},
    {"_last_sync_s", T_DOUBLE, offsetof(CommitBase, last_sync_s), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyMethodDef commit_methods[] = {
    {"commit", (PyCFunction)commit_commit, METH_O,
     "commit(end_pos): every byte up to end_pos durable; concurrent callers share one sync."},
    {"advance", (PyCFunction)commit_advance, METH_O,
     "advance(durable_pos): every byte up to durable_pos is durable (a roll synced it)."},
    {"_reset_after_fork", (PyCFunction)commit_reset_after_fork, METH_NOARGS,
     "In a forked child: a new mutex, no round, no cohort."},
    {"_state", (PyCFunction)commit_state, METH_NOARGS,
     "(leading, leader_waiting, threads tracked, arrived), read at once."},
    {"_pending_of", (PyCFunction)commit_pending_of, METH_O,
     "_pending_of(ident): the end of that thread's last commit, or None."},
    {"_hold_mutex", (PyCFunction)commit_hold_mutex, METH_NOARGS, "Tests: take the mutex."},
    {"_release_mutex", (PyCFunction)commit_release_mutex, METH_NOARGS,
     "Tests: release the mutex _hold_mutex took."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CommitBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "logstate._cnative.CommitBase",
    .tp_basicsize = sizeof(CommitBase),
    .tp_dealloc = (destructor)commit_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The C protocol of _commit.GroupCommit (commit, advance): _commit.NativeCommit.",
    .tp_traverse = (traverseproc)commit_traverse,
    .tp_clear = (inquiry)commit_clear,
    .tp_members = commit_members,
    .tp_methods = commit_methods,
    .tp_new = commit_new,
};

int
ls_commit_init(PyObject *module)
{
    struct {
        PyObject **slot;
        const char *text;
    } names[] = {
        {&str_target, "_target"}, {&str_fs, "_fs"},       {&str_life, "_life"},
        {&str_clock, "_clock"},   {&str_offer, "_offer"}, {&str_fdatasync, "fdatasync"},
        {&str_fail, "fail"},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if ((*names[i].slot = PyUnicode_InternFromString(names[i].text)) == NULL) {
            return -1;
        }
    }
    if (PyType_Ready(&CommitBaseType) < 0) {
        return -1;
    }
    Py_INCREF(&CommitBaseType);
    if (PyModule_AddObject(module, "CommitBase", (PyObject *)&CommitBaseType) < 0) {
        Py_DECREF(&CommitBaseType);
        return -1;
    }
    return PyModule_AddIntConstant(module, "COMMIT_COHORT_ROUNDS", COHORT_ROUNDS);
}
