/*
 * tracer._fastpath: the --trace hot path of tracer.runner in C.
 *
 * Under --trace (--summary, --record) every syscall stops twice: at its seccomp
 * stop and at its syscall-exit stop.  For the calls Python marked "fast" (known
 * to the table, not intercepted, every argument format one this file renders,
 * no fork/exec/exit event inside) this loop does what tracer.runner and
 * tracer.machine would do for those two stops: wait4, PTRACE_GET_SYSCALL_INFO,
 * the strace-like line (byte for byte tracer.decode.Formatter's), the per-call
 * statistics, and the resume.  Every other stop is returned to Python with the
 * loop's state of that thread (its call in flight, if any), which the loop then
 * forgets: Python's machine is then exactly where it would have been had it seen
 * every stop itself.
 *
 * The tables it renders with (syscall names and formats, errno names, signal
 * names, O_* flags) are handed in by Python, so the two paths share one source.
 *
 * Without --trace it can also let go, at their seccomp stop, the calls a
 * coordinator traps for the paths under a few prefixes alone (an instance
 * tracer's: /proc for siblings held elsewhere, issue 11, and the view's maps): a
 * call whose path cannot be under one, or a listing of another directory, is
 * resumed here with no round trip through Python (`skip`, `may_name`).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/resource.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_NR 1024
#define STRING_LIMIT 32
#define PATH_LIMIT 4096
#define EVENT_SECCOMP 7
#define OP_EXIT 2
#define REQ_CONT 7
#define REQ_SYSCALL 24
#define REQ_GET_SYSCALL_INFO 0x420e
#define AUDIT_ARCH_X86_64 0xc000003eu
#define WALL_FLAG 0x40000000
#define O_CREAT_BIT 0100
#define O_TMPFILE_BIT 020000000
#define AT_FDCWD_VALUE (-100)
#define MAX_PREFIXES 64

/* Argument formats (tracer.syscalls.ARG_FORMATS), as tracer.decode renders them. */
enum fmt {
    F_OTHER, F_STRING, F_FD, F_DIRFD, F_BUF_IN, F_BUF_OUT, F_OFLAGS, F_PROT, F_MODE,
    F_SIGNO, F_INT, F_SIZE, F_PTR, F_UNSUPPORTED
};

enum flag { K_KNOWN = 1, K_FAST = 2, K_POINTER = 4, K_READ_ENTRY = 8, K_READ_EXIT = 16 };

/* Loop.skip: how a skippable call names what it touches (0: not skippable). */
enum skip { S_NONE = 0, S_LISTING = 1, S_PATH0 = 2 /* S_PATH0 + i: path in argument i */ };

struct spec {
    char name[32];
    uint8_t nargs;
    uint8_t fmt[6];
    uint8_t flags;
    int8_t oflags_at;
};

struct buf {
    char *data;
    size_t len, cap;
};

/* One thread's call in flight (the loop's own), or a thread Python holds. */
struct task {
    int tid;
    int held;  /* Python's machine has a call in flight for it: hands off */
    int pending;
    int nr;
    uint64_t args[6];
    double started;
    int has_text;
    struct buf text;
};

struct ptrace_info {
    uint8_t op;
    uint8_t pad[3];
    uint32_t arch;
    uint64_t ip, sp;
    union {
        struct { uint64_t nr, args[6]; } entry;
        struct { int64_t rval; uint8_t is_error; } exit;
        struct { uint64_t nr, args[6]; uint32_t ret_data; } seccomp;
    };
};

typedef struct {
    PyObject_HEAD
    struct spec specs[MAX_NR];
    const char *errnames[4096];
    const char *signames[65];
    uint64_t oflag_bits[32];
    const char *oflag_names[32];
    int n_oflags;
    PyObject *keep;  /* owns the strings the tables point into */
    PyObject *sink;  /* str -> None (Output.write), or None: statistics only */
    int has_sink;
    PyObject *error;  /* PtraceRequestError(pid, request, errno) */
    int line_buffered;
    struct buf out;
    struct buf scratch;  /* strings read from a tracee, reused from call to call */
    struct task *tasks;
    size_t n_tasks, cap_tasks;
    uint8_t skip[MAX_NR];  /* enum skip, per call number */
    char *prefixes[MAX_PREFIXES];  /* what a skipped call cannot name (no trailing slash) */
    size_t prefix_lens[MAX_PREFIXES];
    int n_prefixes;
    uint64_t calls[MAX_NR], errors[MAX_NR];
    double seconds[MAX_NR];
    long page;
} Loop;

/* ---- small buffers ------------------------------------------------------ */

