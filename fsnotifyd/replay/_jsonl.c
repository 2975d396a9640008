/*
 * Reading an fsnotifyd JSONL journal, in C: lines → decoded events → (time, order, event)
 * items in time order. fsnotifyd/replay/reader.py's _jsonl() is the reference implementation
 * of the very same steps; tests/unit/test_replay_scanner.py holds the two to identical items
 * and counts on random journals (bad lines, blank lines, times out of order, odd stamps).
 *
 * Why C: a journal holds millions of events and the interpreter's per-line bookkeeping
 * (check, stamp, hold, release, yield) cost as much as decoding the JSON. What is rare stays
 * in Python, through callbacks: lines that are not events (`bad`), stamps not in the form
 * fsnotifyd writes (`stamp`), and the final counts (`finish`).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include <structmember.h>

#define BLOCK (1 << 20)
#define SCHEMA_PREFIX "fsnotifyd.event/"

static PyObject *s_schema, *s_time, *s_read, *decode_errors; /* (ValueError, msgspec.DecodeError) */

typedef struct {
    PyObject_HEAD
    PyObject *file, *decode, *stamp, *bad, *finish;
    PyObject *buf;        /* bytes read and not yet split into lines */
    Py_ssize_t pos;       /* where the next line starts in buf */
    PyObject *held;       /* items waiting for the watermark, sorted by time */
    Py_ssize_t head;      /* held[:head] are already released */
    double latest, slack;
    long long lines, events, seq;
    int eof, finished;
} Scanner;

/* Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's days_from_civil). */
static long long
days_from_civil(long long y, unsigned m, unsigned d)
{
    y -= m <= 2;
    long long era = (y >= 0 ? y : y - 399) / 400;
    unsigned yoe = (unsigned)(y - era * 400);
    unsigned doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + (long long)doe - 719468;
}

static int
digits(const char *s, int n, int *out)
{
    int v = 0;
    for (int i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return 0;
        v = v * 10 + (s[i] - '0');
    }
    *out = v;
    return 1;
}

/* The epoch time of "YYYY-MM-DDTHH:MM:SS[.f+]Z" (the form fsnotifyd writes), exactly as
 * reader._fast_event_time computes it; 0 when the string is not in that form (the caller
 * then asks the Python version), -1 on error. */
