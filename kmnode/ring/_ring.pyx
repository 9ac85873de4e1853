# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# cython: annotation_typing=False
"""Lock-protected shared-memory ring between a service TEE (writer) and the untrusted host (reader).

Layout of the named POSIX shared-memory object (little-endian, one cache line per hot word so
the writer and the reader do not false-share):

    0     u64  write offset               ("first address", published by the TEE side)
    64    u64  read offset                ("second address", published by the host side)
    128   u64  discarded-record count     ("fourth address", incremented by the TEE side)
    192   u64  magic, u32 version, u32 header size, u64 capacity, u64 max record size
    256   u32  TEE-side (writer) lock      0 free, 1 held, 2 held with sleepers
    320   u32  host-side (reader) lock     same encoding
    384   u32  flag: a reader sleeps waiting for data (cleared by the writer that wakes it)
    448   u32  flag: a writer sleeps waiting for space (cleared by the reader that wakes it)
    4096  data ("third addresses"), `capacity` bytes, a power of two

Offsets are monotonically increasing 64-bit byte counts (position = offset mod capacity), so
`write - read` is the number of unread bytes and full and empty are never confused.  A record
is an 8-byte frame (u32 payload length, u32 type) followed by the payload, padded to 8 bytes.

The data region is mapped twice, back to back, in virtual memory.  A record that wraps past
the end of the ring is therefore contiguous in this process's address space: it is written
and read with one memcpy and can be handed out as one zero-copy memoryview, while the bytes
really do wrap around the end of the shared object.

Wake-ups use futexes on the low 32 bits of the offsets themselves (FUTEX_WAIT without the
PRIVATE flag works across processes that map the same shared memory).  An eventfd would need
to be inherited or passed over a unix socket, and the host attaches by name only; a futex
needs nothing but the mapping.  A waiter raises a "sleeping" flag before its final check, and
the other side issues the wake syscall only when it finds the flag raised, clearing it: so the
ring going from empty to non-empty (or from full to not full) with someone asleep costs one
syscall, the fast path never enters the kernel, and a sleeper is never missed.

The TEE side trusts nothing it reads from the mapping: it keeps private copies of the
capacity, maximum record size and its own write offset, compares the shared ones with them on
every write, bounds-checks the read offset whenever it loads it, and never waits without a
deadline.  The host side likewise validates the write offset and every frame length before
touching memory.  Neither side can be made to touch memory outside the mapping: positions are
masked with the private capacity and a record is never longer than the ring.  One attack no
check on the contents can stop: a process that can open a named object can also ftruncate it,
after which touching the lost pages raises SIGBUS.  Hence the second way to make a ring:
`Ring.create_sealed` puts it in a memfd (no name) sealed against shrinking and growing, with
the seals sealed, and hands it on as a file descriptor (inherited by the TEE process);
`Ring.attach_sealed` maps such a descriptor only after checking those seals and the size it
expects.  The named mode stays for benchmarks and tests between processes that share a name.

Each side loads the other's offset only when the value it saw last is not enough (the writer
when the record might not fit, a single read when the records it knows about are used up),
so each offset's cache line stays with the core that owns it.  Waits spin briefly and then
sleep on the futex.  Copies below GIL_RELEASE_BYTES are made with the GIL held (see there).
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_FillInfo, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memcpy

import fcntl
import os

from kmnode.ring.errors import (
    RecordTooLarge,
    RingClosed,
    RingCorrupted,
    RingError,
    RingFull,
    RingLockTimeout,
    RingNotSealed,
)

cdef extern from *:
    """
    #include <errno.h>
    #include <fcntl.h>
    #include <limits.h>
    #include <linux/futex.h>
    #include <stdint.h>
    #include <string.h>
    #include <sys/mman.h>
    #include <sys/stat.h>
    #include <sys/syscall.h>
    #include <time.h>
    #include <unistd.h>
    #if defined(__x86_64__) || defined(__i386__)
    #include <x86intrin.h>
    #define KM_PAUSE() _mm_pause()
    #define KM_HAVE_TSC 1
    #else
    #define KM_PAUSE() __asm__ __volatile__("" ::: "memory")
    #define KM_HAVE_TSC 0
    #endif
    #if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
    #error "kmnode.ring sleeps on the low 32 bits of its 64-bit offsets: little-endian only"
    #endif

    #define KM_LOCK_SPINS 64
    #define KM_LOCK_SPIN_NS 20000

    static inline uint64_t km_ld64_rlx(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    static inline uint64_t km_ld64_acq(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline uint64_t km_ld64_sc(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
    static inline void km_st64_rel(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline void km_st64_rlx(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
    static inline void km_add64(uint64_t *p, uint64_t v) { __atomic_add_fetch(p, v, __ATOMIC_RELAXED); }
    static inline uint32_t km_ld32_sc(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
    static inline void km_st32_rlx(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
    static inline void km_add32(uint32_t *p, uint32_t v) { __atomic_add_fetch(p, v, __ATOMIC_SEQ_CST); }
    static inline void km_sub32(uint32_t *p, uint32_t v) { __atomic_sub_fetch(p, v, __ATOMIC_SEQ_CST); }
    static inline uint32_t km_inc32(uint32_t *p) { return __atomic_add_fetch(p, 1, __ATOMIC_RELAXED); }
    static inline uint32_t km_xchg32(uint32_t *p, uint32_t v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
    static inline void km_st32_sc(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
    static inline void km_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

    static inline int64_t km_now_ns(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    }

    /* Shared (not PRIVATE) futex: the word lives in a MAP_SHARED mapping used by two processes.
       timeout_ns < 0 waits without a timeout. */
    static inline void km_futex_wait(uint32_t *addr, uint32_t expected, int64_t timeout_ns) {
        struct timespec ts;
        struct timespec *tsp = NULL;
        if (timeout_ns >= 0) {
            ts.tv_sec = (time_t)(timeout_ns / 1000000000LL);
            ts.tv_nsec = (long)(timeout_ns % 1000000000LL);
            tsp = &ts;
        }
        syscall(SYS_futex, addr, FUTEX_WAIT, expected, tsp, NULL, 0);
    }
    static inline void km_futex_wake(uint32_t *addr, int n) {
        syscall(SYS_futex, addr, FUTEX_WAKE, n, NULL, NULL, 0);
    }

    /* A futex mutex (Drepper's "mutex2"): 0 free, 1 held, 2 held and someone may sleep. */
    static inline int km_lock_try(uint32_t *w) {
        uint32_t expected = 0;
        return __atomic_compare_exchange_n(w, &expected, 1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED);
    }
    /* Returns 0 once acquired, 1 when the deadline (CLOCK_MONOTONIC ns, < 0: none) passed.
       Spin first, for at most KM_LOCK_SPIN_NS (critical sections are a copy, from tens of ns
       to a few us for 64 KiB, much shorter than a futex sleep and wake), then sleep in the
       kernel with the remaining time as timeout, so a holder that never releases costs us
       the deadline and nothing more. */
    static int km_lock_wait(uint32_t *w, int64_t deadline_ns) {
        int i;
        int64_t left;
        int64_t spin_until = km_now_ns() + KM_LOCK_SPIN_NS;
        if (deadline_ns >= 0 && deadline_ns < spin_until) spin_until = deadline_ns;
        do {
            for (i = 0; i < KM_LOCK_SPINS; i++) {
                if (__atomic_load_n(w, __ATOMIC_RELAXED) == 0 && km_lock_try(w)) return 0;
                KM_PAUSE();
            }
        } while (km_now_ns() < spin_until);
        for (;;) {
            if (__atomic_exchange_n(w, 2, __ATOMIC_ACQUIRE) == 0) return 0;
            left = -1;
            if (deadline_ns >= 0) {
                left = deadline_ns - km_now_ns();
                if (left <= 0) return 1;
            }
            km_futex_wait(w, 2, left);
        }
    }
    static inline void km_unlock(uint32_t *w) {
        if (__atomic_exchange_n(w, 0, __ATOMIC_RELEASE) == 2) km_futex_wake(w, 1);
    }

    /* Map header + data, then the data a second time right after it, so that every record
       (even one wrapping past the end) is contiguous in this process. Returns NULL on error. */
    static char *km_map_mirror(int fd, size_t header, size_t cap) {
        size_t total = header + 2 * cap;
        char *base = (char *)mmap(NULL, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        int e;
        if (base == MAP_FAILED) return NULL;
        /* MAP_POPULATE: fault every page in now, not one page per 4 KiB of the first lap. */
        if (mmap(base, header + cap, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED | MAP_POPULATE, fd, 0) == MAP_FAILED) goto fail;
        if (mmap(base + header + cap, cap, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED | MAP_POPULATE, fd, (off_t)header) == MAP_FAILED) goto fail;
        return base;
    fail:
        e = errno;
        munmap(base, total);
        errno = e;
        return NULL;
    }

    /* Spin (bounded by spin_ns) while *p == seen.  Returns 1 as soon as it changes.  Handing
       a sleeping peer a futex wake costs a syscall on one side and a context switch on the
       other, several microseconds; when the peer is keeping up, the awaited change usually
       arrives sooner than that, so a short spin before sleeping pays for itself. */
    static int km_spin_while_equal(const uint64_t *p, uint64_t seen, int64_t spin_ns) {
        int64_t start;
        int i;
        if (spin_ns <= 0) return 0;
        start = km_now_ns();
        for (;;) {
            for (i = 0; i < 64; i++) {
                if (__atomic_load_n(p, __ATOMIC_ACQUIRE) != seen) return 1;
                KM_PAUSE();
            }
            if (km_now_ns() - start >= spin_ns) return 0;
        }
    }

    static inline uint64_t km_cycles(void) {
    #if KM_HAVE_TSC
        return (uint64_t)__rdtsc();
    #else
        return (uint64_t)km_now_ns();
    #endif
    }
    /* Burn n time-stamp-counter cycles: how OCALL costs are measured in the SGX literature. */
    static void km_spin_cycles(uint64_t n) {
        uint64_t start = km_cycles();
        while (km_cycles() - start < n) KM_PAUSE();
    }
    """
    uint64_t km_ld64_rlx(const uint64_t *p) nogil
    uint64_t km_ld64_acq(const uint64_t *p) nogil
    uint64_t km_ld64_sc(const uint64_t *p) nogil
    void km_st64_rel(uint64_t *p, uint64_t v) nogil
    void km_st64_rlx(uint64_t *p, uint64_t v) nogil
    void km_add64(uint64_t *p, uint64_t v) nogil
    uint32_t km_ld32_sc(const uint32_t *p) nogil
    void km_st32_rlx(uint32_t *p, uint32_t v) nogil
    void km_add32(uint32_t *p, uint32_t v) nogil
    void km_sub32(uint32_t *p, uint32_t v) nogil
    uint32_t km_inc32(uint32_t *p) nogil
    uint32_t km_xchg32(uint32_t *p, uint32_t v) nogil
    void km_st32_sc(uint32_t *p, uint32_t v) nogil
    void km_fence() nogil
    int64_t km_now_ns() nogil
    void km_futex_wait(uint32_t *addr, uint32_t expected, int64_t timeout_ns) nogil
    void km_futex_wake(uint32_t *addr, int n) nogil
    int km_lock_try(uint32_t *w) nogil
    int km_lock_wait(uint32_t *w, int64_t deadline_ns) nogil
    void km_unlock(uint32_t *w) nogil
    char *km_map_mirror(int fd, size_t header, size_t cap) nogil
    uint64_t km_cycles() nogil
    int km_spin_while_equal(const uint64_t *p, uint64_t seen, int64_t spin_ns) nogil
    void km_spin_cycles(uint64_t n) nogil
    int KM_HAVE_TSC
    int INT_MAX

cdef extern from "<sys/mman.h>" nogil:
    int shm_open(const char *name, int oflag, int mode)
    int shm_unlink(const char *name)
    int munmap(void *addr, size_t length)

cdef extern from "<sys/stat.h>" nogil:
    cdef struct stat:
        long st_size
    int fstat(int fd, stat *buf)

cdef extern from "<unistd.h>" nogil:
    int ftruncate(int fd, long length)
    int close(int fd)

cdef extern from "<fcntl.h>" nogil:
    int O_RDWR
    int O_CREAT
    int O_EXCL

cdef extern from "<errno.h>" nogil:
    int errno

# ----------------------------------------------------------------------------- layout

cdef enum:
    OFF_WRITE = 0
    OFF_READ = 64
    OFF_DISCARDED = 128
    OFF_MAGIC = 192
    OFF_VERSION = 200
    OFF_HEADER_SIZE = 204
    OFF_CAPACITY = 208
    OFF_MAX_RECORD = 216
    OFF_WRITER_LOCK = 256
    OFF_READER_LOCK = 320
    OFF_READER_WAITERS = 384
    OFF_WRITER_WAITERS = 448
    HEADER = 4096
    FRAME = 8
    VERSION = 1

cdef uint64_t MAGIC = 0x31474E49524D4B00ULL   # "\0KMRING1" read as little-endian u64
cdef uint64_t MIN_CAPACITY = 4096             # one page: the mirror mapping needs page multiples
cdef uint64_t MAX_CAPACITY = 1ULL << 34
cdef uint64_t MAX_RECORD_LIMIT = 0xFFFFFFF0ULL  # fits the u32 length with its padding

# Result codes of the nogil cores; translated into exceptions with the GIL held.
cdef enum:
    RC_OK = 0
    RC_FULL = 1
    RC_DISCARDED = 2
    RC_LOCK_TIMEOUT = 3
    RC_EMPTY = 4
    RC_BUSY = 5
    RC_BAD_CAPACITY = 10
    RC_BAD_MAX_RECORD = 11
    RC_BAD_WRITE = 12
    RC_BAD_READ = 13
    RC_BAD_FRAME = 14

cdef enum:
    ON_FULL_WAIT = 0
    ON_FULL_DISCARD = 1
    ON_FULL_FAIL = 2

WAIT = ON_FULL_WAIT
DISCARD = ON_FULL_DISCARD
FAIL = ON_FULL_FAIL

#: Copies of at least this many bytes are done with the GIL released (so are all waits, for a
#: lock, for space or for data, whatever the size).  Below it the copy is done with the GIL
#: held: such a memcpy takes tens to a couple of hundred nanoseconds, less than releasing and
#: re-taking the GIL, and with several writer threads each release hands the GIL to another
#: thread, so every record costs two thread switches.  Measured here (bench/results/ring.md):
#: releasing it for every copy halved one-record throughput at 64 B with one writer thread
#: and cut it by 3-6x at 1 KiB with four.  Set 0 (module-wide, or per Writer/Reader) to
#: release it for every copy.
GIL_RELEASE_BYTES = 4096

LAYOUT = {
    "write_offset": OFF_WRITE,
    "read_offset": OFF_READ,
    "discarded": OFF_DISCARDED,
    "magic": OFF_MAGIC,
    "version": OFF_VERSION,
    "header_size": OFF_HEADER_SIZE,
    "capacity": OFF_CAPACITY,
    "max_record": OFF_MAX_RECORD,
    "writer_lock": OFF_WRITER_LOCK,
    "reader_lock": OFF_READER_LOCK,
    "reader_waiters": OFF_READER_WAITERS,
    "writer_waiters": OFF_WRITER_WAITERS,
    "data": HEADER,
    "frame": FRAME,
}
HEADER_SIZE = HEADER
FRAME_SIZE = FRAME


cdef inline int64_t adapt_spin(int64_t cur, int64_t limit, int spun) noexcept nogil:
    """Next spin budget: grow after a spin that paid off, shrink after one that did not.

    When the other side is not running at the same time (both processes time-sliced on one
    core, say) spinning only burns the time it needs; halving on every miss brings the cost of
    that case down to about a microsecond per wait within a few waits.
    """
    if spun:
        return min(limit, cur * 2 + 1000)
    return min(limit, max(1000, cur // 2))


cdef inline uint64_t rec_size(uint64_t n) noexcept nogil:
    return FRAME + ((n + 7) & ~(<uint64_t>7))


def record_size(n: int) -> int:
    """Bytes a payload of n bytes occupies in the ring (frame and padding included)."""
    if n < 0:
        raise ValueError("negative length")
    return rec_size(<uint64_t>n)


cdef int64_t deadline_after(object timeout) except? -2:
    """Absolute CLOCK_MONOTONIC deadline in ns; -1 when timeout is None (no deadline)."""
    if timeout is None:
        return -1
    cdef double t = timeout
    if not t >= 0.0:
        raise ValueError(f"timeout must be >= 0 seconds, got {timeout!r}")
    if t > 1e9:
        t = 1e9
    return km_now_ns() + <int64_t>(t * 1e9)


#: The seals a ring's memfd must carry before the TEE side maps it: no shrink (SIGBUS), no
#: grow (the size check would be stale), and no change to the seals themselves.
REQUIRED_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_SEAL_NAMES = ((fcntl.F_SEAL_SHRINK, "F_SEAL_SHRINK"), (fcntl.F_SEAL_GROW, "F_SEAL_GROW"), (fcntl.F_SEAL_SEAL, "F_SEAL_SEAL"))


cdef object _checked_size(object capacity, object max_record):
    """(capacity, max record) of a new ring, or ValueError saying which is wrong."""
    if not isinstance(capacity, int) or capacity < MIN_CAPACITY or capacity > MAX_CAPACITY or (capacity & (capacity - 1)) != 0:
        raise ValueError(
            f"capacity must be a power of two between {MIN_CAPACITY} and {MAX_CAPACITY}, got {capacity}"
        )
    mr = capacity // 4 if max_record is None else max_record
    if mr < 1 or mr > capacity - FRAME or mr > MAX_RECORD_LIMIT:
        raise ValueError(f"max_record must be in [1, {min(capacity - FRAME, MAX_RECORD_LIMIT)}], got {mr}")
    return capacity, mr


cdef str _shm_name(object name):
    cdef str s = os.fsdecode(name)
    if not s.startswith("/"):
        s = "/" + s
    if len(s) < 2 or "/" in s[1:] or len(s) > 250:
        raise ValueError(f"invalid shared-memory name {name!r}")
    return s


cdef object corrupted(int rc, str who):
    msg = {
        RC_BAD_CAPACITY: "capacity in the shared header differs from the one fixed at attach",
        RC_BAD_MAX_RECORD: "maximum record size in the shared header differs from the one fixed at attach",
        RC_BAD_WRITE: "write offset in the shared header is impossible",
        RC_BAD_READ: "read offset in the shared header is impossible",
        RC_BAD_FRAME: "record frame has an impossible length",
    }.get(rc, f"unexpected ring state {rc}")
    return RingCorrupted(f"{who}: {msg}")


# ----------------------------------------------------------------------------- Ring

cdef class Ring:
    """A mapping of one ring; the Writer and Reader objects work through it.

    Named: create it on one side (`Ring.create`) and attach on the other (`Ring.attach`) by
    name; the creator unlinks the name when it closes.  Sealed: `Ring.create_sealed` makes a
    sealed memfd whose descriptor (`fileno()`) the creator passes to the other process, which
    maps it with `Ring.attach_sealed`.  Values read through its properties come straight from
    shared memory and are therefore untrusted; they exist for diagnostics and tests.
    """

    cdef char *base
    cdef char *data
    cdef size_t map_len
    cdef readonly uint64_t capacity
    cdef readonly uint64_t max_record
    cdef readonly str name
    cdef readonly bint owner
    cdef int exports
    cdef int busy
    cdef bint unlinked
    cdef long creator_pid
    cdef int fd
    cdef readonly bint sealed

    def __cinit__(self) -> None:
        self.base = NULL
        self.data = NULL
        self.exports = 0
        self.busy = 0
        self.fd = -1
        self.sealed = False

    def __init__(self) -> None:
        raise TypeError("use Ring.create(name, capacity) or Ring.attach(name)")

    @staticmethod
    def create(name: str, capacity: int, max_record: int | None = None) -> Ring:
        """Create and initialise a new named ring (fails if the name exists)."""
        cdef Ring self = Ring.__new__(Ring)
        capacity, mr = _checked_size(capacity, max_record)
        cdef uint64_t cap = capacity
        self.name = _shm_name(name)
        cdef bytes bname = os.fsencode(self.name)
        cdef int fd = shm_open(bname, O_RDWR | O_CREAT | O_EXCL, 0o600)
        if fd < 0:
            raise OSError(errno, os.strerror(errno), self.name)
        if ftruncate(fd, <long>(HEADER + cap)) != 0:
            err = errno
            close(fd)
            shm_unlink(bname)
            raise OSError(err, os.strerror(err), self.name)
        self.owner = True
        self.creator_pid = os.getpid()
        try:
            self._map(fd, cap)
        except BaseException:
            shm_unlink(bname)
            raise
        finally:
            close(fd)
        self._init_header(cap, mr)
        return self

    @staticmethod
    def create_sealed(capacity: int, max_record: int | None = None, label: str = "kmring") -> Ring:
        """Create and initialise a ring in a memfd sealed against shrinking and growing.

        The ring has no name anyone can open; the creator hands `fileno()` to the other side
        (by inheritance or SCM_RIGHTS).  The descriptor is close-on-exec, so it reaches only
        the children it is explicitly passed to, and is closed with the ring.
        """
        cdef Ring self = Ring.__new__(Ring)
        capacity, mr = _checked_size(capacity, max_record)
        cdef uint64_t cap = capacity
        self.name = f"memfd:{label}"
        fd = os.memfd_create(label, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, HEADER + cap)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, REQUIRED_SEALS)
            self._map(fd, cap)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.owner = True
        self.sealed = True
        self.unlinked = True  # nothing to unlink: a memfd has no name
        self.creator_pid = os.getpid()
        self._init_header(cap, mr)
        return self

    @staticmethod
    def attach(name: str) -> Ring:
        """Map an existing ring by name, validating everything its header claims."""
        cdef Ring self = Ring.__new__(Ring)
        self.name = _shm_name(name)
        self.owner = False
        cdef bytes bname = os.fsencode(self.name)
        cdef int fd = shm_open(bname, O_RDWR, 0)
        if fd < 0:
            raise OSError(errno, os.strerror(errno), self.name)
        cdef stat st
        cdef uint64_t cap
        try:
            if fstat(fd, &st) != 0:
                raise OSError(errno, os.strerror(errno), self.name)
            if st.st_size <= HEADER:
                raise RingCorrupted(f"{self.name}: shared object too small ({st.st_size} bytes)")
            cap = <uint64_t>(st.st_size - HEADER)
            if cap < MIN_CAPACITY or cap > MAX_CAPACITY or (cap & (cap - 1)) != 0:
                raise RingCorrupted(f"{self.name}: data size {cap} is not a valid ring capacity")
            self._map(fd, cap)
        finally:
            close(fd)
        self._adopt_header(cap)
        return self

    @staticmethod
    def attach_sealed(fd: int, capacity: int, label: str = "kmring") -> Ring:
        """Map the sealed memfd `fd` holding a ring of exactly `capacity` data bytes.

        The TEE side's way in: refused with RingNotSealed unless `fd` is a memfd carrying
        F_SEAL_SHRINK, F_SEAL_GROW and F_SEAL_SEAL (so its size can never change again), and
        with RingCorrupted unless its size is the one expected and its header is sound.  The
        seals are checked before the size, so the size cannot change after it was checked.
        `fd` stays the caller's (the mapping does not need it; close it when done).
        """
        cdef Ring self = Ring.__new__(Ring)
        self.name = f"memfd:{label}"
        self.owner = False
        if not isinstance(capacity, int) or capacity < MIN_CAPACITY or capacity > MAX_CAPACITY or (capacity & (capacity - 1)) != 0:
            raise ValueError(f"expected capacity {capacity!r} is not a valid ring capacity")
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError as exc:
            raise RingNotSealed(f"{self.name}: descriptor {fd} is not a sealable memfd ({exc.strerror})") from None
        missing = [name for bit, name in _SEAL_NAMES if not seals & bit]
        if missing:
            raise RingNotSealed(f"{self.name}: descriptor {fd} lacks {', '.join(missing)}")
        size = os.fstat(fd).st_size
        if size != HEADER + capacity:
            raise RingCorrupted(f"{self.name}: size {size} bytes, expected {HEADER + capacity}")
        cdef uint64_t cap = capacity
        self._map(fd, cap)
        self.sealed = True
        self._adopt_header(cap)
        return self

    cdef _init_header(self, uint64_t cap, uint64_t mr):
        self.capacity = cap
        self.max_record = mr
        cdef char *h = self.base
        km_st64_rlx(<uint64_t *>(h + OFF_CAPACITY), cap)
        km_st64_rlx(<uint64_t *>(h + OFF_MAX_RECORD), mr)
        (<uint32_t *>(h + OFF_VERSION))[0] = VERSION
        (<uint32_t *>(h + OFF_HEADER_SIZE))[0] = HEADER
        km_st64_rel(<uint64_t *>(h + OFF_MAGIC), MAGIC)

    cdef _adopt_header(self, uint64_t cap):
        """Validate a mapped ring's header against its size; unmap and raise if it is wrong."""
        cdef char *h = self.base
        cdef uint64_t mr = km_ld64_rlx(<uint64_t *>(h + OFF_MAX_RECORD))
        problem = None
        if km_ld64_acq(<uint64_t *>(h + OFF_MAGIC)) != MAGIC:
            problem = "bad magic (not a ring, or not initialised yet)"
        elif (<uint32_t *>(h + OFF_VERSION))[0] != VERSION:
            problem = f"unsupported version {(<uint32_t *>(h + OFF_VERSION))[0]}"
        elif (<uint32_t *>(h + OFF_HEADER_SIZE))[0] != HEADER:
            problem = "bad header size"
        elif km_ld64_rlx(<uint64_t *>(h + OFF_CAPACITY)) != cap:
            problem = "capacity in the header does not match the object's size"
        elif mr < 1 or mr > cap - FRAME or mr > MAX_RECORD_LIMIT:
            problem = f"impossible maximum record size {mr}"
        if problem is not None:
            self._unmap()
            raise RingCorrupted(f"{self.name}: {problem}")
        self.capacity = cap
        self.max_record = mr

    def fileno(self) -> int:
        """The sealed ring's memfd, to hand to the other process (named rings have none)."""
        if self.fd < 0:
            raise RingError(f"ring {self.name} has no descriptor (only a sealed ring's creator has)")
        return self.fd

    cdef _map(self, int fd, uint64_t cap):
        cdef char *base = km_map_mirror(fd, HEADER, <size_t>cap)
        if base == NULL:
            raise OSError(errno, os.strerror(errno), self.name)
        self.base = base
        self.data = base + HEADER
        self.map_len = HEADER + 2 * cap

    cdef _unmap(self):
        if self.base != NULL:
            munmap(self.base, self.map_len)
            self.base = NULL
            self.data = NULL

    cdef inline int _enter(self) except -1:
        if self.base == NULL:
            raise RingClosed(f"ring {self.name} is closed")
        self.busy += 1
        return 0

    cdef inline void _leave(self) noexcept:
        self.busy -= 1

    @property
    def closed(self) -> bool:
        return self.base == NULL

    def _hdr64(self, off: int) -> int:
        if self.base == NULL:
            raise RingClosed(f"ring {self.name} is closed")
        return km_ld64_acq(<uint64_t *>(self.base + <size_t>off))

    @property
    def write_offset(self) -> int:
        """Untrusted: the write offset as currently stored in shared memory."""
        return self._hdr64(OFF_WRITE)

    @property
    def read_offset(self) -> int:
        """Untrusted: the read offset as currently stored in shared memory."""
        return self._hdr64(OFF_READ)

    @property
    def discarded(self) -> int:
        """Untrusted: the discarded-record count as currently stored in shared memory."""
        return self._hdr64(OFF_DISCARDED)

    @property
    def used(self) -> int:
        """Untrusted: unread bytes according to the shared offsets."""
        return (self._hdr64(OFF_WRITE) - self._hdr64(OFF_READ)) & 0xFFFFFFFFFFFFFFFF

    def close(self) -> None:
        """Unmap (and unlink, if this process created the ring).

        Refused while another thread is inside a ring operation or zero-copy views are alive,
        because unmapping would pull memory from under them.
        """
        if self.base == NULL:
            return
        if self.exports > 0:
            raise BufferError(f"ring {self.name}: zero-copy views are still alive")
        if self.busy > 0:
            raise RingError(f"ring {self.name}: another thread is inside a ring operation")
        self._unmap()
        self._close_fd()
        if self.owner and self.creator_pid == os.getpid():
            self.unlink()

    cdef _close_fd(self):
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1

    def unlink(self) -> None:
        """Remove the name (the memory lives on until every side unmaps)."""
        if not self.unlinked:
            self.unlinked = True
            shm_unlink(os.fsencode(self.name))

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __dealloc__(self) -> None:
        self._unmap()
        if self.fd >= 0:
            close(self.fd)
        # a forked child inherits the object but not the ownership of the name
        if self.owner and not self.unlinked and self.name is not None and self.creator_pid == os.getpid():
            shm_unlink(os.fsencode(self.name))

    def __repr__(self) -> str:
        state = "closed" if self.base == NULL else f"capacity={self.capacity}"
        return f"<Ring {self.name} {state}>"


# ----------------------------------------------------------------------------- Writer

cdef class Writer:
    """TEE side: appends records under the TEE-side lock; any number of threads may share one.

    One Writer object per ring per TEE: it owns the authoritative write offset (a private copy
    the shared one must always equal), so a second, independent writer on the same ring would be
    reported as tampering.  Threads share the object.
    """

    cdef Ring ring
    cdef char *hdr
    cdef char *data
    cdef uint64_t cap
    cdef uint64_t mask
    cdef uint64_t max_rec
    cdef uint64_t w
    cdef uint64_t last_r
    cdef uint64_t n_discarded
    cdef uint32_t *lock
    cdef readonly int on_full
    cdef int64_t timeout_ns
    cdef int64_t lock_timeout_ns
    cdef int64_t spin_ns
    cdef int64_t spin_cur_ns
    cdef uint32_t spinners
    cdef readonly Py_ssize_t gil_release_bytes

    def __cinit__(
        self,
        Ring ring not None,
        *,
        on_full: int = ON_FULL_WAIT,
        timeout: float = 1.0,
        lock_timeout: float = 1.0,
        gil_release_bytes: int | None = None,
        spin: float = 20e-6,
    ) -> None:
        if ring.base == NULL:
            raise RingClosed(f"ring {ring.name} is closed")
        if on_full not in (ON_FULL_WAIT, ON_FULL_DISCARD, ON_FULL_FAIL):
            raise ValueError(f"on_full must be WAIT, DISCARD or FAIL, got {on_full!r}")
        if not (timeout >= 0.0 and lock_timeout >= 0.0):
            raise ValueError("timeouts must be finite and >= 0 on the TEE side")
        self.ring = ring
        self.hdr = ring.base
        self.data = ring.data
        self.cap = ring.capacity
        self.mask = ring.capacity - 1
        self.max_rec = ring.max_record
        self.lock = <uint32_t *>(ring.base + OFF_WRITER_LOCK)
        self.on_full = on_full
        self.timeout_ns = <int64_t>(min(timeout, 1e9) * 1e9)
        self.lock_timeout_ns = <int64_t>(min(lock_timeout, 1e9) * 1e9)
        if not 0.0 <= spin <= 0.1:
            raise ValueError("spin must be between 0 and 0.1 seconds")
        self.spin_ns = <int64_t>(spin * 1e9)
        self.spin_cur_ns = self.spin_ns
        self.gil_release_bytes = GIL_RELEASE_BYTES if gil_release_bytes is None else gil_release_bytes
        # Adopt the current offsets once, validated, under the lock.
        cdef uint64_t w, r
        cdef int rc
        if not km_lock_try(self.lock):
            with nogil:
                rc = km_lock_wait(self.lock, km_now_ns() + self.lock_timeout_ns)
            if rc != 0:
                raise RingLockTimeout(f"{ring.name}: writer lock held past {lock_timeout}s")
        w = km_ld64_acq(<uint64_t *>(self.hdr + OFF_WRITE))
        r = km_ld64_acq(<uint64_t *>(self.hdr + OFF_READ))
        km_unlock(self.lock)
        if r > w or w - r > self.cap or ((w | r) & 7) != 0:
            raise RingCorrupted(f"{ring.name}: impossible offsets at attach (write={w}, read={r})")
        self.w = w
        self.last_r = r
        self.n_discarded = 0

    @property
    def discarded(self) -> int:
        """Records this writer discarded (its own count; the shared one may be tampered with)."""
        return self.n_discarded

    @property
    def write_offset(self) -> int:
        """The TEE's private write offset."""
        return self.w

    @property
    def max_record(self) -> int:
        return self.max_rec

    @property
    def capacity(self) -> int:
        return self.cap

    cdef int _refresh(self) noexcept nogil:
        """Load the host's read offset and check it is possible; keep it as the cached value."""
        cdef uint64_t r = km_ld64_acq(<uint64_t *>(self.hdr + OFF_READ))
        if r > self.w or self.w - r > self.cap or r < self.last_r or (r & 7) != 0:
            return RC_BAD_READ
        self.last_r = r
        return RC_OK

    cdef int _check(self, uint64_t need, uint64_t *free_out) noexcept nogil:
        """Validate the shared header against the private copies; return the free bytes.

        The read offset is loaded only when the last value seen does not already prove the
        record fits.  It only ever grows, so the cached value can understate the free space but
        never overstate it; and not loading it on every record keeps its cache line from
        bouncing between the two cores once per record.  Whenever it is loaded, it is checked.
        """
        cdef int rc
        cdef uint64_t free
        if km_ld64_rlx(<uint64_t *>(self.hdr + OFF_CAPACITY)) != self.cap:
            return RC_BAD_CAPACITY
        if km_ld64_rlx(<uint64_t *>(self.hdr + OFF_MAX_RECORD)) != self.max_rec:
            return RC_BAD_MAX_RECORD
        if km_ld64_rlx(<uint64_t *>(self.hdr + OFF_WRITE)) != self.w:
            return RC_BAD_WRITE
        free = self.cap - (self.w - self.last_r)
        if free < need:
            rc = self._refresh()
            if rc != RC_OK:
                return rc
            free = self.cap - (self.w - self.last_r)
        free_out[0] = free
        return RC_OK

    cdef inline void _emit(self, const char *buf, uint64_t n, uint32_t typ) noexcept nogil:
        cdef char *p = self.data + (self.w & self.mask)
        cdef uint32_t frame[2]
        frame[0] = <uint32_t>n
        frame[1] = typ
        memcpy(p, frame, FRAME)
        memcpy(p + FRAME, buf, n)
        self.w += rec_size(n)

    cdef inline void _publish(self) noexcept nogil:
        km_st64_rel(<uint64_t *>(self.hdr + OFF_WRITE), self.w)

    cdef inline void _wake_readers(self) noexcept nogil:
        """Wake sleeping readers: only the first write after one went to sleep pays a syscall."""
        cdef uint32_t *flag = <uint32_t *>(self.hdr + OFF_READER_WAITERS)
        km_fence()
        if km_ld32_sc(flag) != 0 and km_xchg32(flag, 0) != 0:
            km_futex_wake(<uint32_t *>(self.hdr + OFF_WRITE), INT_MAX)

    cdef inline void _discard(self) noexcept nogil:
        self.n_discarded += 1
        km_add64(<uint64_t *>(self.hdr + OFF_DISCARDED), 1)

    cdef int _wait_space(self, uint64_t r_seen, int64_t deadline) noexcept nogil:
        """Sleep until the read offset moves or the deadline passes (lock not held)."""
        cdef uint32_t *ww = <uint32_t *>(self.hdr + OFF_WRITER_WAITERS)
        cdef uint64_t *rp = <uint64_t *>(self.hdr + OFF_READ)
        cdef int spun
        cdef int64_t left = deadline - km_now_ns()
        if left <= 0:
            return RC_FULL
        # Only one thread of this Writer spins at a time: on a small machine several spinning
        # writers would take the very CPU the reader needs to free the space they wait for.
        if km_inc32(&self.spinners) == 1:
            spun = km_spin_while_equal(rp, r_seen, min(self.spin_cur_ns, left))
            self.spin_cur_ns = adapt_spin(self.spin_cur_ns, self.spin_ns, spun)
            km_sub32(&self.spinners, 1)
            if spun:
                return RC_OK
        else:
            km_sub32(&self.spinners, 1)
        left = deadline - km_now_ns()
        if left <= 0:
            return RC_FULL
        # Raise the "a writer sleeps" flag, then look once more: either the reader sees the
        # flag after publishing (and wakes us), or we see its new offset here.
        km_st32_sc(ww, 1)
        if km_ld64_sc(rp) == r_seen:
            km_futex_wait(<uint32_t *>rp, <uint32_t>r_seen, left)
        return RC_OK

    cdef int _put_fast(self, const char *buf, uint64_t n, uint32_t typ) noexcept nogil:
        """One attempt without waiting: RC_BUSY if the lock is taken, RC_FULL if no room."""
        cdef uint64_t free
        cdef int rc
        if not km_lock_try(self.lock):
            return RC_BUSY
        rc = self._check(rec_size(n), &free)
        if rc == RC_OK:
            if rec_size(n) <= free:
                self._emit(buf, n, typ)
                self._publish()
            else:
                rc = RC_FULL
        km_unlock(self.lock)
        if rc == RC_OK:
            self._wake_readers()
        return rc

    cdef int _put(self, const char *buf, uint64_t n, uint32_t typ, int mode, int64_t deadline) noexcept nogil:
        cdef uint64_t free
        cdef uint64_t need = rec_size(n)
        cdef int rc
        while True:
            if not km_lock_try(self.lock):
                if km_lock_wait(self.lock, km_now_ns() + self.lock_timeout_ns) != 0:
                    return RC_LOCK_TIMEOUT
            rc = self._check(need, &free)
            if rc != RC_OK:
                km_unlock(self.lock)
                return rc
            if need <= free:
                self._emit(buf, n, typ)
                self._publish()
                km_unlock(self.lock)
                self._wake_readers()
                return RC_OK
            if mode == ON_FULL_DISCARD:
                self._discard()
                km_unlock(self.lock)
                return RC_DISCARDED
            km_unlock(self.lock)
            if mode == ON_FULL_FAIL:
                return RC_FULL
            if self._wait_space(self.last_r, deadline) != RC_OK:
                return RC_FULL

    cdef int _put_many(
        self, const char **ptrs, uint64_t *lens, Py_ssize_t count, uint32_t typ, int mode,
        int64_t deadline, Py_ssize_t *done, Py_ssize_t *written,
    ) noexcept nogil:
        cdef uint64_t free
        cdef uint64_t need
        cdef Py_ssize_t i = 0
        cdef bint wrote, refreshed
        cdef int rc
        written[0] = 0
        while True:
            done[0] = i
            if not km_lock_try(self.lock):
                if km_lock_wait(self.lock, km_now_ns() + self.lock_timeout_ns) != 0:
                    return RC_LOCK_TIMEOUT
            rc = self._check(rec_size(lens[i]), &free)
            if rc != RC_OK:
                km_unlock(self.lock)
                return rc
            wrote = False
            refreshed = False
            while i < count:
                need = rec_size(lens[i])
                if need > free and not refreshed:
                    # decide on the host's latest read offset, not on the cached one
                    refreshed = True
                    rc = self._refresh()
                    if rc != RC_OK:
                        break
                    free = self.cap - (self.w - self.last_r)
                if need <= free:
                    self._emit(ptrs[i], lens[i], typ)
                    free -= need
                    wrote = True
                    written[0] += 1
                elif mode == ON_FULL_DISCARD:
                    self._discard()
                else:
                    break
                i += 1
            if wrote:
                self._publish()
            km_unlock(self.lock)
            if wrote:
                self._wake_readers()
            if rc != RC_OK:
                done[0] = i
                return rc
            done[0] = i
            if i == count:
                return RC_OK
            if mode == ON_FULL_FAIL:
                return RC_FULL
            if self._wait_space(self.last_r, deadline) != RC_OK:
                return RC_FULL

    cdef int _mode(self, object on_full) except -1:
        if on_full is None:
            return self.on_full
        cdef int m = on_full
        if m != ON_FULL_WAIT and m != ON_FULL_DISCARD and m != ON_FULL_FAIL:
            raise ValueError(f"on_full must be WAIT, DISCARD or FAIL, got {on_full!r}")
        return m

    cdef int64_t _deadline(self, object timeout) except? -2:
        if timeout is None:
            return km_now_ns() + self.timeout_ns
        return deadline_after(timeout)

    cdef object _raise(self, int rc, Py_ssize_t written):
        name = self.ring.name
        if rc == RC_FULL:
            raise RingFull(f"{name}: ring full", written)
        if rc == RC_LOCK_TIMEOUT:
            raise RingLockTimeout(
                f"{name}: TEE-side lock held past {self.lock_timeout_ns / 1e9:g}s; record not written",
                written,
            )
        raise corrupted(rc, name)

    def write(self, data: object, type: int = 0, on_full: int | None = None, timeout: float | None = None) -> bool:
        """Append one record.  True if written, False if discarded (DISCARD mode).

        Raises RingFull (FAIL mode, or WAIT timed out), RingLockTimeout, RingCorrupted or
        RecordTooLarge; in every error case the record was not written.
        """
        cdef Py_buffer view
        cdef bint have_view = False
        cdef const char *buf
        cdef Py_ssize_t n
        cdef uint32_t typ = type
        cdef int rc, mode
        cdef int64_t deadline
        if PyBytes_CheckExact(data):
            buf = PyBytes_AS_STRING(data)
            n = PyBytes_GET_SIZE(data)
        else:
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
            have_view = True
            buf = <const char *>view.buf
            n = view.len
        try:
            if <uint64_t>n > self.max_rec:
                raise RecordTooLarge(f"{self.ring.name}: record of {n} bytes exceeds the maximum {self.max_rec}")
            mode = self._mode(on_full)
            if timeout is not None and not timeout >= 0.0:
                raise ValueError(f"timeout must be >= 0 seconds, got {timeout!r}")
            self.ring._enter()
            try:
                if n < self.gil_release_bytes:
                    rc = self._put_fast(buf, n, typ)
                    if rc == RC_OK:
                        return True
                    if rc != RC_BUSY and rc != RC_FULL:
                        self._raise(rc, 0)
                deadline = self._deadline(timeout)
                with nogil:
                    rc = self._put(buf, n, typ, mode, deadline)
            finally:
                self.ring._leave()
        finally:
            if have_view:
                PyBuffer_Release(&view)
        if rc == RC_OK:
            return True
        if rc == RC_DISCARDED:
            return False
        self._raise(rc, 0)

    def write_batch(
        self, records: object, type: int = 0, on_full: int | None = None, timeout: float | None = None
    ) -> int:
        """Append many records under as few lock acquisitions as possible; return how many went in.

        In DISCARD mode records that do not fit are counted and skipped.  When FAIL or a timed
        out WAIT stops the batch, RingFull.written says how many records (a prefix) were written.
        Sizes are checked before anything is written.
        """
        cdef tuple items = tuple(records)
        cdef Py_ssize_t count = PyTuple_GET_SIZE(items)
        cdef Py_ssize_t i, nviews = 0, done = 0, written = 0
        cdef uint32_t typ = type
        cdef int rc = RC_OK, mode = self._mode(on_full)
        cdef int64_t deadline = self._deadline(timeout)
        cdef uint64_t total = 0
        cdef object item
        if count == 0:
            return 0
        cdef const char **ptrs = <const char **>PyMem_Malloc(count * sizeof(char *))
        cdef uint64_t *lens = <uint64_t *>PyMem_Malloc(count * sizeof(uint64_t))
        cdef Py_buffer *views = NULL
        try:
            if ptrs == NULL or lens == NULL:
                raise MemoryError()
            for i in range(count):
                item = <object>PyTuple_GET_ITEM(items, i)
                if PyBytes_CheckExact(item):
                    ptrs[i] = PyBytes_AS_STRING(item)
                    lens[i] = PyBytes_GET_SIZE(item)
                else:
                    if views == NULL:
                        views = <Py_buffer *>PyMem_Malloc(count * sizeof(Py_buffer))
                        if views == NULL:
                            raise MemoryError()
                    PyObject_GetBuffer(item, &views[nviews], PyBUF_SIMPLE)
                    ptrs[i] = <const char *>views[nviews].buf
                    lens[i] = views[nviews].len
                    nviews += 1
                if lens[i] > self.max_rec:
                    raise RecordTooLarge(
                        f"{self.ring.name}: record {i} of {lens[i]} bytes exceeds the maximum {self.max_rec}"
                    )
                total += lens[i]
            self.ring._enter()
            try:
                if <int64_t>total < self.gil_release_bytes:
                    rc = self._put_many(ptrs, lens, count, typ, mode, deadline, &done, &written)
                else:
                    with nogil:
                        rc = self._put_many(ptrs, lens, count, typ, mode, deadline, &done, &written)
            finally:
                self.ring._leave()
        finally:
            for i in range(nviews):
                PyBuffer_Release(&views[i])
            PyMem_Free(views)
            PyMem_Free(ptrs)
            PyMem_Free(lens)
        if rc == RC_OK:
            return written
        self._raise(rc, written)

    def __repr__(self) -> str:
        return f"<Writer {self.ring.name} write_offset={self.w}>"


# ----------------------------------------------------------------------------- Reader

cdef class Reader
cdef class ViewBatch


cdef class _Window:
    """Read-only buffer over a span of the mapped ring, for zero-copy record views.

    It holds the Ring, and counts its exports there, so the mapping cannot be closed while a
    view into it exists.
    """

    cdef Ring ring
    cdef char *ptr
    cdef Py_ssize_t length

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError("ring views are read-only")
        PyBuffer_FillInfo(buffer, self, self.ptr, self.length, 1, flags)
        self.ring.exports += 1

    def __releasebuffer__(self, Py_buffer *buffer):
        self.ring.exports -= 1


cdef class Reader:
    """Host side: consumes records under the host-side lock; several threads may share one.

    Everything read from the mapping (offsets, frame lengths) is validated before use, since the
    other side may be faulty or hostile too.
    """

    cdef Ring ring
    cdef char *hdr
    cdef char *data
    cdef uint64_t cap
    cdef uint64_t mask
    cdef uint64_t max_rec
    cdef uint32_t *lock
    cdef int64_t lock_timeout_ns
    cdef uint32_t interrupts
    cdef uint64_t w_cache
    cdef int64_t spin_ns
    cdef int64_t spin_cur_ns
    cdef uint32_t spinners
    cdef readonly Py_ssize_t gil_release_bytes

    def __cinit__(
        self,
        Ring ring not None,
        *,
        lock_timeout: float | None = 5.0,
        gil_release_bytes: int | None = None,
        spin: float = 50e-6,
    ) -> None:
        if ring.base == NULL:
            raise RingClosed(f"ring {ring.name} is closed")
        self.ring = ring
        self.hdr = ring.base
        self.data = ring.data
        self.cap = ring.capacity
        self.mask = ring.capacity - 1
        self.max_rec = ring.max_record
        self.lock = <uint32_t *>(ring.base + OFF_READER_LOCK)
        if lock_timeout is None:
            self.lock_timeout_ns = -1
        elif lock_timeout >= 0.0:
            self.lock_timeout_ns = <int64_t>(min(lock_timeout, 1e9) * 1e9)
        else:
            raise ValueError("lock_timeout must be >= 0 or None")
        self.gil_release_bytes = GIL_RELEASE_BYTES if gil_release_bytes is None else gil_release_bytes
        if not 0.0 <= spin <= 0.1:
            raise ValueError("spin must be between 0 and 0.1 seconds")
        self.spin_ns = <int64_t>(spin * 1e9)
        self.spin_cur_ns = self.spin_ns
        self.interrupts = 0
        self.w_cache = 0

    cdef int _lock(self) except -1:
        cdef int rc
        if km_lock_try(self.lock):
            return 0
        cdef int64_t deadline = -1 if self.lock_timeout_ns < 0 else km_now_ns() + self.lock_timeout_ns
        with nogil:
            rc = km_lock_wait(self.lock, deadline)
        if rc != 0:
            raise RingLockTimeout(f"{self.ring.name}: host-side lock held past {self.lock_timeout_ns / 1e9:g}s")
        return 0

    cdef inline void _unlock(self) noexcept nogil:
        km_unlock(self.lock)

    cdef int _offsets(self, uint64_t *r, uint64_t *w, bint fresh) noexcept nogil:
        """Read offset, and a write offset known to be published.

        Single reads (fresh=False) reuse the last write offset loaded while records below it
        remain, so the writer's cache line is not pulled over once per record; batches load
        it every time, to return everything published before the call.
        """
        r[0] = km_ld64_rlx(<uint64_t *>(self.hdr + OFF_READ))
        if km_ld64_rlx(<uint64_t *>(self.hdr + OFF_CAPACITY)) != self.cap:
            return RC_BAD_CAPACITY
        if (r[0] & 7) != 0:
            return RC_BAD_READ
        w[0] = self.w_cache
        if fresh or w[0] <= r[0] or w[0] - r[0] > self.cap:
            w[0] = km_ld64_acq(<uint64_t *>(self.hdr + OFF_WRITE))
            if w[0] < r[0] or w[0] - r[0] > self.cap or (w[0] & 7) != 0:
                return RC_BAD_WRITE
            self.w_cache = w[0]
        return RC_OK

    cdef inline int _frame(self, uint64_t r, uint64_t avail, uint64_t *n, uint32_t *typ) noexcept nogil:
        cdef uint32_t frame[2]
        memcpy(frame, self.data + (r & self.mask), FRAME)
        if frame[0] > self.max_rec or rec_size(frame[0]) > avail:
            return RC_BAD_FRAME
        n[0] = frame[0]
        typ[0] = frame[1]
        return RC_OK

    cdef inline void _commit(self, uint64_t r) noexcept nogil:
        km_st64_rel(<uint64_t *>(self.hdr + OFF_READ), r)

    cdef inline void _wake_writers(self) noexcept nogil:
        """Wake sleeping writers: only the first read after one went to sleep pays a syscall."""
        cdef uint32_t *flag = <uint32_t *>(self.hdr + OFF_WRITER_WAITERS)
        km_fence()
        if km_ld32_sc(flag) != 0 and km_xchg32(flag, 0) != 0:
            km_futex_wake(<uint32_t *>(self.hdr + OFF_READ), INT_MAX)

    cdef int _wait_data(self, int64_t deadline) noexcept nogil:
        """Sleep until the ring is non-empty, the deadline passes, or interrupt() is called.

        The "a reader sleeps" flag is raised before the last look at the write offset, so a
        writer either sees the flag after publishing (and wakes us), or we see its record.  The
        first writer to see the flag clears it, so a wake costs one syscall per sleep, not one
        per record while the sleeper is being scheduled.
        """
        cdef uint32_t *rw = <uint32_t *>(self.hdr + OFF_READER_WAITERS)
        cdef uint64_t *wp = <uint64_t *>(self.hdr + OFF_WRITE)
        cdef uint64_t *rp = <uint64_t *>(self.hdr + OFF_READ)
        cdef uint32_t gen = km_ld32_sc(&self.interrupts)
        cdef uint64_t w
        cdef int64_t left
        cdef int spun
        w = km_ld64_acq(rp)
        if km_ld64_acq(wp) != w:
            return RC_OK
        left = self.spin_cur_ns
        if deadline >= 0:
            left = min(left, deadline - km_now_ns())
        if km_inc32(&self.spinners) == 1:  # one spinning thread per Reader, as for writers
            spun = km_spin_while_equal(wp, w, left)
            self.spin_cur_ns = adapt_spin(self.spin_cur_ns, self.spin_ns, spun)
            km_sub32(&self.spinners, 1)
            if spun:
                return RC_OK
        else:
            km_sub32(&self.spinners, 1)
        while True:
            km_st32_sc(rw, 1)
            w = km_ld64_sc(wp)
            if w != km_ld64_sc(rp):
                return RC_OK
            if km_ld32_sc(&self.interrupts) != gen:
                return RC_EMPTY
            left = -1
            if deadline >= 0:
                left = deadline - km_now_ns()
                if left <= 0:
                    return RC_EMPTY
            km_futex_wait(<uint32_t *>wp, <uint32_t>w, left)

    def interrupt(self) -> None:
        """Wake every thread of this Reader blocked in a read (they return empty-handed)."""
        if self.ring.base == NULL:
            raise RingClosed(f"ring {self.ring.name} is closed")
        km_add32(&self.interrupts, 1)
        km_futex_wake(<uint32_t *>(self.hdr + OFF_WRITE), INT_MAX)

    def wait_readable(self, timeout: float | None = None) -> bool:
        """Block (GIL released) until the ring holds data; False on timeout or interrupt()."""
        cdef int64_t deadline = deadline_after(timeout)
        cdef int rc
        self.ring._enter()
        try:
            with nogil:
                rc = self._wait_data(deadline)
        finally:
            self.ring._leave()
        return rc == RC_OK

    cdef object _take(self, bint typed):
        """Consume one record; None if the ring is empty."""
        cdef uint64_t r, w, n
        cdef uint32_t typ
        cdef int rc
        cdef object out = None
        cdef char *dst
        cdef const char *src
        self._lock()
        try:
            rc = self._offsets(&r, &w, False)
            if rc != RC_OK:
                raise corrupted(rc, self.ring.name)
            if r == w:
                return None
            rc = self._frame(r, w - r, &n, &typ)
            if rc != RC_OK:
                raise corrupted(rc, self.ring.name)
            src = self.data + ((r + FRAME) & self.mask)
            if <int64_t>n < self.gil_release_bytes:
                out = PyBytes_FromStringAndSize(src, n)
            else:
                out = PyBytes_FromStringAndSize(NULL, n)
                dst = PyBytes_AS_STRING(out)
                with nogil:
                    memcpy(dst, src, n)
            self._commit(r + rec_size(n))
        finally:
            self._unlock()
        self._wake_writers()
        if typed:
            return (typ, out)
        return out

    cdef object _read(self, object timeout, bint typed):
        cdef int64_t deadline = 0
        cdef object out
        cdef int rc
        if timeout is not None and timeout == 0:
            deadline = 0
        else:
            deadline = deadline_after(timeout)
        self.ring._enter()
        try:
            while True:
                out = self._take(typed)
                if out is not None or deadline == 0:
                    return out
                with nogil:
                    rc = self._wait_data(deadline)
                if rc != RC_OK:
                    return self._take(typed)
        finally:
            self.ring._leave()

    def read(self, timeout: float | None = 0.0) -> bytes | None:
        """One payload, or None if nothing arrived in time (0: don't wait; None: wait forever)."""
        return self._read(timeout, False)

    def read_typed(self, timeout: float | None = 0.0) -> tuple[int, bytes] | None:
        """One (type, payload) pair, or None if nothing arrived in time."""
        return self._read(timeout, True)

    cdef object _take_many(self, Py_ssize_t max_records, bint typed):
        cdef uint64_t r, w, start, n, total = 0
        cdef uint32_t typ
        cdef int rc
        cdef Py_ssize_t k = 0, i, slots
        cdef uint64_t *offs = NULL
        cdef uint64_t *lens = NULL
        cdef uint32_t *types = NULL
        cdef char **dsts = NULL
        cdef list out
        cdef object item
        cdef bint release
        self._lock()
        try:
            rc = self._offsets(&r, &w, True)
            if rc != RC_OK:
                raise corrupted(rc, self.ring.name)
            if r == w:
                return []
            slots = <Py_ssize_t>min(<uint64_t>max_records, (w - r) // FRAME)
            offs = <uint64_t *>PyMem_Malloc(slots * sizeof(uint64_t))
            lens = <uint64_t *>PyMem_Malloc(slots * sizeof(uint64_t))
            types = <uint32_t *>PyMem_Malloc(slots * sizeof(uint32_t))
            dsts = <char **>PyMem_Malloc(slots * sizeof(char *))
            if offs == NULL or lens == NULL or types == NULL or dsts == NULL:
                raise MemoryError()
            start = r
            while k < slots and r != w:
                rc = self._frame(r, w - r, &n, &typ)
                if rc != RC_OK:
                    if k == 0:
                        raise corrupted(rc, self.ring.name)
                    break       # hand over the good prefix; the bad frame raises next time
                offs[k] = (r + FRAME) & self.mask
                lens[k] = n
                types[k] = typ
                total += n
                r += rec_size(n)
                k += 1
            out = PyList_New(k)
            release = <int64_t>total >= self.gil_release_bytes
            for i in range(k):
                if release:
                    item = PyBytes_FromStringAndSize(NULL, lens[i])
                    dsts[i] = PyBytes_AS_STRING(item)
                else:
                    item = PyBytes_FromStringAndSize(self.data + offs[i], lens[i])
                if typed:
                    item = (types[i], item)
                Py_INCREF(item)
                PyList_SET_ITEM(out, i, item)
            if release:
                with nogil:
                    for i in range(k):
                        memcpy(dsts[i], self.data + offs[i], lens[i])
            self._commit(r)
        finally:
            self._unlock()
            PyMem_Free(offs)
            PyMem_Free(lens)
            PyMem_Free(types)
            PyMem_Free(dsts)
        self._wake_writers()
        return out

    cdef object _read_many(self, Py_ssize_t max_records, object timeout, bint typed):
        cdef int64_t deadline
        cdef list out
        cdef int rc
        if max_records < 1:
            raise ValueError("max_records must be >= 1")
        if timeout is not None and timeout == 0:
            deadline = 0
        else:
            deadline = deadline_after(timeout)
        self.ring._enter()
        try:
            while True:
                out = self._take_many(max_records, typed)
                if out or deadline == 0:
                    return out
                with nogil:
                    rc = self._wait_data(deadline)
                if rc != RC_OK:
                    return self._take_many(max_records, typed)
        finally:
            self.ring._leave()

    def read_batch(self, max_records: int = 4096, timeout: float | None = 0.0) -> list[bytes]:
        """Up to max_records payloads in ring order (empty list if nothing arrived in time)."""
        return self._read_many(max_records, timeout, False)

    def read_batch_typed(self, max_records: int = 4096, timeout: float | None = 0.0) -> list[tuple[int, bytes]]:
        """Up to max_records (type, payload) pairs in ring order."""
        return self._read_many(max_records, timeout, True)

    def views(self, max_records: int = 4096, timeout: float | None = 0.0) -> ViewBatch:
        """Zero-copy: a ViewBatch of (type, memoryview) into the ring, consumed on commit().

        The host-side lock stays held until the batch is committed or aborted (use it as a
        context manager: commit on success, abort on exception), because the bytes belong to
        the writer again as soon as the read offset moves.
        """
        cdef int64_t deadline
        cdef uint64_t r, w, start, n
        cdef uint32_t typ
        cdef int rc
        cdef Py_ssize_t k = 0
        cdef _Window win
        cdef ViewBatch batch = ViewBatch.__new__(ViewBatch)
        batch.reader = self
        batch.records = []
        batch.held = False
        if max_records < 1:
            raise ValueError("max_records must be >= 1")
        if timeout is not None and timeout == 0:
            deadline = 0
        else:
            deadline = deadline_after(timeout)
        self.ring._enter()
        try:
            while True:
                self._lock()
                rc = self._offsets(&r, &w, True)
                if rc != RC_OK:
                    self._unlock()
                    raise corrupted(rc, self.ring.name)
                if r != w:
                    break
                self._unlock()
                if deadline == 0:
                    return batch
                with nogil:
                    rc = self._wait_data(deadline)
                if rc != RC_OK:
                    deadline = 0
            try:
                start = r
                spans = []
                while k < max_records and r != w:
                    rc = self._frame(r, w - r, &n, &typ)
                    if rc != RC_OK:
                        if k == 0:
                            raise corrupted(rc, self.ring.name)
                        break
                    spans.append((typ, r - start + FRAME, n))
                    r += rec_size(n)
                    k += 1
                win = _Window.__new__(_Window)
                win.ring = self.ring
                win.ptr = self.data + (start & self.mask)
                win.length = <Py_ssize_t>(r - start)
                base = memoryview(win)
                batch.base = base
                batch.records = [(t, base[o:o + ln]) for (t, o, ln) in spans]
                batch.new_read = r
                batch.held = True
            except BaseException:
                self._unlock()
                raise
        finally:
            self.ring._leave()
        return batch

    def __repr__(self) -> str:
        return f"<Reader {self.ring.name}>"


cdef class ViewBatch:
    """Records viewed in place; the host-side lock is held until commit() or abort()."""

    cdef Reader reader
    cdef readonly list records
    cdef object base
    cdef uint64_t new_read
    cdef bint held

    def _release_views(self) -> None:
        for _, mv in self.records:
            mv.release()
        if self.base is not None:
            self.base.release()
            self.base = None

    def commit(self) -> None:
        """Consume the viewed records: the views are released and the space goes back to the writer."""
        if not self.held:
            return
        self._release_views()
        self.held = False
        self.reader._commit(self.new_read)
        self.reader._unlock()
        self.reader._wake_writers()

    def abort(self) -> None:
        """Leave the records unread (another read will see them again)."""
        if not self.held:
            return
        self._release_views()
        self.held = False
        self.reader._unlock()

    def __len__(self) -> int:
        return len(self.records)

    def __enter__(self) -> list[tuple[int, memoryview]]:
        return self.records

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def __dealloc__(self) -> None:
        if self.held:
            self.held = False
            self.reader._unlock()


# ----------------------------------------------------------------------------- OCALL support

def spin_cycles(cycles: int) -> None:
    """Burn `cycles` time-stamp-counter cycles with the GIL released (models a world switch)."""
    cdef uint64_t n = cycles
    with nogil:
        km_spin_cycles(n)


def cycle_counter() -> int:
    """The current time-stamp counter (nanoseconds where the CPU has no TSC)."""
    return km_cycles()


def monotonic_ns() -> int:
    return km_now_ns()


HAVE_TSC = bool(KM_HAVE_TSC)