static int buf_reserve(struct buf *b, size_t more) {
    if (b->len + more <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + more) cap *= 2;
    char *p = realloc(b->data, cap);  /* not PyMem: the loop runs without the GIL */
    if (!p) return -1;
    b->data = p;
    b->cap = cap;
    return 0;
}

static int put(struct buf *b, const char *s, size_t n) {
    if (buf_reserve(b, n)) return -1;
    memcpy(b->data + b->len, s, n);
    b->len += n;
    return 0;
}

static int puts_(struct buf *b, const char *s) { return put(b, s, strlen(s)); }

static int putf(struct buf *b, const char *fmt, unsigned long long v, int is_signed) {
    char tmp[32];
    int n = is_signed ? snprintf(tmp, sizeof tmp, fmt, (long long)v)
                      : snprintf(tmp, sizeof tmp, fmt, v);
    return put(b, tmp, (size_t)n);
}

static int put_hex(struct buf *b, uint64_t v) { return putf(b, "0x%llx", v, 0); }
static int put_udec(struct buf *b, uint64_t v) { return putf(b, "%llu", v, 0); }
static int put_sdec(struct buf *b, int64_t v) { return putf(b, "%lld", (uint64_t)v, 1); }

/* ---- the tracee's memory ------------------------------------------------ */

static ssize_t read_memory(int pid, uint64_t addr, size_t size, char *into) {
    if (size == 0 || addr == 0) return 0;
    struct iovec local = {into, size}, remote = {(void *)(uintptr_t)addr, size};
    ssize_t n = process_vm_readv(pid, &local, 1, &remote, 1, 0);
    return n > 0 ? n : 0;
}

/* tracer.ptraceio.read_string: a NUL-terminated string, read within pages (a
   string ending just before an unmapped page is found).  Returns its length, or
   -1 at a bad address; `*into` holds it. */
static ssize_t read_string(Loop *self, int pid, uint64_t addr, struct buf *into) {
    into->len = 0;
    if (addr == 0) return -1;
    while (into->len < PATH_LIMIT) {
        size_t chunk = (size_t)(self->page - (long)(addr % (uint64_t)self->page));
        if (chunk > PATH_LIMIT - into->len) chunk = PATH_LIMIT - into->len;
        /* Most strings are short: read a little first (a page is all or nothing). */
        if (chunk > 256) chunk = 256;
        if (buf_reserve(into, chunk)) return -2;
        ssize_t n = read_memory(pid, addr, chunk, into->data + into->len);
        if (n <= 0) return into->len ? (ssize_t)into->len : -1;
        char *nul = memchr(into->data + into->len, 0, (size_t)n);
        if (nul) {
            into->len = (size_t)(nul - into->data);
            return (ssize_t)into->len;
        }
        into->len += (size_t)n;
        addr += (uint64_t)n;
    }
    return (ssize_t)into->len;
}

/* ---- rendering (tracer.decode) ------------------------------------------ */

/* tracer.decode.quote */
static int quote(struct buf *b, const unsigned char *data, size_t n, size_t limit) {
    size_t shown = n < limit ? n : limit;
    if (buf_reserve(b, shown * 4 + 8)) return -1;
    char *p = b->data + b->len;
    *p++ = '"';
    for (size_t i = 0; i < shown; i++) {
        unsigned char c = data[i];
        if (c == '"' || c == '\\') { *p++ = '\\'; *p++ = (char)c; }
        else if (c == '\n') { *p++ = '\\'; *p++ = 'n'; }
        else if (c == '\t') { *p++ = '\\'; *p++ = 't'; }
        else if (c >= 32 && c < 127) *p++ = (char)c;
        else if (i + 1 < shown && data[i + 1] >= '0' && data[i + 1] <= '9')
            p += sprintf(p, "\\%03o", c);
        else
            p += sprintf(p, "\\%o", c);
    }
    *p++ = '"';
    b->len = (size_t)(p - b->data);
    if (n > limit) return put(b, "...", 3);
    return 0;
}

/* tracer.decode.flags */
static int put_flags(struct buf *b, uint64_t value, const uint64_t *bits, const char *const *names,
                     int count, const char *base) {
    int any = 0;
    if (base && *base) { if (puts_(b, base)) return -1; any = 1; }
    for (int i = 0; i < count; i++) {
        if (bits[i] && (value & bits[i]) == bits[i]) {
            if (any && put(b, "|", 1)) return -1;
            if (puts_(b, names[i])) return -1;
            any = 1;
            value &= ~bits[i];
        }
    }
    if (value) {
        if (any && put(b, "|", 1)) return -1;
        if (put_hex(b, value)) return -1;
        any = 1;
    }
    return any ? 0 : put(b, "0", 1);
}

static const uint64_t PROT_BITS[] = {1, 2, 4};
static const char *const PROT_NAMES[] = {"PROT_READ", "PROT_WRITE", "PROT_EXEC"};

