/*
 * fcgidaemon._speedups: the FastCGI name-value pair decoder in C.
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
 * Every read is checked against the buffer's size before it is made; lengths are unsigned
 * 31-bit values, and sums are checked against the remaining size, not added first.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

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

static PyObject *
decode_params(PyObject *module, PyObject *arg)
{
    Py_buffer view;
    PyObject *params = NULL;
    Py_ssize_t pos = 0, pairs = 0;

    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *p = (const unsigned char *)view.buf;
    const Py_ssize_t size = view.len;

    params = PyDict_New();
    if (params == NULL)
        goto done;
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
    if (PyDict_GET_SIZE(params) != pairs) {  /* a name came more than once */
        Py_DECREF(params);
        params = Py_NewRef(Py_None);
    }
    goto done;
fail:
    Py_CLEAR(params);
done:
    PyBuffer_Release(&view);
    return params;
}

static PyMethodDef methods[] = {
    {"decode_params", decode_params, METH_O,
     "decode_params(data) -> dict | None: a PARAMS stream's name-value pairs as latin-1 str; "
     "None when a name repeats; ValueError when a length runs past the stream."},
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
