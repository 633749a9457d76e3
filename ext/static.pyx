# Static files from disk: a compiled phase (Route.phase) that answers every
# request of its route itself, with no backend (docs/configuration.md,
# `static`).  The common request (GET or HEAD of an existing file, no
# conditional, no Range) never leaves C: the path is the routing path with
# the route's prefix taken off (nginx's `alias`), opened beneath the root
# in one openat2(RESOLVE_BENEATH) call, so no path, `..` or symlink can
# lead out of it (no window between a check and the open); the head is
# built here and the body goes by sendfile(2) on plain TCP, or in bounded
# pread chunks written as the client takes them (TLS, or a client that
# reads slowly).  Conditionals, Range, and precompressed siblings go
# through edgeproxy/static/ (Python), only for requests that ask for them.
#
# Opening and stat'ing a file happen on the event loop, as in nginx: on a
# local disk they take microseconds.  Reading never blocks the loop for
# long: sendfile and pread move at most STATIC_CHUNK bytes per call, and
# only while the client's transport is below its high-water mark.

from posix.unistd cimport close as _c_close, pread as _c_pread
from posix.stat cimport struct_stat, fstat as _c_fstat, S_ISREG, S_ISDIR
from posix.types cimport off_t
from libc.errno cimport errno as _c_errno, EAGAIN, EINTR, ENOENT, ENOTDIR, EACCES, EPERM, ENOSYS, \
    EINVAL, ELOOP, EXDEV, ENAMETOOLONG

cdef extern from *:
    """
    #include <fcntl.h>
    #include <unistd.h>
    #include <errno.h>
    #include <time.h>
    #include <sys/syscall.h>
    #include <sys/sendfile.h>
    #if defined(__linux__)
    #include <linux/openat2.h>
    #endif
    /* open path beneath dirfd: with `beneath`, no component (.., a symlink,
       an absolute name) may resolve outside dirfd (RESOLVE_BENEATH); -1
       with errno ENOSYS where the kernel has no openat2 (before 5.6) */
    static int ep_openat2(int dirfd, const char *path, int beneath) {
    #if defined(SYS_openat2) && defined(RESOLVE_BENEATH)
        struct open_how how;
        how.flags = O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK;
        how.mode = 0;
        how.resolve = beneath ? (RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS) : 0;
        return (int)syscall(SYS_openat2, dirfd, path, &how, sizeof how);
    #else
        errno = ENOSYS;
        return -1;
    #endif
    }
    static int ep_openat(int dirfd, const char *path) {
        return openat(dirfd, path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    }
    static void ep_set_errno(int e) { errno = e; }
    static long long ep_mtime(const struct stat *st) { return (long long)st->st_mtime; }
    static int ep_gmtime(long long t, struct tm *out) {
        time_t tt = (time_t)t;
        return gmtime_r(&tt, out) != NULL;
    }
    """
    int ep_openat2(int dirfd, const char *path, int beneath) nogil
    int ep_openat(int dirfd, const char *path) nogil
    long long ep_mtime(const struct_stat *st) nogil
    void ep_set_errno(int e) nogil
    struct tm:
        int tm_sec, tm_min, tm_hour, tm_mday, tm_mon, tm_year, tm_wday
    int ep_gmtime(long long t, tm *out) nogil
    ssize_t sendfile(int out_fd, int in_fd, off_t *offset, size_t count) nogil

cdef enum:
    STATIC_CHUNK = 64 * 1024      # bytes one sendfile or pread moves at most
    STATIC_HOOKED_MAX = 16 << 20  # a route with response hooks reads the file into memory
    STATIC_PATH_MAX = 4096
    STATIC_COMPRESS_MAX = 256 * 1024   # larger files are compressed only as precompressed siblings

# what a request asked for beyond a plain GET (bits of _scan)
cdef enum:
    SF_COND = 1        # a conditional field or Range: evaluated in edgeproxy.static.conditional
    SF_AE = 2          # Accept-Encoding (it has a value in _ae)