static int render_arg(Loop *self, struct buf *b, int pid, int fmt, uint64_t v, uint64_t size,
                      int64_t rval, struct buf *scratch) {
    unsigned char mem[STRING_LIMIT + 1];
    ssize_t n;
    switch (fmt) {
    case F_STRING:
        if (!v) return puts_(b, "NULL");
        n = read_string(self, pid, v, scratch);
        if (n == -2) return -1;  /* out of memory */
        if (n < 0) return put_hex(b, v);
        return quote(b, (unsigned char *)scratch->data, (size_t)n, PATH_LIMIT);
    case F_FD:
    case F_INT:
        return put_sdec(b, (int32_t)(uint32_t)v);
    case F_DIRFD:
        if ((int32_t)(uint32_t)v == AT_FDCWD_VALUE) return puts_(b, "AT_FDCWD");
        return put_sdec(b, (int32_t)(uint32_t)v);
    case F_BUF_IN:
        n = read_memory(pid, v, size < STRING_LIMIT + 1 ? size : STRING_LIMIT + 1, (char *)mem);
        return quote(b, mem, (size_t)n, STRING_LIMIT);
    case F_BUF_OUT:
        if (rval < 0 || !v) return put_hex(b, v);
        n = read_memory(pid, v, (uint64_t)rval < STRING_LIMIT + 1 ? (size_t)rval : STRING_LIMIT + 1,
                        (char *)mem);
        return quote(b, mem, (size_t)n, STRING_LIMIT);
    case F_OFLAGS: {
        uint64_t value = v & 0xffffffffu;
        static const char *const acc[] = {"O_RDONLY", "O_WRONLY", "O_RDWR", "3"};
        return put_flags(b, value & ~(uint64_t)3, self->oflag_bits, self->oflag_names,
                         self->n_oflags, acc[value & 3]);
    }
    case F_PROT:
        if (!v) return puts_(b, "PROT_NONE");
        return put_flags(b, v & 0xffffffffu, PROT_BITS, PROT_NAMES, 3, NULL);
    case F_MODE:
        return putf(b, "0%llo", v & 07777, 0);
    case F_SIGNO:
        if (v < 65 && self->signames[v]) return puts_(b, self->signames[v]);
        return put_udec(b, v);
    case F_SIZE:
        return put_udec(b, v);
    case F_PTR:
        return v ? put_hex(b, v) : puts_(b, "NULL");
    default:  /* tracer.decode._other */
        return v > 0xffff ? put_hex(b, v) : put_udec(b, v);
    }
}

/* tracer.decode.Formatter.arguments */
static int render_args(Loop *self, struct buf *b, int pid, const struct spec *s,
                       const uint64_t *args, int64_t rval) {
    int count = s->nargs;
    if (s->oflags_at >= 0 && !(args[s->oflags_at] & (O_CREAT_BIT | O_TMPFILE_BIT)))
        count = s->oflags_at + 1;  /* the mode only matters when creating */
    for (int i = 0; i < count; i++) {
        if (i && put(b, ", ", 2)) return -1;
        uint64_t size = i + 1 < s->nargs ? args[i + 1] : 0;
        if (render_arg(self, b, pid, s->fmt[i], args[i], size, rval, &self->scratch)) return -1;
    }
    return 0;
}

/* tracer.decode.result */
static int render_result(Loop *self, struct buf *b, int64_t rval, int pointer) {
    if (rval < 0 && rval > -4096) {
        int err = (int)-rval;
        if (err == 512) return puts_(b, "? ERESTARTSYS (To be restarted if SA_RESTART is set)");
        if (err == 513 || err == 514 || err == 516) return putf(b, "? ERESTART (%lld)", err, 1);
        if (puts_(b, "-1 ")) return -1;
        if (self->errnames[err]) { if (puts_(b, self->errnames[err])) return -1; }
        else if (putf(b, "E%lld", err, 1)) return -1;
        if (put(b, " (", 2) || puts_(b, strerror(err)) || put(b, ")", 1)) return -1;
        return 0;
    }
    if (pointer) return put_hex(b, (uint64_t)rval);
    return put_sdec(b, rval);
}

/* ---- output --------------------------------------------------------------- */

static int flush_out(Loop *self) {
    if (!self->out.len || self->sink == Py_None) { self->out.len = 0; return 0; }
    PyObject *text = PyUnicode_DecodeUTF8(self->out.data, (Py_ssize_t)self->out.len,
                                          "surrogateescape");
    self->out.len = 0;
    if (!text) return -1;
    PyObject *r = PyObject_CallOneArg(self->sink, text);
    Py_DECREF(text);
    if (!r) return -1;
    Py_DECREF(r);
    return 0;
}