static int
fast_stamp(PyObject *value, double *out)
{
    if (!PyUnicode_CheckExact(value) || !PyUnicode_IS_ASCII(value))
        return 0;
    Py_ssize_t n = PyUnicode_GET_LENGTH(value);
    const char *s = (const char *)PyUnicode_DATA(value);
    int y, mo, d, h, mi, sec;
    if (n < 20 || s[n - 1] != 'Z' || s[4] != '-' || s[7] != '-' || s[10] != 'T' || s[13] != ':' || s[16] != ':'
        || !digits(s, 4, &y) || !digits(s + 5, 2, &mo) || !digits(s + 8, 2, &d) || !digits(s + 11, 2, &h)
        || !digits(s + 14, 2, &mi) || !digits(s + 17, 2, &sec))
        return 0;
    if (n != 20) { /* ".digits" between the seconds and the Z */
        if (s[19] != '.' || n < 22)
            return 0;
        for (Py_ssize_t i = 20; i < n - 1; i++)
            if (s[i] < '0' || s[i] > '9')
                return 0;
    }
    static const int dim[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (y < 1 || mo < 1 || mo > 12 || d < 1 || h > 23 || mi > 59)
        return 0;
    int leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    if (d > dim[mo - 1] + (mo == 2 && leap))
        return 0;
    char secs[64];
    Py_ssize_t len = n - 1 - 17; /* "SS" or "SS.fff" */
    if (len >= (Py_ssize_t)sizeof(secs))
        return 0;
    memcpy(secs, s + 17, len);
    secs[len] = '\0';
    double frac = PyOS_string_to_double(secs, NULL, NULL);
    if (frac == -1.0 && PyErr_Occurred())
        return -1;
    long long base = days_from_civil(y, (unsigned)mo, (unsigned)d) * 86400LL + h * 3600LL + mi * 60LL;
    *out = (double)base + frac;
    return 1;
}

static int
Scanner_traverse(Scanner *self, visitproc visit, void *arg)
{
    Py_VISIT(self->file); Py_VISIT(self->decode); Py_VISIT(self->stamp); Py_VISIT(self->bad);
    Py_VISIT(self->finish); Py_VISIT(self->held);
    return 0;
}

static int
Scanner_clear(Scanner *self)
{
    Py_CLEAR(self->file); Py_CLEAR(self->decode); Py_CLEAR(self->stamp); Py_CLEAR(self->bad);
    Py_CLEAR(self->finish); Py_CLEAR(self->buf); Py_CLEAR(self->held);
    return 0;
}

/* Report the counts once: at the end of the journal, or when the scanner is dropped early. */
static int
finish(Scanner *self)
{
    if (self->finished || self->finish == NULL)
        return 0;
    self->finished = 1;
    PyObject *r = PyObject_CallFunction(self->finish, "LL", self->lines, self->events);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

static void
Scanner_dealloc(Scanner *self)
{
    PyObject_GC_UnTrack(self);
    if (!self->finished && self->finish != NULL) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        if (finish(self) < 0)
            PyErr_WriteUnraisable((PyObject *)self);
        PyErr_Restore(type, value, tb);
    }
    Scanner_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
Scanner_init(Scanner *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"file", "decode", "stamp", "bad", "finish", "slack", NULL};
    PyObject *file, *decode, *stamp, *bad, *fin;
    double slack;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOd", kwlist, &file, &decode, &stamp, &bad, &fin, &slack))
        return -1;
    Py_XSETREF(self->file, Py_NewRef(file));
    Py_XSETREF(self->decode, Py_NewRef(decode));
    Py_XSETREF(self->stamp, Py_NewRef(stamp));
    Py_XSETREF(self->bad, Py_NewRef(bad));
    Py_XSETREF(self->finish, Py_NewRef(fin));
    Py_XSETREF(self->buf, PyBytes_FromStringAndSize(NULL, 0));
    Py_XSETREF(self->held, PyList_New(0));
    if (self->buf == NULL || self->held == NULL)
        return -1;
    self->pos = self->head = 0;
    self->latest = -Py_HUGE_VAL;
    self->slack = slack;
    self->lines = self->events = self->seq = 0;
    self->eof = self->finished = 0;
    return 0;
}

/* The next line (with its newline) as bytes; NULL with no exception at the end. */
static PyObject *
next_line(Scanner *self)
{
    for (;;) {
        const char *data = PyBytes_AS_STRING(self->buf);
        Py_ssize_t size = PyBytes_GET_SIZE(self->buf);
        const char *nl = memchr(data + self->pos, '\n', size - self->pos);
        if (nl != NULL) {
            Py_ssize_t start = self->pos;
            self->pos = nl - data + 1;
            return PyBytes_FromStringAndSize(data + start, self->pos - start);
        }
        if (self->eof) {
            if (self->pos >= size)
                return NULL;
            PyObject *rest = PyBytes_FromStringAndSize(data + self->pos, size - self->pos);
            self->pos = size;
            return rest;
        }
        PyObject *block = PyObject_CallMethod(self->file, "read", "n", (Py_ssize_t)BLOCK);
        if (block == NULL)
            return NULL;
        if (!PyBytes_Check(block)) {
            Py_DECREF(block);
            PyErr_SetString(PyExc_TypeError, "the journal must be opened in binary mode");
            return NULL;
        }
        if (PyBytes_GET_SIZE(block) == 0) {
            self->eof = 1;
            Py_DECREF(block);
            continue;
        }
        PyObject *joined = PyBytes_FromStringAndSize(NULL, size - self->pos + PyBytes_GET_SIZE(block));
        if (joined == NULL) {
            Py_DECREF(block);
            return NULL;
        }
        memcpy(PyBytes_AS_STRING(joined), data + self->pos, size - self->pos);
        memcpy(PyBytes_AS_STRING(joined) + size - self->pos, PyBytes_AS_STRING(block), PyBytes_GET_SIZE(block));
        Py_DECREF(block);
        Py_SETREF(self->buf, joined);
        self->pos = 0;
    }
}

static int
call_bad(Scanner *self, PyObject *line, PyObject *why)
{
    PyObject *r = PyObject_CallFunction(self->bad, "LOO", self->lines, line, why);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

static double
item_time(PyObject *item)
{
    return PyFloat_AS_DOUBLE(PyTuple_GET_ITEM(item, 0));
}

/* One line: an event held in time order (1), a line handed to `bad` (0), or an error (-1). */
static int
take_line(Scanner *self, PyObject *line)
{
    self->lines++;
    PyObject *obj = PyObject_CallOneArg(self->decode, line);
    if (obj == NULL) {
        if (!PyErr_ExceptionMatches(decode_errors))
            return -1;
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        int rc = call_bad(self, line, value ? value : Py_None);
        Py_XDECREF(type); Py_XDECREF(value); Py_XDECREF(tb);
        return rc;
    }
    PyObject *schema = PyDict_CheckExact(obj) ? PyDict_GetItemWithError(obj, s_schema) : NULL;
    if (schema == NULL && PyErr_Occurred())
        goto error;
    if (schema == NULL || !PyUnicode_CheckExact(schema) || !PyUnicode_IS_ASCII(schema)
        || PyUnicode_GET_LENGTH(schema) < (Py_ssize_t)strlen(SCHEMA_PREFIX)
        || memcmp(PyUnicode_DATA(schema), SCHEMA_PREFIX, strlen(SCHEMA_PREFIX)) != 0) {
        /* A non-ASCII schema string may still start with the prefix: Python decides. */
        if (schema != NULL && PyUnicode_CheckExact(schema) && !PyUnicode_IS_ASCII(schema)) {
            PyObject *prefix = PyUnicode_FromString(SCHEMA_PREFIX);
            Py_ssize_t m = prefix ? PyUnicode_Tailmatch(schema, prefix, 0, PY_SSIZE_T_MAX, -1) : -1;
            Py_XDECREF(prefix);
            if (m < 0)
                goto error;
            if (m)
                goto schema_ok;
        }
        Py_DECREF(obj);
        PyObject *why = PyUnicode_FromString("not an fsnotifyd event");
        int rc = why ? call_bad(self, line, why) : -1;
        Py_XDECREF(why);
        return rc;
    }
schema_ok:;
    PyObject *value = PyDict_GetItemWithError(obj, s_time);
    if (value == NULL && PyErr_Occurred())
        goto error;
    double t;
    int fast = value ? fast_stamp(value, &t) : 0;
    if (fast < 0)
        goto error;
    if (!fast) {
        PyObject *r = PyObject_CallOneArg(self->stamp, value ? value : Py_None);
        if (r == NULL)
            goto error;
        if (r == Py_None) {
            Py_DECREF(r);
            Py_DECREF(obj);
            PyObject *why = PyUnicode_FromString("event without a valid time");
            int rc = why ? call_bad(self, line, why) : -1;
            Py_XDECREF(why);
            return rc;
        }
        t = PyFloat_AsDouble(r);
        Py_DECREF(r);
        if (t == -1.0 && PyErr_Occurred())
            goto error;
    }
    self->events++;
    self->seq++;
    PyObject *item = Py_BuildValue("(dLN)", t, self->seq, obj); /* steals obj */
    if (item == NULL)
        return -1;
    Py_ssize_t n = PyList_GET_SIZE(self->held);
    int rc;
    if (n == self->head || t >= item_time(PyList_GET_ITEM(self->held, n - 1))) {
        rc = PyList_Append(self->held, item);
    } else { /* out of order: after the held items of the same or an earlier time */
        Py_ssize_t lo = self->head, hi = n;
        while (lo < hi) {
            Py_ssize_t mid = (lo + hi) / 2;
            if (t < item_time(PyList_GET_ITEM(self->held, mid)))
                hi = mid;
            else
                lo = mid + 1;
        }
        rc = PyList_Insert(self->held, lo, item);
    }
    Py_DECREF(item);
    if (t >= self->latest)
        self->latest = t;
    return rc < 0 ? -1 : 1;
error:
    Py_DECREF(obj);
    return -1;
}

static PyObject *
Scanner_next(Scanner *self)
{
    for (;;) {
        Py_ssize_t n = PyList_GET_SIZE(self->held);
        if (self->head < n) {
            PyObject *item = PyList_GET_ITEM(self->held, self->head);
            if (self->eof || item_time(item) <= self->latest - self->slack) {
                Py_INCREF(item);
                PyList_SET_ITEM(self->held, self->head, Py_NewRef(Py_None));
                Py_DECREF(item); /* the list's reference, now None's */
                self->head++;
                if (self->head >= 4096 && self->head * 2 >= n) {
                    if (PyList_SetSlice(self->held, 0, self->head, NULL) < 0) {
                        Py_DECREF(item);
                        return NULL;
                    }
                    self->head = 0;
                }
                return item;
            }
        } else if (self->eof) {
            finish(self);
            return NULL;
        }
        if (self->eof)
            continue;
        PyObject *line = next_line(self);
        if (line == NULL) {
            if (PyErr_Occurred())
                return NULL;
            continue; /* eof is set: release what is held */
        }
        int rc = take_line(self, line);
        Py_DECREF(line);
        if (rc < 0)
            return NULL;
    }
}

static PyMemberDef Scanner_members[] = {
    {"lines", T_LONGLONG, offsetof(Scanner, lines), READONLY, NULL},
    {"events", T_LONGLONG, offsetof(Scanner, events), READONLY, NULL},
    {NULL},
};

static PyTypeObject ScannerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fsnotifyd.replay._jsonl.Scanner",
    .tp_doc = "Scanner(file, decode, stamp, bad, finish, slack): (time, order, event) items of a journal.",
    .tp_basicsize = sizeof(Scanner),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Scanner_init,
    .tp_dealloc = (destructor)Scanner_dealloc,
    .tp_traverse = (traverseproc)Scanner_traverse,
    .tp_clear = (inquiry)Scanner_clear,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)Scanner_next,
    .tp_members = Scanner_members,
};

