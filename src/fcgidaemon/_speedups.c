/*
 * fcgidaemon._speedups: the FastCGI name-value pair decoder, and the usual request's records, in C.
 *
 * Why: decoding a request's params was the largest single share of the daemon's own time per
 * request (9.5 of 54 us per kept-connection hello on the benchmark machine, bench/micro.py):
 * a Python loop runs a dozen bytecodes for each of the 20-30 pairs nginx or Apache sends.
 * This does the same work in one pass. fastcgi.decode_params uses it when it was built and
 * keeps the pure-Python decoder as the fallback (no C compiler at install time) and as the
 * reference the tests hold it to (tests/test_codec.py runs both on the same inputs).
 *
 * decode_params(data) -> dict | None
 *   data: any bytes-like object, a whole PARAMS stream.
 *   Each name and value becomes a str holding its bytes as latin-1 (WSGI's "native strings").
 *   Returns None when a name comes more than once: the caller merges those in Python.
 *   Raises ValueError when a length runs past the stream (the caller's ProtocolError).
 *
 * scan_request(buffer, max_params) -> (request_id, flags, params, end, stdin_done) | None
 *   The usual start of a request, all of it at the start of the buffer: a responder's
 *   BEGIN_REQUEST, its PARAMS records up to the empty one, and the empty STDIN after them when it
 *   is there (a GET's whole body). Why: Connection.parse_available took 9.6 us per hello with the
 *   Python loop over those four records, 5.2 us with this (the Request built in both). Anything else (a management record, another request id, a
 *   record cut short, params over max_params, a malformed or repeated pair, another role)
 *   answers None, and Connection.parse_available takes the buffer record by record as before:
 *   every error and every unusual case stays in the Python path, which the tests hold this to.
 *
 * take_stdin(buffer, pos, size, request_id) -> (chunks, total, end, ended) | None
 *   The complete FCGI_STDIN records of `request_id` from `pos` on (up to `size`): their contents
 *   as bytes (empty ones left out), their total length, the offset after the last one taken,
 *   and whether it was the empty one that ends the body (taken last). None when the record at
 *   `pos` is not such a record, or not all there. Why: Apache sends a body in records of 8 KiB,
 *   and the Python loop (header, copy, dispatch, the stream's bookkeeping) took about 5 us per
 *   record: 0.6 ms of a 1 MiB POST. Anything else (another type or request, a bad version)
 *   stops it, and Connection._take_input takes that record in Python, which raises the errors.
 *
 * board_started(board, base, method, uri) -> float
 * board_finished(board, base, requests, since, state) -> None
 *   A worker's two writes to its own scoreboard record per request (scoreboard.py has the layout,
 *   and the Python versions these are held to by tests/test_scoreboard.py). Why: the Python
 *   versions took 1.6 and 1.4 us per request, a large share of a kept-connection hello's own
 *   work; each is a few stores. The clock is CLOCK_MONOTONIC, time.monotonic()'s, read the same
 *   way (nanoseconds, then seconds as a double), so the times compare with Python's.
 *
 * Every read is checked against the buffer's size before it is made; lengths are unsigned
 * 31-bit values, and sums are checked against the remaining size, not added first.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

/* One length at *pos (1 byte below 128, else 4 bytes with the top bit set); -1 if cut short. */
static Py_ssize_t
read_length(const unsigned char *p, Py_ssize_t size, Py_ssize_t *pos)
{
    Py_ssize_t at = *pos;
    if (at >= size)
        return -1;
    if (p[at] < 128) {
        *pos = at + 1;
        return p[at];
    }
    if (size - at < 4)
        return -1;
    *pos = at + 4;
    return ((Py_ssize_t)(p[at] & 0x7F) << 24) | ((Py_ssize_t)p[at + 1] << 16)
           | ((Py_ssize_t)p[at + 2] << 8) | (Py_ssize_t)p[at + 3];
}