static int line_done(Loop *self) {
    if (self->line_buffered || self->out.len >= (1 << 16)) return flush_out(self);
    return 0;
}

/* ---- threads ---------------------------------------------------------- */

static struct task *find_task(Loop *self, int tid) {
    for (size_t i = 0; i < self->n_tasks; i++)
        if (self->tasks[i].tid == tid) return &self->tasks[i];
    return NULL;
}

static struct task *add_task(Loop *self, int tid) {
    struct task *t = find_task(self, tid);
    if (t) return t;
    if (self->n_tasks == self->cap_tasks) {
        size_t cap = self->cap_tasks ? self->cap_tasks * 2 : 16;
        struct task *p = realloc(self->tasks, cap * sizeof *p);
        if (!p) return NULL;
        self->tasks = p;
        self->cap_tasks = cap;
    }
    t = &self->tasks[self->n_tasks++];
    memset(t, 0, sizeof *t);
    t->tid = tid;
    return t;
}

static void drop_task(Loop *self, struct task *t) {
    free(t->text.data);
    *t = self->tasks[--self->n_tasks];
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Why the loop stopped on an error, raised once it holds the GIL again. */
struct failure {
    int kind;  /* 0 none, 1 out of memory, 2 a resume failed, 3 wait4 failed */
    int pid, err;
    long request;
};

static int resume(struct failure *f, int pid, long request) {
    if (ptrace((enum __ptrace_request)request, pid, 0, 0) == -1 && errno != ESRCH) {
        f->kind = 2;
        f->pid = pid;
        f->request = request;
        f->err = errno;
        return -1;
    }
    return 0;
}

static PyObject *raise_failure(Loop *self, struct failure *f) {
    if (f->kind == 2) {
        PyObject *exc = PyObject_CallFunction(self->error, "ili", f->pid, f->request, (long)f->err);
        if (exc) {
            PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
            Py_DECREF(exc);
        }
    } else if (f->kind == 3) {
        errno = f->err;
        PyErr_SetFromErrno(PyExc_OSError);
    } else {
        PyErr_NoMemory();
    }
    return NULL;
}

/* The stop Python must handle, with this loop's state of its thread (forgotten). */
static PyObject *hand_over(Loop *self, int pid, int status, struct rusage *ru) {
    if (flush_out(self)) return NULL;
    PyObject *handoff = Py_None;
    Py_INCREF(Py_None);
    struct task *t = find_task(self, pid);
    if (t) {
        if (t->pending) {
            Py_DECREF(Py_None);
            handoff = Py_BuildValue(
                "(i(KKKKKK)dO)", t->nr, t->args[0], t->args[1], t->args[2], t->args[3],
                t->args[4], t->args[5], t->started, Py_None);
            if (!handoff) return NULL;
            if (t->has_text) {
                PyObject *text = PyUnicode_DecodeUTF8(t->text.data, (Py_ssize_t)t->text.len,
                                                      "surrogateescape");
                if (!text) { Py_DECREF(handoff); return NULL; }
                PyTuple_SetItem(handoff, 3, text);  /* steals; replaces None */
            }
        }
        drop_task(self, t);
    }
    double utime = (double)ru->ru_utime.tv_sec + ru->ru_utime.tv_usec * 0.000001;
    double stime = (double)ru->ru_stime.tv_sec + ru->ru_stime.tv_usec * 0.000001;
    return Py_BuildValue("(iiddlN)", pid, status, utime, stime, ru->ru_maxrss, handoff);
}

/* ---- calls let go without Python (Loop.skip) ---------------------------- */

/* Is `path` (n bytes) one of the prefixes or under one? */
static int under_prefix(const Loop *self, const char *path, size_t n) {
    for (int i = 0; i < self->n_prefixes; i++) {
        size_t k = self->prefix_lens[i];
        if (n >= k && memcmp(path, self->prefixes[i], k) == 0 && (n == k || path[k] == '/'))
            return 1;
    }
    return 0;
}

/* Has `path` (n bytes) a ".." component? */
static int climbs(const char *p, size_t n) {
    for (size_t i = 0; i + 1 < n; i++)
        if (p[i] == '.' && p[i + 1] == '.' && (i == 0 || p[i - 1] == '/') &&
            (i + 2 == n || p[i + 2] == '/'))
            return 1;
    return 0;
}

/* What /proc/TID/`what` links to, into `into` (no NUL); its length or -1. */
static ssize_t link_of(int tid, const char *what, char *into, size_t size) {
    char link[64];
    snprintf(link, sizeof link, "/proc/%d/%s", tid, what);
    return readlink(link, into, size);
}

/* What descriptor `fd` of thread `tid` names (link_of /proc/TID/fd/FD). */
static ssize_t fd_link(int tid, uint64_t fd, char *into, size_t size) {
    char what[32];
    snprintf(what, sizeof what, "fd/%d", (int)fd);
    return link_of(tid, what, into, size);
}

/* Could this call of thread `tid` name something under a prefix?  1 when it
   could or when that cannot be told (Python decides, as without this loop), 0
   when it cannot.  Lexically, as the coordinators decide (`oss.storage.pathmap`
   leaves a path that names nothing mapped to the kernel, `vmagent.trace.procview`
   looks at /proc/N alone): a path with a ".." component may climb anywhere; any
   other is its directory's path (the working directory's, or the directory
   descriptor's) joined with it, and may name a prefix only if that is under one.
   A listing (getdents64) may, only if its descriptor is one of the prefixes. */
static int may_name(Loop *self, int tid, int nr, const uint64_t *args) {
    int how = self->skip[nr];
    char target[2 * PATH_LIMIT + 2];
    if (how == S_LISTING) {
        ssize_t n = fd_link(tid, args[0], target, PATH_LIMIT);
        if (n < 0) return 1;
        for (int i = 0; i < self->n_prefixes; i++)
            if ((size_t)n == self->prefix_lens[i] && !memcmp(target, self->prefixes[i], (size_t)n))
                return 1;
        return 0;
    }
    int at = how - S_PATH0;
    ssize_t n = read_string(self, tid, args[at], &self->scratch);
    if (n < 0 || (size_t)n >= PATH_LIMIT) return 1;  /* a bad address (the call's EFAULT) */
    const char *path = self->scratch.data;
    if (climbs(path, (size_t)n)) return 1;
    if (n > 0 && path[0] == '/') return under_prefix(self, path, (size_t)n);
    /* Relative (or empty, with AT_EMPTY_PATH): from its directory (a directory
       descriptor before the path, or the working directory). */
    ssize_t m = self->specs[nr].fmt[0] == F_DIRFD && (int)args[0] != AT_FDCWD_VALUE
                    ? fd_link(tid, args[0], target, PATH_LIMIT)
                    : link_of(tid, "cwd", target, PATH_LIMIT);
    if (m < 0 || m >= PATH_LIMIT) return 1;
    if (m == 0 || target[0] != '/') return 0;  /* a pipe, a socket...: no directory of a path */
    size_t len = (size_t)m;
    if (n > 0) {
        if (len > 1) target[len++] = '/';
        memcpy(target + len, path, (size_t)n);
        len += (size_t)n;
    }
    return under_prefix(self, target, len);
}

/* ---- the loop ---------------------------------------------------------- */

/* Runs without the GIL (another Python thread of the tracer, such as the run's
   recorder, must not hold up a stop); takes it back to hand a stop over, to
   write a full buffer to the sink, and to raise. */
static PyObject *Loop_next(Loop *self, PyObject *Py_UNUSED(ignored)) {
    struct ptrace_info info;
    struct rusage ru;
    struct failure f = {0};
    int status;
    pid_t pid;
    PyThreadState *ts = PyEval_SaveThread();
    for (;;) {
        pid = wait4(-1, &status, WALL_FLAG, &ru);
        if (pid < 0) {
            if (errno == EINTR) {
                PyEval_RestoreThread(ts);
                if (PyErr_CheckSignals()) return NULL;
                ts = PyEval_SaveThread();
                continue;
            }
            f.kind = 3;
            f.err = errno;
            goto fail;
        }
        if (!WIFSTOPPED(status)) goto python;
        int event = status >> 16, sig = WSTOPSIG(status);
        struct task *t = find_task(self, pid);
        if (event == EVENT_SECCOMP) {
            if (t && t->held) goto python;
            if (ptrace(REQ_GET_SYSCALL_INFO, pid, (void *)sizeof info, &info) == -1) goto python;
            uint64_t nr = info.seccomp.nr;
            if (info.arch != AUDIT_ARCH_X86_64 || nr >= MAX_NR) goto python;
            if (self->skip[nr]) {
                if (may_name(self, pid, (int)nr, info.seccomp.args)) goto python;
                if (resume(&f, pid, REQ_CONT)) goto fail;
                continue;
            }
            if (!(self->specs[nr].flags & K_FAST)) goto python;
            const struct spec *s = &self->specs[nr];
            if (!t && !(t = add_task(self, pid))) { f.kind = 1; goto fail; }
            t->pending = 1;
            t->nr = (int)nr;
            memcpy(t->args, info.seccomp.args, sizeof t->args);
            t->started = now();
            t->has_text = 0;
            if (self->has_sink && (s->flags & K_READ_ENTRY) && !(s->flags & K_READ_EXIT)) {
                /* Memory of input arguments is read now: later it may hold something else. */
                t->text.len = 0;
                if (render_args(self, &t->text, pid, s, t->args, 0)) { f.kind = 1; goto fail; }
                t->has_text = 1;
            }
            if (resume(&f, pid, REQ_SYSCALL)) goto fail;
            continue;
        }
        if (sig != (SIGTRAP | 0x80) || !t || !t->pending) goto python;
        if (ptrace(REQ_GET_SYSCALL_INFO, pid, (void *)sizeof info, &info) == -1 ||
            info.op != OP_EXIT)
            goto python;
        int64_t rval = info.exit.rval;
        int nr = t->nr;
        const struct spec *s = &self->specs[nr];
        double took = now() - t->started;
        t->pending = 0;
        self->calls[nr]++;
        self->seconds[nr] += took;
        if (rval < 0 && rval > -4096) self->errors[nr]++;
        if (!self->has_sink) {
            if (resume(&f, pid, REQ_CONT)) goto fail;
            continue;
        }
        struct buf *b = &self->out;
        char head[48];
        int hn = snprintf(head, sizeof head, "%d ", pid);
        f.kind = 1;  /* until the line is complete, a failure is a failed allocation */
        if (put(b, head, (size_t)hn) || puts_(b, s->name) || put(b, "(", 1)) goto fail;
        if (s->flags & K_READ_EXIT) {  /* an output buffer: read before the tracee runs on */
            if (render_args(self, b, pid, s, t->args, rval)) goto fail;
            f.kind = 0;
            if (resume(&f, pid, REQ_CONT)) goto fail;
        } else {
            f.kind = 0;
            if (resume(&f, pid, REQ_CONT)) goto fail;
            f.kind = 1;
            if (t->has_text ? put(b, t->text.data, t->text.len)
                            : render_args(self, b, pid, s, t->args, rval))
                goto fail;
        }
        t->has_text = 0;
        if (put(b, ") = ", 4) || render_result(self, b, rval, s->flags & K_POINTER) ||
            put(b, "\n", 1))
            goto fail;
        f.kind = 0;
        if (self->line_buffered || b->len >= (1 << 16)) {
            PyEval_RestoreThread(ts);
            if (flush_out(self)) return NULL;
            ts = PyEval_SaveThread();
        }
    }
python:
    PyEval_RestoreThread(ts);
    return hand_over(self, pid, status, &ru);
fail:
    PyEval_RestoreThread(ts);
    flush_out(self);
    return raise_failure(self, &f);
}

/* ---- Python-facing methods ---------------------------------------------- */

static PyObject *Loop_hold(Loop *self, PyObject *args) {
    int tid, held;
    if (!PyArg_ParseTuple(args, "ip", &tid, &held)) return NULL;
    struct task *t = find_task(self, tid);
    if (held) {
        if (!t && !(t = add_task(self, tid))) return PyErr_NoMemory();
        t->held = 1;
        t->pending = 0;
    } else if (t) {
        drop_task(self, t);
    }
    Py_RETURN_NONE;
}

static PyObject *Loop_write(Loop *self, PyObject *arg) {
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(arg, &n);
    if (!s) return NULL;
    if (!self->has_sink) Py_RETURN_NONE;
    if (put(&self->out, s, (size_t)n)) return PyErr_NoMemory();
    if (line_done(self)) return NULL;
    Py_RETURN_NONE;
}

static PyObject *Loop_flush(Loop *self, PyObject *Py_UNUSED(ignored)) {
    if (flush_out(self)) return NULL;
    Py_RETURN_NONE;
}

static PyObject *Loop_stats(Loop *self, PyObject *Py_UNUSED(ignored)) {
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    for (int nr = 0; nr < MAX_NR; nr++) {
        if (!self->calls[nr]) continue;
        PyObject *row = Py_BuildValue("(iKKd)", nr, (unsigned long long)self->calls[nr],
                                      (unsigned long long)self->errors[nr], self->seconds[nr]);
        if (!row || PyList_Append(out, row)) { Py_XDECREF(row); Py_DECREF(out); return NULL; }
        Py_DECREF(row);
    }
    memset(self->calls, 0, sizeof self->calls);
    memset(self->errors, 0, sizeof self->errors);
    memset(self->seconds, 0, sizeof self->seconds);
    return out;
}

/* render(pid, nr, args, rval, at_entry) -> the text Formatter.arguments gives
   (the differential unit tests compare both renderings). */
static PyObject *Loop_render(Loop *self, PyObject *args) {
    int pid, nr;
    PyObject *argt;
    long long rval;
    if (!PyArg_ParseTuple(args, "iiO!L", &pid, &nr, &PyTuple_Type, &argt, &rval)) return NULL;
    if (nr < 0 || nr >= MAX_NR || !(self->specs[nr].flags & K_KNOWN) ||
        PyTuple_GET_SIZE(argt) != 6) {
        PyErr_SetString(PyExc_ValueError, "unknown syscall or not six arguments");
        return NULL;
    }
    uint64_t a[6];
    for (int i = 0; i < 6; i++) {
        a[i] = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(argt, i));
        if (PyErr_Occurred()) return NULL;
    }
    struct buf b = {0};
    if (render_args(self, &b, pid, &self->specs[nr], a, rval) ||
        put(&b, " = ", 3) ||
        render_result(self, &b, rval, self->specs[nr].flags & K_POINTER)) {
        free(b.data);
        return PyErr_NoMemory();
    }
    PyObject *r = PyUnicode_DecodeUTF8(b.data ? b.data : "", (Py_ssize_t)b.len, "surrogateescape");
    free(b.data);
    return r;
}