/* The interface with replay/reader.py (the Scanner's arguments, callbacks and items):
 * fsnotifyd.native refuses a module whose ABI is not reader.py's JSONL_ABI. Raise both
 * together when that interface changes. */
#define FSNOTIFYD_ABI 1

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_jsonl",
    "Reading fsnotifyd JSONL journals in C (reference implementation: fsnotifyd.replay.reader._jsonl).", -1,
};

PyMODINIT_FUNC
PyInit__jsonl(void)
{
    if (!(s_schema = PyUnicode_InternFromString("schema")) || !(s_time = PyUnicode_InternFromString("time"))
        || !(s_read = PyUnicode_InternFromString("read")))
        return NULL;
    PyObject *msgspec = PyImport_ImportModule("msgspec");
    if (msgspec == NULL)
        return NULL;
    PyObject *decode_error = PyObject_GetAttrString(msgspec, "DecodeError");
    Py_DECREF(msgspec);
    if (decode_error == NULL)
        return NULL;
    decode_errors = PyTuple_Pack(2, PyExc_ValueError, decode_error);
    Py_DECREF(decode_error);
    if (decode_errors == NULL || PyType_Ready(&ScannerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Scanner", (PyObject *)&ScannerType) < 0
        || PyModule_AddIntConstant(m, "ABI", FSNOTIFYD_ABI) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