cdef const char *_DAYS = b"SunMonTueWedThuFriSat"
cdef const char *_MONTHS = b"JanFebMarAprMayJunJulAugSepOctNovDec"
cdef Scratch _st_out = Scratch()      # a static answer's head (and small bodies)
cdef Scratch _st_path = Scratch()     # the file's path beneath the root, NUL-ended
cdef object _st_log = logging.getLogger("edgeproxy.static")
cdef object _st_evaluate = None       # edgeproxy.static.conditional.evaluate (on first use)
cdef object _st_ranked = None         # edgeproxy.static.negotiate.ranked_encodings
cdef object _st_compress_whole = None # edgeproxy.compress.encoders.compress_whole
cdef bytes _st_boundary = os.urandom(10).hex().encode("ascii")
cdef tuple _ENC_ALL = ("zstd", "br", "gzip")
cdef dict _ENC_SUFFIX = {"zstd": b".zst\x00", "br": b".br\x00", "gzip": b".gz\x00"}  # NUL-ended


cdef inline void _two(Scratch o, int v):
    cdef char d[2]
    d[0] = <char>(48 + v // 10)
    d[1] = <char>(48 + v % 10)
    o.add(d, 2)


cdef int _add_http_date(Scratch o, long long t) except -1:
    """IMF-fixdate (RFC 9110 §5.6.7) of POSIX time t."""
    cdef tm g
    if not ep_gmtime(t, &g):
        ep_gmtime(0, &g)
    o.add(_DAYS + 3 * g.tm_wday, 3)
    o.add(b", ", 2)
    _two(o, g.tm_mday)
    o.add(b" ", 1)
    o.add(_MONTHS + 3 * g.tm_mon, 3)
    o.add(b" ", 1)
    o.add_int(g.tm_year + 1900)
    o.add(b" ", 1)
    _two(o, g.tm_hour)
    o.add(b":", 1)
    _two(o, g.tm_min)
    o.add(b":", 1)
    _two(o, g.tm_sec)
    o.add(b" GMT", 4)
    return 0


cdef inline int _add_etag(Scratch o, long long mtime, long long size) except -1:
    # nginx's: "<mtime hex>-<size hex>"
    o.add(b"\"", 1)
    o.add_hex(<unsigned long long>mtime)
    o.add(b"-", 1)
    o.add_hex(<unsigned long long>size)
    o.add(b"\"", 1)
    return 0


cdef inline int _unhex(unsigned char c) noexcept nogil:
    if b'0' <= c <= b'9':
        return c - 48
    if b'A' <= c <= b'F':
        return c - 55
    if b'a' <= c <= b'f':
        return c - 87
    return -1


@cython.final
cdef class FileSender:
    """The body of one static answer still to go: segments, each bytes (a
    multipart part's head) or (offset, length) of the open file.  Moves
    them while the client's transport takes them (ClientConn.sender;
    resume_writing calls resume)."""
    cdef ClientConn c
    cdef int fd
    cdef list segs
    cdef Py_ssize_t i
    cdef off_t off
    cdef long long left
    cdef bint no_sendfile

    def resume(self):
        self.run()

    def abort(self):
        """The connection ended first."""
        self.c = None
        self._close()

    cdef void _close(self):
        if self.fd >= 0:
            _c_close(self.fd)
            self.fd = -1

    cdef bint _next(self):
        """Load the next segment; 0 when none is left."""
        cdef object s
        while self.i < len(self.segs):
            s = self.segs[self.i]
            self.i += 1
            if type(s) is bytes:
                self.c.transport.write(s)
                if self.c is None or self.c.state == C_CLOSED:
                    return 0
                continue
            self.off = <off_t>(<tuple>s)[0]
            self.left = <long long>(<tuple>s)[1]
            if self.left > 0:
                return 1
        return 0

    cdef void run(self):
        cdef ClientConn c = self.c
        cdef ssize_t n
        cdef size_t want
        cdef bytes chunk
        cdef int err
        while c is not None and self.c is c and c.state != C_CLOSED and not c.writing_paused:
            if self.left == 0:
                if not self._next():
                    if self.c is c and c.state != C_CLOSED:
                        self._done()
                    return
                continue
            want = <size_t>(self.left if self.left < STATIC_CHUNK else STATIC_CHUNK)
            if c.fd >= 0 and not self.no_sendfile and c.transport.get_write_buffer_size() == 0 \
                    and not c.transport.is_closing():
                n = sendfile(c.fd, self.fd, &self.off, want)
                if n > 0:
                    self.left -= n
                    continue
                err = _c_errno
                if n == 0:
                    self._short()
                    return
                if err == EINTR:
                    continue
                if err == EINVAL or err == ENOSYS:
                    self.no_sendfile = 1   # a file system without sendfile
                elif err != EAGAIN:
                    c.close()              # the client went away; the transport reports it
                    return
                # the socket is full: from here the transport queues and tells us when it drains
            chunk = PyBytes_FromStringAndSize(NULL, want)
            n = _c_pread(self.fd, PyBytes_AS_STRING(chunk), want, self.off)
            if n <= 0:
                if n < 0 and _c_errno == EINTR:
                    continue
                self._short()
                return
            self.off += n
            self.left -= n
            c.transport.write(chunk if <size_t>n == want else chunk[:n])

    cdef void _short(self):
        """The file ended before the length announced (it shrank): the
        answer cannot be completed, so the connection closes."""
        cdef ClientConn c = self.c
        _st_log.warning("static: a file shrank while it was being sent; closing the connection")
        self.c = None
        self._close()
        if c is not None:
            c.sender = None
            c.close()

    cdef void _done(self):
        cdef ClientConn c = self.c
        self.c = None
        self._close()
        c.sender = None
        c._response_done()


@cython.final
cdef class StaticPhase(Phase):
    """A route's `static = {...}`: answers every request from the files beneath root."""
    cdef readonly str root
    cdef int rootfd
    cdef bytes root_real             # the root's real path + "/", for the no-openat2 check
    cdef Py_ssize_t prefix           # the route's path prefix, taken off the request's
    cdef bytes index                 # b"index.html", or b"" for none
    cdef bytes fallback              # the file for paths that do not exist (no leading /), or None
    cdef bytes cache_control_line    # b"Cache-Control: ...\r\n" or b""
    cdef bint symlinks               # follow symlinks out of the root
    cdef bint precompressed          # serve name.zst / .br / .gz to clients that accept them
    cdef bint vary                   # send Vary: Accept-Encoding
    cdef bint have_openat2
    cdef dict types                  # b"js" -> b"text/javascript; charset=utf-8"
    cdef tuple offer                 # codings whose siblings may be served, by preference
    cdef tuple compress              # codings compressed on the fly (small files)
    cdef object compress_types       # frozenset of media types (no parameters)
    cdef long long compress_min
    cdef readonly long long served   # answers with a file's body or head (for tests and tools)

    def __init__(self, str root, str route_path, *, str index="index.html", fallback=None,
                 cache_control=None, bint symlinks=False, bint precompressed=False,
                 dict types=None, tuple compress=(), tuple compress_types=(),
                 long long compress_min_size=0):
        self.root = root
        self.rootfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.root_real = os.path.realpath(root).encode("utf-8", "surrogateescape").rstrip(b"/") + b"/"
        self.prefix = len(route_path.encode("latin-1"))
        self.index = index.encode("utf-8") if index else b""
        self.fallback = fallback.lstrip("/").encode("utf-8") if fallback else None
        if cache_control and ("\r" in cache_control or "\n" in cache_control):
            raise ValueError("cache_control must not contain CR or LF")
        self.cache_control_line = (b"Cache-Control: " + cache_control.encode("latin-1") + b"\r\n"
                                   if cache_control else b"")
        self.symlinks = symlinks
        self.precompressed = precompressed
        self.compress = tuple(compress)
        self.compress_types = frozenset(compress_types)
        self.compress_min = compress_min_size
        self.offer = _ENC_ALL if precompressed else ()
        self.vary = precompressed or bool(compress)
        self.types = types if types is not None else {}
        self.have_openat2 = self._probe_openat2()

    def __dealloc__(self):
        if self.rootfd >= 0:
            _c_close(self.rootfd)

    cdef bint _probe_openat2(self):
        cdef int fd = ep_openat2(self.rootfd, b".", 1)
        if fd >= 0:
            _c_close(fd)
            return 1
        _st_log.warning("static root %s: no openat2 in this kernel; symlinks are checked "
                        "after each open instead", self.root)
        return 0

    # -- opening, beneath the root --

    cdef int _open(self, const char *path) except -2:
        """An fd of path beneath the root, or -1 with errno set (EXDEV or
        ELOOP: it leads out of the root)."""
        cdef int fd
        cdef int err
        if path[0] == 0:
            path = b"."
        if self.have_openat2:
            return ep_openat2(self.rootfd, path, 0 if self.symlinks else 1)
        fd = ep_openat(self.rootfd, path)
        if fd < 0 or self.symlinks:
            return fd
        # no openat2: check where the open file really is (no race: it is
        # the file now open that is checked, not a name)
        try:
            real = os.readlink(f"/proc/self/fd/{fd}").encode("utf-8", "surrogateescape")
        except OSError:
            real = b""
        if not (real + b"/").startswith(self.root_real):
            _c_close(fd)
            ep_set_errno(EXDEV)
            return -1
        return fd

    # -- the request --

    cdef int request(self, ClientConn c, Route route, HeadParser hp) except -2:
        cdef bint has_body = not (hp.body == B_NONE or (hp.body == B_LENGTH and hp.content_length == 0))
        cdef bint is_head = c.req_is_head
        cdef Scratch p = _st_path
        cdef const char *rp
        cdef size_t rl, i
        cdef unsigned char ch
        cdef int hi, lo, fd, err
        cdef int flags = 0
        cdef bytes ae = None
        cdef struct_stat st
        cdef bint trailing
        c.req_done = not has_body
        c.state = C_BODY if has_body else C_WAIT
        if has_body:
            c._body_wait(hp.expect_continue)
        c.upq = None
        if not (is_head or (hp.method_len == 3 and memcmp(hp.method, b"GET", 3) == 0)):
            _st_small(c, 405, b"Method Not Allowed", b"Allow: GET, HEAD\r\n")
            return R_ANSWERED
        flags = _scan(hp)
        if flags & SF_AE:
            ae = _st_ae
        # the path beneath the root: the routing path without the route's
        # prefix, its remaining escapes decoded
        rp = _rpath
        rl = _rpath_len
        if <size_t>self.prefix <= rl:
            rp += self.prefix
            rl -= self.prefix
        else:
            rl = 0
        while rl and rp[0] == b'/':
            rp += 1
            rl -= 1
        trailing = rl == 0 or rp[rl - 1] == b'/'
        if rl >= STATIC_PATH_MAX:
            _st_small(c, 414, b"URI Too Long", b"")
            return R_ANSWERED
        p.n = 0
        if p.cap < rl + 64 + <size_t>len(self.index):
            p.grow(rl + 64 + len(self.index))
        i = 0
        while i < rl:
            ch = <unsigned char>rp[i]
            if ch == b'%':
                hi = _unhex(<unsigned char>rp[i + 1]) if i + 2 < rl else -1
                lo = _unhex(<unsigned char>rp[i + 2]) if i + 2 < rl else -1
                if hi < 0 or lo < 0:
                    _st_small(c, 400, b"Bad Request", b"")
                    return R_ANSWERED
                ch = <unsigned char>(hi * 16 + lo)
                if ch == 0 or ch == b'/' or ch == b'\\':
                    # an escaped NUL, slash or backslash names no file
                    _st_small(c, 400, b"Bad Request", b"")
                    return R_ANSWERED
                i += 3
            else:
                if ch == b'\\' or ch == 0:
                    _st_small(c, 400, b"Bad Request", b"")
                    return R_ANSWERED
                i += 1
            p.p[p.n] = <char>ch
            p.n += 1
        if trailing:
            # a directory: its index file
            if not self.index:
                return self._missing(c, hp, 403, ae, flags, is_head)
            p.add(self.index, len(self.index))
        p.p[p.n] = 0
        fd = self._open(p.p)
        if fd < 0:
            err = _c_errno
            if trailing and (err == ENOENT or err == ENOTDIR):
                # no index: a directory that exists is forbidden (no listings)
                p.n -= len(self.index)
                p.p[p.n] = 0
                fd = self._open(p.p)
                if fd >= 0:
                    _c_close(fd)
                    return self._missing(c, hp, 403, ae, flags, is_head)
            return self._missing(c, hp, _status_of_errno(err), ae, flags, is_head)
        if _c_fstat(fd, &st) != 0:
            _c_close(fd)
            return self._missing(c, hp, 500, ae, flags, is_head)
        if S_ISDIR(st.st_mode):
            _c_close(fd)
            if self.index:
                _st_redirect_slash(c, hp)
                return R_ANSWERED
            return self._missing(c, hp, 403, ae, flags, is_head)
        if not S_ISREG(st.st_mode):
            _c_close(fd)       # a FIFO, socket or device is never served
            return self._missing(c, hp, 403, ae, flags, is_head)
        self._serve(c, fd, &st, ae, flags, is_head)
        return R_ANSWERED

    cdef int _missing(self, ClientConn c, HeadParser hp, int status, bytes ae, int flags,
                      bint is_head) except -2:
        """No file for the path: the fallback (a single-page app's
        index.html, with 200) when there is one, else status."""
        cdef int fd
        cdef struct_stat st
        if (status == 404 or status == 403) and self.fallback is not None:
            fd = self._open(self.fallback)
            if fd >= 0:
                if _c_fstat(fd, &st) == 0 and S_ISREG(st.st_mode):
                    _st_path.n = 0
                    _st_path.addb(self.fallback)
                    self._serve(c, fd, &st, ae, flags, is_head)
                    return R_ANSWERED
                _c_close(fd)
        if status == 403:
            _st_small(c, 403, b"Forbidden", b"")
        elif status == 404:
            _st_small(c, 404, b"Not Found", b"")
        else:
            _st_small(c, 500, b"Internal Server Error", b"")
        return R_ANSWERED

    cdef int _serve(self, ClientConn c, int fd, struct_stat *st, bytes ae, int flags,
                    bint is_head) except -1:
        """Answer with the open regular file fd (its name in _st_path)."""
        cdef Scratch o = _st_out
        cdef long long size = st.st_size
        cdef long long mtime = ep_mtime(st)
        cdef bytes ctype = self._type_of(_st_path.p, _st_path.n)
        cdef bytes enc = None
        cdef int sfd
        cdef struct_stat sst
        cdef object verdict
        cdef int status = 200
        cdef list segs = None
        cdef long long total
        cdef Py_ssize_t k
        if self.offer and ae is not None:
            # a precompressed sibling the client accepts: name.zst, .br, .gz
            for coding in _ranked(ae, self.offer):
                suffix = <bytes>_ENC_SUFFIX[coding]
                _st_path.add(suffix, len(suffix))
                sfd = self._open(_st_path.p)
                _st_path.n -= len(suffix)
                if sfd >= 0:
                    if _c_fstat(sfd, &sst) == 0 and S_ISREG(sst.st_mode):
                        _c_close(fd)
                        fd = sfd
                        st = &sst
                        size = sst.st_size
                        mtime = ep_mtime(&sst)
                        enc = coding.encode("ascii")
                        break
                    _c_close(sfd)
        self.served += 1
        if enc is None and self.compress and ae is not None and size <= STATIC_COMPRESS_MAX \
                and size >= max(self.compress_min, 1) and not (flags & SF_COND and b"range" in _st_cond) \
                and ctype.partition(b";")[0].decode("latin-1") in self.compress_types:
            ranked = _ranked(ae, self.compress)
            if ranked:
                self._serve_compressed(c, fd, ranked[0], ctype, mtime, size, flags, is_head)
                return 0
        o.n = 0
        _add_etag(o, mtime, size)
        if flags & SF_COND:
            verdict = self._evaluate(c, o.p[:o.n], mtime, size)
            status = verdict[0]
            if status == 304 or status == 412 or status == 416:
                _c_close(fd)
                self._status_only(c, status, mtime, size, enc)
                return 0
            if status == 206:
                segs = verdict[1]
        o.n = 0
        if status == 206:
            o.add(b"HTTP/1.1 206 Partial Content\r\n", 30)
        else:
            o.add(b"HTTP/1.1 200 OK\r\n", 17)
        o.addb(_date_line)
        o.add(b"Last-Modified: ", 15)
        _add_http_date(o, mtime)
        o.add(b"\r\nETag: ", 8)
        _add_etag(o, mtime, size)
        o.add(b"\r\nAccept-Ranges: bytes\r\n", 24)
        o.addb(self.cache_control_line)
        if self.vary:
            o.add(b"Vary: Accept-Encoding\r\n", 23)
        if enc is not None:
            o.add(b"Content-Encoding: ", 18)
            o.addb(enc)
            o.add(b"\r\n", 2)
        if segs is not None and len(segs) == 1:
            a, b = segs[0]
            o.add(b"Content-Type: ", 14)
            o.addb(ctype)
            o.add(b"\r\nContent-Range: bytes ", 23)
            o.add_int(a)
            o.add(b"-", 1)
            o.add_int(b)
            o.add(b"/", 1)
            o.add_int(size)
            o.add(b"\r\n", 2)
            segs = [(a, b - a + 1)]
            total = b - a + 1
        elif segs is not None:
            parts = []
            total = 0
            for a, b in segs:
                part = b"\r\n--%s\r\nContent-Type: %s\r\nContent-Range: bytes %d-%d/%d\r\n\r\n" % (
                    _st_boundary, ctype, a, b, size)
                if not parts:
                    part = part[2:]
                parts.append(part)
                parts.append((a, b - a + 1))
                total += len(part) + b - a + 1
            end = b"\r\n--%s--\r\n" % _st_boundary
            parts.append(end)
            total += len(end)
            segs = parts
            o.add(b"Content-Type: multipart/byteranges; boundary=", 45)
            o.addb(_st_boundary)
            o.add(b"\r\n", 2)
        else:
            o.add(b"Content-Type: ", 14)
            o.addb(ctype)
            o.add(b"\r\n", 2)
            total = size
            segs = None
        o.add(b"Content-Length: ", 16)
        o.add_int(total)
        o.add(b"\r\n", 2)
        _st_send(c, fd, segs, 0 if is_head else total, status)
        return 0

    cdef int _serve_compressed(self, ClientConn c, int fd, str coding, bytes ctype,
                               long long mtime, long long size, int flags,
                               bint is_head) except -1:
        """A small file compressed on the fly (no precompressed sibling):
        read, compressed in one go (bounded by STATIC_COMPRESS_MAX), sent
        with a weak ETag (its bytes differ from the file's)."""
        cdef Scratch o = _st_out
        cdef bytes data, body, etag
        cdef object verdict
        cdef ssize_t n
        global _st_compress_whole
        if _st_compress_whole is None:
            from edgeproxy.compress.encoders import compress_whole
            _st_compress_whole = compress_whole
        o.n = 0
        o.add(b"W/", 2)
        _add_etag(o, mtime, size)
        etag = o.p[:o.n]
        if flags & SF_COND:
            verdict = self._evaluate(c, etag, mtime, size)
            if verdict[0] != 200:
                _c_close(fd)
                self._status_only(c, verdict[0], mtime, size, coding.encode("ascii"), 1)
                return 0
        data = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>size)
        n = _c_pread(fd, PyBytes_AS_STRING(data), <size_t>size, 0)
        if n != size:
            _c_close(fd)
            _st_log.warning("static: a file changed size while it was read; closing the connection")
            c.close()
            return 0
        try:
            body = _st_compress_whole(coding, data)
        except Exception:
            _st_log.exception("static: %s compression failed", coding)
            _c_close(fd)
            _st_small(c, 500, b"Internal Server Error", b"")
            return 0
        o.n = 0
        o.add(b"HTTP/1.1 200 OK\r\n", 17)
        o.addb(_date_line)
        o.add(b"Last-Modified: ", 15)
        _add_http_date(o, mtime)
        o.add(b"\r\nETag: ", 8)
        o.addb(etag)
        o.add(b"\r\n", 2)
        o.addb(self.cache_control_line)
        o.add(b"Vary: Accept-Encoding\r\nContent-Encoding: ", 41)
        o.addb(coding.encode("ascii"))
        o.add(b"\r\nContent-Type: ", 16)
        o.addb(ctype)
        o.add(b"\r\nContent-Length: ", 18)
        o.add_int(len(body))
        o.add(b"\r\n", 2)
        _st_send(c, fd, [body], 0 if is_head else len(body), 200)
        return 0

    cdef bytes _type_of(self, const char *name, size_t n):
        cdef size_t i = n
        cdef size_t j
        cdef char low[16]
        while i > 0:
            i -= 1
            if name[i] == b'.':
                break
            if name[i] == b'/' or n - i > 15:
                return b"application/octet-stream"
        if name[i] != b'.' or n - i - 1 == 0:
            return b"application/octet-stream"
        for j in range(n - i - 1):
            low[j] = <char>_lower[<unsigned char>name[i + 1 + j]]
        t = self.types.get(low[:n - i - 1])
        return <bytes>t if t is not None else b"application/octet-stream"

    cdef object _evaluate(self, ClientConn c, bytes etag, long long mtime, long long size):
        global _st_evaluate
        if _st_evaluate is None:
            from edgeproxy.static.conditional import evaluate
            _st_evaluate = evaluate
        try:
            return _st_evaluate(not c.req_is_head, etag, mtime, size, _st_cond)
        except Exception:
            _st_log.exception("static: evaluating a conditional request failed; sending the file")
            return (200, None)

    cdef void _status_only(self, ClientConn c, int status, long long mtime, long long size,
                           bytes enc, bint weak=0):
        """304, 412 or 416 for a file."""
        cdef Scratch o = _st_out
        cdef bytes body = b""
        o.n = 0
        if status == 304:
            o.add(b"HTTP/1.1 304 Not Modified\r\n", 27)
            o.addb(_date_line)
            o.add(b"Last-Modified: ", 15)
            _add_http_date(o, mtime)
            o.add(b"\r\nETag: ", 8)
            if weak:
                o.add(b"W/", 2)
            _add_etag(o, mtime, size)
            o.add(b"\r\n", 2)
            o.addb(self.cache_control_line)
            if self.vary:
                o.add(b"Vary: Accept-Encoding\r\n", 23)
            c.respond(o.take(), b"", 304)
            return
        if status == 412:
            body = b"412 Precondition Failed\n"
            o.add(b"HTTP/1.1 412 Precondition Failed\r\n", 34)
        else:
            body = b"416 Range Not Satisfiable\n"
            o.add(b"HTTP/1.1 416 Range Not Satisfiable\r\n", 36)
            o.add(b"Content-Range: bytes */", 23)
            o.add_int(size)
            o.add(b"\r\n", 2)
        o.addb(_date_line)
        o.add(b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: ", 57)
        o.add_int(len(body))
        o.add(b"\r\n", 2)
        c.respond(o.take(), b"" if c.req_is_head else body, status)


# the request's Accept-Encoding and conditional fields, found by _scan
cdef bytes _st_ae = None
cdef dict _st_cond = {}


cdef int _scan(HeadParser hp) except -1:
    """Which fields beyond a plain GET the request has (SF_*)."""
    global _st_ae
    cdef size_t i, nl
    cdef const char *nm
    cdef int flags = 0
    cdef bytes key = None
    for i in range(hp.nfields):
        if hp.hid[i] != H_OTHER:
            continue
        nm = hp.fields[i].name
        nl = hp.fields[i].name_len
        key = None
        if nl == 5:
            if _ieq(nm, nl, b"range", 5):
                key = b"range"
        elif nl == 8:
            if _ieq(nm, nl, b"if-match", 8):
                key = b"if-match"
            elif _ieq(nm, nl, b"if-range", 8):
                key = b"if-range"
        elif nl == 13:
            if _ieq(nm, nl, b"if-none-match", 13):
                key = b"if-none-match"
        elif nl == 15:
            if _ieq(nm, nl, b"accept-encoding", 15):
                v = hp.fields[i].value[:hp.fields[i].value_len]
                _st_ae = v if not flags & SF_AE else _st_ae + b", " + v
                flags |= SF_AE
        elif nl == 17:
            if _ieq(nm, nl, b"if-modified-since", 17):
                key = b"if-modified-since"
        elif nl == 19:
            if _ieq(nm, nl, b"if-unmodified-since", 19):
                key = b"if-unmodified-since"
        if key is not None:
            if not flags & SF_COND:
                _st_cond.clear()
                flags |= SF_COND
            v = hp.fields[i].value[:hp.fields[i].value_len]
            # field lines of one name combine with commas (RFC 9110 §5.3)
            _st_cond[key] = (_st_cond[key] + b", " + v) if key in _st_cond else v
    return flags


cdef tuple _ranked(bytes ae, tuple offer):
    global _st_ranked
    if _st_ranked is None:
        from edgeproxy.static.negotiate import ranked_encodings
        _st_ranked = ranked_encodings
    try:
        return _st_ranked(ae, offer)
    except Exception:
        _st_log.exception("static: Accept-Encoding negotiation failed")
        return ()


cdef inline int _status_of_errno(int err) noexcept:
    if err == ENOENT or err == ENOTDIR or err == ENAMETOOLONG:
        return 404
    if err == EACCES or err == EPERM or err == EXDEV or err == ELOOP:
        return 403         # unreadable, or it leads out of the root
    return 500


cdef void _st_small(ClientConn c, int status, bytes reason, bytes extra):
    """A short text answer of the static phase's own (errors, 405)."""
    cdef bytes body = b"%d %s\n" % (status, reason)
    cdef bytes head = b"HTTP/1.1 %d %s\r\n%s%sContent-Type: text/plain; charset=utf-8\r\n" \
                      b"Content-Length: %d\r\n" % (status, reason, _date_line, extra, len(body))
    c.respond(head, b"" if c.req_is_head else body, status)


cdef void _st_redirect_slash(ClientConn c, HeadParser hp):
    """A directory named without its trailing slash: 301 to the name with it
    (as nginx does), keeping the query."""
    cdef size_t pl = _path_length(hp.target, hp.target_len) if hp.target[0] == b'/' else 0
    cdef bytes loc
    if pl == 0:
        _st_small(c, 404, b"Not Found", b"")
        return
    loc = hp.target[:pl] + b"/" + hp.target[pl:hp.target_len]
    body = b"301 Moved Permanently\n"
    c.respond(b"HTTP/1.1 301 Moved Permanently\r\n%sLocation: %s\r\n"
              b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
              % (_date_line, loc, len(body)), b"" if c.req_is_head else body, 301)


cdef void _st_send(ClientConn c, int fd, list segs, long long total, int status):
    """Send the head in _st_out, then `total` bytes of body: the whole
    file (segs None) or segs (FileSender's segments).  As respond() does:
    the core's own fields, keep-alive, then the next request."""
    cdef Scratch o = _st_out
    cdef bint keep
    cdef ssize_t n
    cdef FileSender s
    cdef object body
    if c.ctx is not None and c.ctx.chain.wants & ((1 << PHASE_RESPONSE) | (1 << PHASE_RESPONSE_BODY)):
        # response hooks see the answer whole: read it (bounded)
        head = o.take()
        if total > STATIC_HOOKED_MAX:
            _c_close(fd)
            _st_log.error("static: a %d-byte file on a route with response hooks (they get "
                          "files up to %d bytes)", total, STATIC_HOOKED_MAX)
            _st_small(c, 500, b"Internal Server Error", b"")
            return
        body = _read_segs(fd, segs, total)
        _c_close(fd)
        if body is None:
            c.close()
            return
        c.respond(head, body, status)
        return
    keep = c.req_keep_alive and c.req_done and not c.eof and not _draining
    c.resp_status = status
    c.resp_started = 1
    c.resp_keep = keep
    c.resp_bytes = total
    o.addb(c.cfg.server_line)
    o.addb(c.lst.resp_extra)
    if keep:
        if c.req_minor == 0:
            o.add(b"Connection: keep-alive\r\n", 24)
    else:
        o.add(b"Connection: close\r\n", 19)
    o.add(b"\r\n", 2)
    c.resp_head_len = o.n
    if total == 0:
        _c_close(fd)
        c._send_parts(o.p, o.n, None)
        c._response_done()
        return
    if segs is None and total <= INLINE_BODY:
        # small: the body rides in the head's write
        if o.n + <size_t>total > o.cap:
            o.grow(<size_t>total)
        n = _c_pread(fd, o.p + o.n, <size_t>total, 0)
        _c_close(fd)
        if n != total:
            _st_log.warning("static: a file changed size while it was read; closing the connection")
            c.close()
            return
        o.n += <size_t>total
        c._send_parts(o.p, o.n, None)
        c._response_done()
        return
    if c.fd == -2:
        c.fd = c._socket_fd()
    c._send_parts(o.p, o.n, None)
    s = FileSender.__new__(FileSender)
    s.c = c
    s.fd = fd
    s.segs = segs if segs is not None else [(0, total)]
    c.sender = s
    s.run()


cdef object _read_segs(int fd, list segs, long long total):
    cdef list out = []
    cdef bytes chunk
    cdef ssize_t n
    if segs is None:
        segs = [(0, total)]
    for s in segs:
        if type(s) is bytes:
            out.append(s)
            continue
        chunk = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>s[1])
        n = _c_pread(fd, PyBytes_AS_STRING(chunk), <size_t>s[1], <off_t>s[0])
        if n != <ssize_t>s[1]:
            return None
        out.append(chunk)
    return b"".join(out)