static const char *keep_str(Loop *self, PyObject *s) {
    if (!PyUnicode_Check(s)) { PyErr_SetString(PyExc_TypeError, "expected str"); return NULL; }
    if (PyList_Append(self->keep, s)) return NULL;
    return PyUnicode_AsUTF8(s);
}

static int fmt_code(const char *f) {
    static const struct { const char *name; int code; } map[] = {
        {"path", F_STRING}, {"target", F_STRING}, {"str", F_STRING}, {"fd", F_FD},
        {"dirfd", F_DIRFD}, {"buf_in", F_BUF_IN}, {"buf_out", F_BUF_OUT},
        {"oflags", F_OFLAGS}, {"prot", F_PROT}, {"mode", F_MODE}, {"signo", F_SIGNO},
        {"int", F_INT}, {"pid", F_INT}, {"size", F_SIZE}, {"ptr", F_PTR},
        {"sockaddr", F_PTR}, {"sockaddr_out", F_PTR}, {"argv", F_UNSUPPORTED},
        {"envp", F_UNSUPPORTED},
    };
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++)
        if (!strcmp(f, map[i].name)) return map[i].code;
    return F_OTHER;
}

/* Loop(specs, errnames, signames, oflags, sink, line_buffered, error, skip=[], prefixes=[])
   specs: [(nr, name, (fmt, ...), fast, pointer, read_entry, read_exit)]
   skip: [(nr, how)], how -1 for a listing (getdents64: its fd) or the index of
   the path argument: calls let go when they cannot name a path under one of
   `prefixes` (absolute paths, bytes; Loop.skip). */