/* The pairs of p[0:size] as a new dict. NULL with an exception set when a length runs past the
 * stream; *repeated is set (and the dict still returned) when a name comes more than once. */
static PyObject *
decode_pairs(const unsigned char *p, Py_ssize_t size, int *repeated)
{
    Py_ssize_t pos = 0, pairs = 0;
    PyObject *params = PyDict_New();
    if (params == NULL)
        return NULL;
    while (pos < size) {
        Py_ssize_t n = read_length(p, size, &pos);
        Py_ssize_t v = n < 0 ? -1 : read_length(p, size, &pos);
        if (v < 0) {
            PyErr_SetString(PyExc_ValueError, "truncated name-value pair");
            goto fail;
        }
        if (n > size - pos || v > size - pos - n) {
            PyErr_SetString(PyExc_ValueError, "name-value pair longer than its stream");
            goto fail;
        }
        PyObject *name = PyUnicode_DecodeLatin1((const char *)p + pos, n, NULL);
        if (name == NULL)
            goto fail;
        PyObject *value = PyUnicode_DecodeLatin1((const char *)p + pos + n, v, NULL);
        if (value == NULL) {
            Py_DECREF(name);
            goto fail;
        }
        int failed = PyDict_SetItem(params, name, value);
        Py_DECREF(name);
        Py_DECREF(value);
        if (failed)
            goto fail;
        pos += n + v;
        pairs++;
    }
    *repeated = PyDict_GET_SIZE(params) != pairs;
    return params;
fail:
    Py_DECREF(params);
    return NULL;
}

static PyObject *
decode_params(PyObject *module, PyObject *arg)
{
    Py_buffer view;
    int repeated = 0;

    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *params = decode_pairs((const unsigned char *)view.buf, view.len, &repeated);
    PyBuffer_Release(&view);
    if (params != NULL && repeated) {  /* merged by the caller, in Python */
        Py_DECREF(params);
        params = Py_NewRef(Py_None);
    }
    return params;
}

/* FastCGI record header (spec 3.3) */
#define HEADER_LEN 8
#define VERSION_1 1
#define BEGIN_REQUEST 1
#define PARAMS 4
#define STDIN 5
#define RESPONDER 1

typedef struct {
    int version, type, request_id;
    Py_ssize_t length, end;  /* content length; offset just past the record (padding included) */
} record;

/* The complete record at `pos`, or 0 when the buffer holds less than all of it. */
static int
read_record(const unsigned char *p, Py_ssize_t size, Py_ssize_t pos, record *rec)
{
    if (size - pos < HEADER_LEN)
        return 0;
    rec->version = p[pos];
    rec->type = p[pos + 1];
    rec->request_id = (p[pos + 2] << 8) | p[pos + 3];
    rec->length = (p[pos + 4] << 8) | p[pos + 5];
    Py_ssize_t total = HEADER_LEN + rec->length + p[pos + 6];
    if (size - pos < total)
        return 0;
    rec->end = pos + total;
    return 1;
}