static int Loop_init(Loop *self, PyObject *args, PyObject *kw) {
    PyObject *specs, *errnames, *signames, *oflags, *sink, *error, *skip = NULL, *prefixes = NULL;
    int line_buffered;
    static char *names[] = {"specs", "errnames", "signames", "oflags", "sink",
                            "line_buffered", "error", "skip", "prefixes", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!O!O!O!OpO|O!O!", names, &PyList_Type, &specs,
                                     &PyDict_Type, &errnames, &PyDict_Type, &signames,
                                     &PyList_Type, &oflags, &sink, &line_buffered, &error,
                                     &PyList_Type, &skip, &PyList_Type, &prefixes))
        return -1;
    for (int i = 0; i < self->n_prefixes; i++) free(self->prefixes[i]);
    self->n_prefixes = 0;
    for (Py_ssize_t i = 0; prefixes && i < PyList_GET_SIZE(prefixes); i++) {
        char *text;
        Py_ssize_t len;
        if (PyBytes_AsStringAndSize(PyList_GET_ITEM(prefixes, i), &text, &len)) return -1;
        if (self->n_prefixes == MAX_PREFIXES || len < 1 || len >= PATH_LIMIT || text[0] != '/') {
            PyErr_SetString(PyExc_ValueError, "prefixes: at most 64 absolute paths");
            return -1;
        }
        while (len > 0 && text[len - 1] == '/') len--;  /* "/" itself: every path */
        char *copy = malloc((size_t)len + 1);
        if (!copy) { PyErr_NoMemory(); return -1; }
        memcpy(copy, text, (size_t)len);
        copy[len] = 0;
        self->prefixes[self->n_prefixes] = copy;
        self->prefix_lens[self->n_prefixes++] = (size_t)len;
    }
    memset(self->skip, 0, sizeof self->skip);
    for (Py_ssize_t i = 0; skip && i < PyList_GET_SIZE(skip); i++) {
        int nr, how;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(skip, i), "ii", &nr, &how)) return -1;
        if (nr < 0 || nr >= MAX_NR || how < -1 || how > 5 || !self->n_prefixes) {
            PyErr_SetString(PyExc_ValueError, "skip: a call number, -1 or an argument index, "
                                              "and prefixes");
            return -1;
        }
        self->skip[nr] = (uint8_t)(how < 0 ? S_LISTING : S_PATH0 + how);
    }
    self->keep = PyList_New(0);
    if (!self->keep) return -1;
    Py_INCREF(sink);
    Py_XSETREF(self->sink, sink);
    self->has_sink = sink != Py_None;
    Py_INCREF(error);
    Py_XSETREF(self->error, error);
    self->line_buffered = line_buffered;
    self->page = sysconf(_SC_PAGESIZE);
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(specs); i++) {
        int nr, fast, pointer, rentry, rexit;
        const char *name;
        PyObject *fmts;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(specs, i), "isO!pppp", &nr, &name, &PyTuple_Type,
                              &fmts, &fast, &pointer, &rentry, &rexit))
            return -1;
        if (nr < 0 || nr >= MAX_NR || strlen(name) >= 32 || PyTuple_GET_SIZE(fmts) > 6) continue;
        struct spec *s = &self->specs[nr];
        snprintf(s->name, sizeof s->name, "%s", name);
        s->nargs = (uint8_t)PyTuple_GET_SIZE(fmts);
        s->oflags_at = -1;
        int supported = 1;
        for (int j = 0; j < s->nargs; j++) {
            const char *f = PyUnicode_AsUTF8(PyTuple_GET_ITEM(fmts, j));
            if (!f) return -1;
            s->fmt[j] = (uint8_t)fmt_code(f);
            if (s->fmt[j] == F_UNSUPPORTED) supported = 0;
            if (s->fmt[j] == F_OFLAGS && s->oflags_at < 0) s->oflags_at = (int8_t)j;
        }
        s->flags = K_KNOWN | (fast && supported ? K_FAST : 0) | (pointer ? K_POINTER : 0) |
                   (rentry ? K_READ_ENTRY : 0) | (rexit ? K_READ_EXIT : 0);
    }
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(errnames, &pos, &key, &value)) {
        long err = PyLong_AsLong(key);
        if (err > 0 && err < 4096 && !(self->errnames[err] = keep_str(self, value))) return -1;
    }
    pos = 0;
    while (PyDict_Next(signames, &pos, &key, &value)) {
        long sig = PyLong_AsLong(key);
        if (sig >= 0 && sig < 65 && !(self->signames[sig] = keep_str(self, value))) return -1;
    }
    self->n_oflags = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(oflags) && i < 32; i++) {
        unsigned long long bit;
        PyObject *name;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(oflags, i), "KU", &bit, &name)) return -1;
        self->oflag_bits[self->n_oflags] = bit;
        if (!(self->oflag_names[self->n_oflags] = keep_str(self, name))) return -1;
        self->n_oflags++;
    }
    return 0;
}

static void Loop_dealloc(Loop *self) {
    for (size_t i = 0; i < self->n_tasks; i++) free(self->tasks[i].text.data);
    free(self->tasks);
    free(self->out.data);
    free(self->scratch.data);
    for (int i = 0; i < self->n_prefixes; i++) free(self->prefixes[i]);
    Py_XDECREF(self->keep);
    Py_XDECREF(self->sink);
    Py_XDECREF(self->error);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Loop_methods[] = {
    {"next", (PyCFunction)Loop_next, METH_NOARGS,
     "Run the fast stops; return (pid, status, utime, stime, maxrss, handoff) of the next "
     "stop Python must handle, handoff being that thread's call in flight "
     "(nr, args, started, entry text) or None."},
    {"hold", (PyCFunction)Loop_hold, METH_VARARGS,
     "hold(tid, held): Python's machine has (or no longer has) a call in flight for tid."},
    {"write", (PyCFunction)Loop_write, METH_O, "Append a line Python rendered (in order)."},
    {"flush", (PyCFunction)Loop_flush, METH_NOARGS, "Write the buffered lines to the sink."},
    {"stats", (PyCFunction)Loop_stats, METH_NOARGS,
     "[(nr, calls, errors, seconds)] of the calls this loop finished (then reset)."},
    {"render", (PyCFunction)Loop_render, METH_VARARGS,
     "render(pid, nr, args, rval) -> 'arguments = result', as the loop renders them."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject LoopType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tracer._fastpath.Loop",
    .tp_basicsize = sizeof(Loop),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The --trace stops of fast calls, handled in C (see the module's comment).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Loop_init,
    .tp_dealloc = (destructor)Loop_dealloc,
    .tp_methods = Loop_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "tracer._fastpath",
    "The --trace hot path of tracer.runner in C.", -1, NULL,
};

PyMODINIT_FUNC PyInit__fastpath(void) {
    if (PyType_Ready(&LoopType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&LoopType);
    if (PyModule_AddObject(m, "Loop", (PyObject *)&LoopType) < 0) {
        Py_DECREF(&LoopType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