static PyObject *
scan_request(PyObject *module, PyObject *args)
{
    Py_buffer view;
    PyObject *limit;
    PyObject *result = NULL, *params = NULL;
    record rec;

    if (!PyArg_ParseTuple(args, "y*O!", &view, &PyLong_Type, &limit))
        return NULL;
    /* any int, clipped to the C range: --max-params takes sizes past it (1e30 is a valid limit,
     * and "n" raised OverflowError for it, failing every request); clipped, the comparisons
     * below answer as the Python path's do */
    const Py_ssize_t max_params = PyNumber_AsSsize_t(limit, NULL);
    const unsigned char *p = (const unsigned char *)view.buf;
    const Py_ssize_t size = view.len;

    /* BEGIN_REQUEST of a responder */
    if (!read_record(p, size, 0, &rec) || rec.version != VERSION_1 || rec.type != BEGIN_REQUEST
        || rec.request_id == 0 || rec.length != 8)
        goto plain;
    const int id = rec.request_id;
    const int role = (p[HEADER_LEN] << 8) | p[HEADER_LEN + 1];
    const int flags = p[HEADER_LEN + 2];
    if (role != RESPONDER)
        goto plain;

    /* PARAMS records up to the empty one that ends the stream: counted and sized first */
    Py_ssize_t pos = rec.end, first = rec.end, total = 0, records = 0;
    for (;;) {
        if (!read_record(p, size, pos, &rec) || rec.version != VERSION_1 || rec.type != PARAMS
            || rec.request_id != id)
            goto plain;
        pos = rec.end;
        if (rec.length == 0)
            break;
        if (rec.length > max_params - total)
            goto plain;  /* over --max-params: the Python path says so */
        total += rec.length;
        records++;
    }
    Py_ssize_t end = pos;

    int repeated = 0;
    if (records == 1) {  /* the usual case: decoded where it lies */
        params = decode_pairs(p + first + HEADER_LEN, total, &repeated);
    } else {
        unsigned char *joined = PyMem_Malloc(total ? total : 1);
        if (joined == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        Py_ssize_t at = first, filled = 0;
        while (filled < total) {
            read_record(p, size, at, &rec);  /* complete: checked above */
            memcpy(joined + filled, p + at + HEADER_LEN, rec.length);
            filled += rec.length;
            at = rec.end;
        }
        params = decode_pairs(joined, total, &repeated);
        PyMem_Free(joined);
    }
    if (params == NULL) {  /* a malformed pair: the Python path raises the ProtocolError */
        if (!PyErr_ExceptionMatches(PyExc_ValueError))
            goto done;
        PyErr_Clear();
        goto plain;
    }
    if (repeated)
        goto plain;

    /* the body's end (an empty STDIN: a GET's whole body), when it is already here */
    int stdin_done = 0;
    if (read_record(p, size, end, &rec) && rec.version == VERSION_1 && rec.type == STDIN
        && rec.request_id == id && rec.length == 0) {
        stdin_done = 1;
        end = rec.end;
    }
    result = Py_BuildValue("iiOnO", id, flags, params, end, stdin_done ? Py_True : Py_False);
    goto done;
plain:
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(params);
    PyBuffer_Release(&view);
    return result;
}

static PyObject *
take_stdin(PyObject *module, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t pos, size, total = 0;
    int request_id, ended = 0;
    record rec;

    if (!PyArg_ParseTuple(args, "y*nni", &view, &pos, &size, &request_id))
        return NULL;
    const unsigned char *p = (const unsigned char *)view.buf;
    if (size > view.len)
        size = view.len;
    PyObject *chunks = PyList_New(0);
    if (chunks == NULL || pos < 0 || size < 0 || pos > size)  /* read_record's size - pos >= 0 */
        goto fail_or_none;
    const Py_ssize_t start = pos;
    while (!ended && read_record(p, size, pos, &rec) && rec.version == VERSION_1
           && rec.type == STDIN && rec.request_id == request_id) {
        if (rec.length == 0) {
            ended = 1;
        } else {
            PyObject *chunk = PyBytes_FromStringAndSize((const char *)p + pos + HEADER_LEN,
                                                        rec.length);
            if (chunk == NULL || PyList_Append(chunks, chunk) < 0) {
                Py_XDECREF(chunk);
                Py_CLEAR(chunks);
                goto fail_or_none;
            }
            Py_DECREF(chunk);
            total += rec.length;
        }
        pos = rec.end;
    }
    if (pos == start)
        goto fail_or_none;
    PyBuffer_Release(&view);
    return Py_BuildValue("NnnO", chunks, total, pos, ended ? Py_True : Py_False);
fail_or_none:
    PyBuffer_Release(&view);
    if (chunks == NULL)
        return NULL;  /* an exception is set */
    Py_DECREF(chunks);
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- the scoreboard's request writes */

/* A worker record's layout (scoreboard.RECORD, "=iiBxH4xQQd8s96sdd12Q": 256 bytes); every 8-byte
 * field is at a multiple of 8. Readers copy the record without a lock while we write it, so each
 * 8-byte field is written with one atomic store (never torn, never merged or split by the
 * compiler), and the state byte last, with release order: whoever sees the new state sees the
 * fields written before it. The texts are plain copies: a reader may see a mix of two. */
#define REC_SIZE 256
#define OFF_STATE 8
#define OFF_REQUESTS 16
#define OFF_BUSY 32
#define OFF_METHOD 40
#define METHOD_LEN 8
#define OFF_URI 48
#define URI_LEN 96
#define OFF_LAST 144
#define OFF_SUM 152
#define OFF_HIST 160
#define SLOT_BUSY 3
/* scoreboard.BUCKETS; the last histogram count is +Inf (tests/test_scoreboard.py checks both agree) */
static const double buckets[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0};
#define NBUCKETS ((Py_ssize_t)(sizeof(buckets) / sizeof(buckets[0])))

/* time.monotonic(): CLOCK_MONOTONIC as nanoseconds, then seconds as a double, as CPython does */
static double
monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    long long ns = (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    if (ns % 1000000000LL == 0)
        return (double)(ns / 1000000000LL);
    return (double)ns / 1e9;
}

/* `text` as latin-1 ("?" for any other character), cut to `size` bytes, NUL-padded: what
 * text.encode("latin-1", "replace")[:size].ljust(size, b"\0") gives */
static void
put_text(unsigned char *dst, PyObject *text, Py_ssize_t size)
{
    Py_ssize_t n = PyUnicode_GET_LENGTH(text), i;
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    if (n > size)
        n = size;
    for (i = 0; i < n; i++) {
        Py_UCS4 ch = PyUnicode_READ(kind, data, i);
        dst[i] = ch < 256 ? (unsigned char)ch : '?';
    }
    memset(dst + n, 0, size - n);
}

#define STORE_U64(at, value) __atomic_store_n((unsigned long long *)(at), (value), __ATOMIC_RELAXED)
#define LOAD_U64(at) __atomic_load_n((unsigned long long *)(at), __ATOMIC_RELAXED)
#define STORE_STATE(rec, value) __atomic_store_n((rec) + OFF_STATE, (unsigned char)(value), __ATOMIC_RELEASE)

static void
store_double(unsigned char *at, double value)
{
    unsigned long long bits;
    memcpy(&bits, &value, sizeof bits);
    STORE_U64(at, bits);
}

static double
load_double(unsigned char *at)
{
    unsigned long long bits = LOAD_U64(at);
    double value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* The record at `base` in a writable view of the board, or NULL with ValueError set. The
 * record's address must be a multiple of 8 (the board is an mmap: page-aligned). */
static unsigned char *
record_at_base(Py_buffer *view, Py_ssize_t base)
{
    if (base < 0 || view->len < REC_SIZE || base > view->len - REC_SIZE
            || ((uintptr_t)view->buf + (uintptr_t)base) % 8 != 0) {
        PyErr_SetString(PyExc_ValueError, "no scoreboard record at that offset");
        return NULL;
    }
    return (unsigned char *)view->buf + base;
}

/* The arguments every board_* call starts with: a writable view of the board, and the record's
 * offset in it. 0 with an exception set on failure (nothing to release then). METH_FASTCALL
 * and no format string: on this path the argument parsing cost as much as the writes. */
static int
board_args(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, const char *name,
           Py_buffer *view, unsigned char **rec)
{
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, want, nargs);
        return 0;
    }
    Py_ssize_t base = PyLong_AsSsize_t(args[1]);
    if (base == -1 && PyErr_Occurred())
        return 0;
    if (PyObject_GetBuffer(args[0], view, PyBUF_WRITABLE) < 0)
        return 0;
    *rec = record_at_base(view, base);
    if (*rec == NULL) {
        PyBuffer_Release(view);
        return 0;
    }
    return 1;
}

static PyObject *
board_started(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    unsigned char *rec;
    if (nargs == 4 && (!PyUnicode_Check(args[2]) || !PyUnicode_Check(args[3]))) {
        PyErr_SetString(PyExc_TypeError, "board_started(): method and uri must be str");
        return NULL;
    }
    if (!board_args(args, nargs, 4, "board_started", &view, &rec))
        return NULL;
    PyObject *method = args[2], *uri = args[3];
    double now = monotonic();
    store_double(rec + OFF_BUSY, now);
    /* text, for people: a copy taken while it changes may show a mix of two requests' names */
    put_text(rec + OFF_METHOD, method, METHOD_LEN);
    put_text(rec + OFF_URI, uri, URI_LEN);
    STORE_STATE(rec, SLOT_BUSY);
    PyBuffer_Release(&view);
    return PyFloat_FromDouble(now);
}

static PyObject *
board_finished(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    unsigned char *rec;
    double since = 0.0, last;
    unsigned long long requests = 0;
    long state = 0;
    if (nargs == 5) {
        requests = PyLong_AsUnsignedLongLong(args[2]);
        if (requests == (unsigned long long)-1 && PyErr_Occurred())
            return NULL;
        since = PyFloat_AsDouble(args[3]);
        if (since == -1.0 && PyErr_Occurred())
            return NULL;
        state = PyLong_AsLong(args[4]);
        if (state == -1 && PyErr_Occurred())
            return NULL;
        if (state < 0 || state > 255) {
            PyErr_SetString(PyExc_ValueError, "board_finished(): state out of range");
            return NULL;
        }
    }
    if (!board_args(args, nargs, 5, "board_finished", &view, &rec))
        return NULL;
    last = monotonic() - since;
    store_double(rec + OFF_LAST, last);
    store_double(rec + OFF_SUM, load_double(rec + OFF_SUM) + last);  /* we are its only writer */
    Py_ssize_t bucket = 0;  /* bisect.bisect_left(BUCKETS, last): buckets below `last` */
    while (bucket < NBUCKETS && buckets[bucket] < last)
        bucket++;
    unsigned char *slot = rec + OFF_HIST + 8 * bucket;
    STORE_U64(slot, LOAD_U64(slot) + 1);
    STORE_U64(rec + OFF_REQUESTS, requests);
    STORE_STATE(rec, state);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"decode_params", decode_params, METH_O,
     "decode_params(data) -> dict | None: a PARAMS stream's name-value pairs as latin-1 str; "
     "None when a name repeats; ValueError when a length runs past the stream."},
    {"scan_request", scan_request, METH_VARARGS,
     "scan_request(buffer, max_params) -> (request_id, flags, params, end, stdin_done) | None: "
     "a responder's BEGIN_REQUEST and whole PARAMS stream at the buffer's start (and the empty "
     "STDIN after them, when it is there); None for anything else."},
    {"take_stdin", take_stdin, METH_VARARGS,
     "take_stdin(buffer, pos, size, request_id) -> (chunks, total, end, ended) | None: the "
     "complete STDIN records of the request from `pos` on; None when the first is not one."},
    {"board_started", (PyCFunction)(void (*)(void))board_started, METH_FASTCALL,
     "board_started(board, base, method, uri) -> float: scoreboard.Scoreboard.request_started's "
     "writes to the record at `base`; returns the start time (time.monotonic()'s clock)."},
    {"board_finished", (PyCFunction)(void (*)(void))board_finished, METH_FASTCALL,
     "board_finished(board, base, requests, since, state) -> None: "
     "scoreboard.Scoreboard.request_finished's writes to the record at `base`."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "fcgidaemon._speedups",
    "C versions of fcgidaemon's hottest pure-Python functions (see fastcgi.decode_params).",
    -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&module);
}
