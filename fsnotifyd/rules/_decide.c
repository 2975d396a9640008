/*
 * The rules engine's per-event path in C: candidates, match programs, windows, cooldowns and
 * decisions. fsnotifyd/rules/decide.py is the reference implementation of the very same steps
 * in Python; tests/unit/test_rules_core.py holds the two to identical decisions, state and
 * counters on random rules and event streams. Anything this file does not handle fast (a
 * kind not indexed yet, an unhashable indexed value, a predicate on VE labels) it hands to
 * the Python objects it was given, so the two can only differ by speed.
 *
 * Why C: a replay decides several times per event (1,000,000 events, 50 rules: ~3 decisions
 * each), and in the interpreter the bookkeeping around each decision costs more than the
 * decision itself. State stays in the Python dicts the engine owns (windows, cooldowns), in
 * the shapes decide.py uses, so persistence, recovery and restore are shared code.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

/* Match program opcodes; the order is OPS below and compiler.OPCODES. */
enum {
    OP_EQUALS, OP_NE, OP_IN, OP_NOT_IN, OP_REGEX, OP_PREFIX, OP_SUFFIX, OP_CONTAINS,
    OP_GT, OP_GE, OP_LT, OP_LE, OP_EXISTS, OP_MISSING, OP_VE_IN, OP_COUNT_
};
static const char *OP_NAMES[] = {
    "equals", "ne", "in", "not_in", "regex", "prefix", "suffix", "contains",
    "gt", "ge", "lt", "le", "exists", "missing", "ve_in",
};

/* The interface with rules/compiler.py and rules/engine.py (the program layout, the state
 * tuples, the methods): fsnotifyd.native refuses a module whose ABI is not rules/native.py's.
 * Raise both together when that interface changes. */
#define FSNOTIFYD_ABI 1

#define MAX_FACTS (1LL << 40) /* decide.MAX_FACTS: a count beyond this is taken as this */

static PyObject *s_kind, *s_ve, *s_device, *s_name, *s_id, *s_count, *s_fullmatch;
static PyObject *s_fired, *s_threshold, *s_cooldown, *s_empty, *s_int0, *s_float0;

/* ---------------------------------------------------------------------------------------- */
/* CompiledRule: one rule (or one residual of a rule found through an index) ready to run.  */

typedef struct {
    PyObject_HEAD
    Py_ssize_t index;
    PyObject *rule;
    PyObject *predicate;
    PyObject *program; /* tuple of (path tuple, opcode, constant), or None: call predicate */
    /* read from `rule` once */
    PyObject *name, *actions, *dry_run;
    PyObject *th_count, *th_within; /* NULL without a threshold */
    long long need;
    double within, cooldown;
    int per_device, cont;
    int gated; /* the rule has `sustained` or `window`: Core.gate decides first */
} CRule;

static int
CRule_traverse(CRule *self, visitproc visit, void *arg)
{
    Py_VISIT(self->rule); Py_VISIT(self->predicate); Py_VISIT(self->program);
    Py_VISIT(self->name); Py_VISIT(self->actions); Py_VISIT(self->dry_run);
    Py_VISIT(self->th_count); Py_VISIT(self->th_within);
    return 0;
}

static int
CRule_clear(CRule *self)
{
    Py_CLEAR(self->rule); Py_CLEAR(self->predicate); Py_CLEAR(self->program);
    Py_CLEAR(self->name); Py_CLEAR(self->actions); Py_CLEAR(self->dry_run);
    Py_CLEAR(self->th_count); Py_CLEAR(self->th_within);
    return 0;
}

static void
CRule_dealloc(CRule *self)
{
    PyObject_GC_UnTrack(self);
    CRule_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
check_program(PyObject *program)
{
    if (program == Py_None)
        return 0;
    if (!PyTuple_CheckExact(program)) {
        PyErr_SetString(PyExc_TypeError, "program must be a tuple or None");
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(program); i++) {
        PyObject *c = PyTuple_GET_ITEM(program, i);
        if (!PyTuple_CheckExact(c) || PyTuple_GET_SIZE(c) != 3 || !PyTuple_CheckExact(PyTuple_GET_ITEM(c, 0))
            || PyTuple_GET_SIZE(PyTuple_GET_ITEM(c, 0)) < 1 || !PyLong_CheckExact(PyTuple_GET_ITEM(c, 1))) {
            PyErr_SetString(PyExc_TypeError, "program items are (path tuple, opcode, constant)");
            return -1;
        }
        long op = PyLong_AsLong(PyTuple_GET_ITEM(c, 1));
        if (op < 0 || op >= OP_COUNT_) {
            PyErr_Format(PyExc_ValueError, "unknown opcode %ld", op);
            return -1;
        }
    }
    return 0;
}

static int
CRule_init(CRule *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"index", "rule", "predicate", "program", NULL};
    Py_ssize_t index;
    PyObject *rule, *predicate, *program = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "nOO|O", kwlist, &index, &rule, &predicate, &program))
        return -1;
    if (check_program(program) < 0)
        return -1;
    PyObject *name = NULL, *actions = NULL, *dry_run = NULL, *th = NULL, *count = NULL, *within = NULL,
             *per = NULL, *cont = NULL, *cooldown = NULL;
    int rc = -1;
    if (!(name = PyObject_GetAttrString(rule, "name")) || !(actions = PyObject_GetAttrString(rule, "actions"))
        || !(dry_run = PyObject_GetAttrString(rule, "dry_run")) || !(th = PyObject_GetAttrString(rule, "threshold"))
        || !(cont = PyObject_GetAttrString(rule, "continue_"))
        || !(cooldown = PyObject_GetAttrString(rule, "cooldown")))
        goto done;
    self->cooldown = PyFloat_AsDouble(cooldown);
    if (self->cooldown == -1.0 && PyErr_Occurred())
        goto done;
    if ((self->cont = PyObject_IsTrue(cont)) < 0)
        goto done;
    Py_CLEAR(self->th_count);
    Py_CLEAR(self->th_within);
    self->per_device = 0;
    if (th != Py_None) {
        if (!(count = PyObject_GetAttrString(th, "count")) || !(within = PyObject_GetAttrString(th, "within"))
            || !(per = PyObject_GetAttrString(th, "per")))
            goto done;
        self->need = PyLong_AsLongLong(count);
        if (self->need == -1 && PyErr_Occurred())
            goto done;
        self->within = PyFloat_AsDouble(within);
        if (self->within == -1.0 && PyErr_Occurred())
            goto done;
        self->per_device = PyUnicode_Check(per) && PyUnicode_CompareWithASCIIString(per, "device") == 0;
        self->th_count = Py_NewRef(count);
        self->th_within = Py_NewRef(within);
    }
    self->gated = 0;
    for (int k = 0; k < 2; k++) {
        PyObject *g = PyObject_GetAttrString(rule, k ? "window" : "sustained");
        if (g == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_AttributeError))
                goto done;
            PyErr_Clear(); /* a rule object of an older shape: never gated */
            continue;
        }
        if (g != Py_None)
            self->gated = 1;
        Py_DECREF(g);
    }
    self->index = index;
    Py_XSETREF(self->rule, Py_NewRef(rule));
    Py_XSETREF(self->predicate, Py_NewRef(predicate));
    Py_XSETREF(self->program, Py_NewRef(program));
    Py_XSETREF(self->name, Py_NewRef(name));
    Py_XSETREF(self->actions, Py_NewRef(actions));
    Py_XSETREF(self->dry_run, Py_NewRef(dry_run));
    rc = 0;
done:
    Py_XDECREF(name); Py_XDECREF(actions); Py_XDECREF(dry_run); Py_XDECREF(th); Py_XDECREF(count);
    Py_XDECREF(within); Py_XDECREF(per); Py_XDECREF(cont); Py_XDECREF(cooldown);
    return rc;
}

static PyObject *
CRule_repr(CRule *self)
{
    return PyUnicode_FromFormat("CompiledRule(index=%zd, rule=%R)", self->index, self->name);
}

static PyMemberDef CRule_members[] = {
    {"index", T_PYSSIZET, offsetof(CRule, index), READONLY, NULL},
    {"rule", T_OBJECT, offsetof(CRule, rule), READONLY, NULL},
    {"predicate", T_OBJECT, offsetof(CRule, predicate), READONLY, NULL},
    {"program", T_OBJECT, offsetof(CRule, program), READONLY, NULL},
    {NULL},
};

static PyTypeObject CRuleType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fsnotifyd.rules._decide.CompiledRule",
    .tp_doc = "A rule (or an index residual of one) with its predicate and match program.",
    .tp_basicsize = sizeof(CRule),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)CRule_init,
    .tp_dealloc = (destructor)CRule_dealloc,
    .tp_traverse = (traverseproc)CRule_traverse,
    .tp_clear = (inquiry)CRule_clear,
    .tp_members = CRule_members,
    .tp_repr = (reprfunc)CRule_repr,
};

/* ---------------------------------------------------------------------------------------- */
/* Match programs                                                                            */

/* The value at a dotted path, as the generated predicates read it: a borrowed reference,
 * Py_None when any step is absent or not a dict; NULL with an exception set on error. */
static PyObject *
read_path(PyObject *event, PyObject *path)
{
    Py_ssize_t n = PyTuple_GET_SIZE(path);
    PyObject *v = PyDict_GetItemWithError(event, PyTuple_GET_ITEM(path, 0));
    if (v == NULL)
        return PyErr_Occurred() ? NULL : Py_None;
    for (Py_ssize_t i = 1; i < n; i++) {
        if (!PyDict_CheckExact(v))
            return Py_None;
        v = PyDict_GetItemWithError(v, PyTuple_GET_ITEM(path, i));
        if (v == NULL)
            return PyErr_Occurred() ? NULL : Py_None;
    }
    return v;
}

static int
is_number(PyObject *v)
{
    return PyLong_CheckExact(v) || PyFloat_CheckExact(v);
}

/* 1 when the rule's match holds for the event, 0 when not, -1 on error. */
static int
rule_matches(CRule *cr, PyObject *event)
{
    PyObject *program = cr->program;
    if (program == Py_None) {
        PyObject *r = PyObject_CallOneArg(cr->predicate, event);
        if (r == NULL)
            return -1;
        int t = PyObject_IsTrue(r);
        Py_DECREF(r);
        return t;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(program);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *c = PyTuple_GET_ITEM(program, i);
        PyObject *x = PyTuple_GET_ITEM(c, 2);
        PyObject *v = read_path(event, PyTuple_GET_ITEM(c, 0));
        if (v == NULL)
            return -1;
        int ok;
        switch ((int)PyLong_AsLong(PyTuple_GET_ITEM(c, 1))) {
        case OP_EQUALS: ok = PyObject_RichCompareBool(v, x, Py_EQ); break;
        case OP_NE: ok = PyObject_RichCompareBool(v, x, Py_NE); break;
        case OP_IN:
        case OP_NOT_IN:
            if (PyList_CheckExact(v) || PyDict_CheckExact(v))
                ok = 0;
            else
                ok = PySet_Contains(x, v);
            if (ok >= 0 && PyLong_AsLong(PyTuple_GET_ITEM(c, 1)) == OP_NOT_IN)
                ok = !ok;
            break;
        case OP_REGEX: {
            if (v == Py_None) { ok = 0; break; }
            PyObject *s = PyUnicode_CheckExact(v) ? Py_NewRef(v) : PyObject_Str(v);
            if (s == NULL)
                return -1;
            PyObject *m = PyObject_CallMethodOneArg(x, s_fullmatch, s);
            Py_DECREF(s);
            if (m == NULL)
                return -1;
            ok = m != Py_None;
            Py_DECREF(m);
            break;
        }
        case OP_PREFIX:
        case OP_SUFFIX: {
            if (!PyUnicode_CheckExact(v)) { ok = 0; break; }
            Py_ssize_t r = PyUnicode_Tailmatch(v, x, 0, PY_SSIZE_T_MAX,
                                               PyLong_AsLong(PyTuple_GET_ITEM(c, 1)) == OP_PREFIX ? -1 : 1);
            ok = r < 0 ? -1 : (int)r;
            break;
        }
        case OP_CONTAINS: ok = PyUnicode_CheckExact(v) ? PyUnicode_Contains(v, x) : 0; break;
        case OP_GT: ok = is_number(v) ? PyObject_RichCompareBool(v, x, Py_GT) : 0; break;
        case OP_GE: ok = is_number(v) ? PyObject_RichCompareBool(v, x, Py_GE) : 0; break;
        case OP_LT: ok = is_number(v) ? PyObject_RichCompareBool(v, x, Py_LT) : 0; break;
        case OP_LE: ok = is_number(v) ? PyObject_RichCompareBool(v, x, Py_LE) : 0; break;
        case OP_EXISTS: ok = v != Py_None; break;
        case OP_MISSING: ok = v == Py_None; break;
        case OP_VE_IN: ok = PyUnicode_CheckExact(v) ? PySet_Contains(x, v) : 0; break;
        default: PyErr_SetString(PyExc_ValueError, "unknown opcode"); return -1;
        }
        if (ok <= 0)
            return ok;
    }
    return 1;
}

/* ---------------------------------------------------------------------------------------- */
/* Core: the per-event decision loop over the engine's state.                               */

typedef struct {
    PyObject_HEAD
    PyObject *fast;        /* kind -> (path tuple | None, cache dict, rules list), filled by Python */
    PyObject *candidates;  /* compiled.candidates(kind, event): the slow path, fills `fast` */
    PyObject *recovery;    /* frozenset of kinds that call recover(kind, event) first */
    PyObject *recover;
    PyObject *windows;     /* (rule, key) -> [total, [(time, count, event id), ...]] */
    PyObject *cooldowns;   /* (rule, key) -> time last fired */
    PyObject *decision;    /* the Decision class (a tuple subclass of 13 fields) */
    PyObject *event_time;  /* event -> epoch seconds, when process() is not given the time */
    PyObject *key_cache;   /* VE id -> "ve:<id>", formatted once */
    PyObject *dev_keys;    /* device name -> "dev:<name>" */
    PyObject *gate;        /* gate(rule, key, now, event, ve, device, eid) for gated rules, or None */
    Py_ssize_t max_keys;
    char explain, dirty;
    long long events, matched, fired, suppressed_threshold, suppressed_cooldown, evicted, cleared;
} Core;

static int
Core_traverse(Core *self, visitproc visit, void *arg)
{
    Py_VISIT(self->fast); Py_VISIT(self->candidates); Py_VISIT(self->recovery); Py_VISIT(self->recover);
    Py_VISIT(self->windows); Py_VISIT(self->cooldowns); Py_VISIT(self->decision); Py_VISIT(self->event_time);
    Py_VISIT(self->key_cache); Py_VISIT(self->dev_keys); Py_VISIT(self->gate);
    return 0;
}

static int
Core_clear(Core *self)
{
    Py_CLEAR(self->fast); Py_CLEAR(self->candidates); Py_CLEAR(self->recovery); Py_CLEAR(self->recover);
    Py_CLEAR(self->windows); Py_CLEAR(self->cooldowns); Py_CLEAR(self->decision); Py_CLEAR(self->event_time);
    Py_CLEAR(self->key_cache); Py_CLEAR(self->dev_keys); Py_CLEAR(self->gate);
    return 0;
}

static void
Core_dealloc(Core *self)
{
    PyObject_GC_UnTrack(self);
    Core_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
Core_init(Core *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fast", "candidates", "recovery", "recover", "windows", "cooldowns",
                             "decision", "event_time", "max_keys", "explain", "gate", NULL};
    PyObject *fast, *candidates, *recovery, *recover, *windows, *cooldowns, *decision, *event_time;
    PyObject *gate = Py_None;
    Py_ssize_t max_keys;
    int explain;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!OO!OO!O!O!Onp|O", kwlist, &PyDict_Type, &fast, &candidates,
                                     &PyFrozenSet_Type, &recovery, &recover, &PyDict_Type, &windows,
                                     &PyDict_Type, &cooldowns, &PyType_Type, &decision, &event_time,
                                     &max_keys, &explain, &gate))
        return -1;
    if (!PyType_IsSubtype((PyTypeObject *)decision, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "decision must be a tuple subclass");
        return -1;
    }
    Py_XSETREF(self->fast, Py_NewRef(fast));
    Py_XSETREF(self->candidates, Py_NewRef(candidates));
    Py_XSETREF(self->recovery, Py_NewRef(recovery));
    Py_XSETREF(self->recover, Py_NewRef(recover));
    Py_XSETREF(self->windows, Py_NewRef(windows));
    Py_XSETREF(self->cooldowns, Py_NewRef(cooldowns));
    Py_XSETREF(self->decision, Py_NewRef(decision));
    Py_XSETREF(self->event_time, Py_NewRef(event_time));
    Py_XSETREF(self->gate, Py_NewRef(gate));
    Py_XSETREF(self->key_cache, PyDict_New());
    Py_XSETREF(self->dev_keys, PyDict_New());
    if (self->key_cache == NULL || self->dev_keys == NULL)
        return -1;
    self->max_keys = max_keys;
    self->explain = (char)explain;
    return 0;
}

/* A Decision built without going through namedtuple's Python-level __new__. */
static PyObject *
decision(Core *self, PyObject *now, CRule *cr, PyObject *outcome, PyObject *ve, PyObject *device, PyObject *key,
         PyObject *ids, PyObject *total, PyObject *need, PyObject *within, PyObject *cooling)
{
    PyTypeObject *type = (PyTypeObject *)self->decision;
    PyObject *d = type->tp_alloc(type, 13);
    if (d == NULL)
        return NULL;
    PyObject *items[13] = {now, cr->name, outcome, ve, device, key, cr->actions, cr->dry_run, ids,
                           total, need, within, cooling};
    for (int i = 0; i < 13; i++)
        PyTuple_SET_ITEM(d, i, Py_NewRef(items[i]));
    /* A decision cannot be part of a reference cycle (it holds numbers, strings, and the
     * rule's actions, none of which can refer back to it), so the cyclic GC need not visit
     * it: a replay keeps millions of them, and each collection would walk them all. */
    PyObject_GC_UnTrack(d);
    return d;
}

static int
append_decision(PyObject *out, PyObject *d)
{
    if (d == NULL)
        return -1;
    int rc = PyList_Append(out, d);
    Py_DECREF(d);
    return rc;
}

/* d.pop(next(iter(d))) when d holds more than max_keys: the oldest entry goes. */
static int
evict_oldest(Core *self, PyObject *d)
{
    if (PyDict_GET_SIZE(d) <= self->max_keys)
        return 0;
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    if (!PyDict_Next(d, &pos, &k, &v))
        return 0;
    Py_INCREF(k);
    int rc = PyDict_DelItem(d, k);
    Py_DECREF(k);
    self->evicted++;
    return rc;
}

/* Delete key from d if present (dict.pop(key, None)). */
static int
discard(PyObject *d, PyObject *key)
{
    if (PyDict_DelItem(d, key) == 0)
        return 0;
    if (PyErr_ExceptionMatches(PyExc_KeyError)) {
        PyErr_Clear();
        return 0;
    }
    return -1;
}

static PyObject *
candidates_of(Core *self, PyObject *kind, PyObject *event)
{
    PyObject *entry = PyDict_GetItemWithError(self->fast, kind);
    if (entry != NULL && PyTuple_CheckExact(entry) && PyTuple_GET_SIZE(entry) == 3) {
        PyObject *path = PyTuple_GET_ITEM(entry, 0);
        if (path == Py_None)
            return Py_NewRef(PyTuple_GET_ITEM(entry, 2));
        PyObject *v = read_path(event, path);
        if (v == NULL)
            return NULL;
        PyObject *hit = PyDict_GetItemWithError(PyTuple_GET_ITEM(entry, 1), v);
        if (hit != NULL)
            return Py_NewRef(hit);
        if (PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_TypeError))
                return NULL;
            PyErr_Clear(); /* an unhashable value: the Python side knows what it pins */
        }
    } else if (PyErr_Occurred()) {
        return NULL;
    }
    PyObject *args[2] = {kind, event};
    return PyObject_Vectorcall(self->candidates, args, 2, NULL);
}

/* f"{prefix}{value}": a VE id or device name is formatted once, not for every event. */
static PyObject *
state_key(Core *self, PyObject *cache, const char *prefix, PyObject *value)
{
    if (!PyUnicode_CheckExact(value))
        return PyUnicode_FromFormat("%s%S", prefix, value);
    PyObject *hit = PyDict_GetItemWithError(cache, value);
    if (hit != NULL)
        return Py_NewRef(hit);
    if (PyErr_Occurred())
        return NULL;
    PyObject *key = PyUnicode_FromFormat("%s%S", prefix, value);
    if (key == NULL)
        return NULL;
    if (PyDict_GET_SIZE(cache) >= 65536)
        PyDict_Clear(cache);
    if (PyDict_SetItem(cache, value, key) < 0) {
        Py_DECREF(key);
        return NULL;
    }
    return key;
}

#define SMALL 64

static PyObject *
process_one(Core *self, PyObject *event, PyObject *now_obj)
{
    PyObject *out = NULL, *cands = NULL, *owned_event = NULL, *ve = NULL, *device = NULL, *dev_key = NULL,
             *ve_key = NULL, *eid = NULL, *count_obj = NULL, *now = NULL;
    CRule *small[SMALL];
    CRule **matched = small;
    self->events++;
    if (!PyDict_CheckExact(event)) {
        /* A Mapping that is not a dict: read it as the dict it stands for. */
        if (!(owned_event = PyObject_CallOneArg((PyObject *)&PyDict_Type, event)))
            return NULL;
        event = owned_event;
    }
    PyObject *kind = PyDict_GetItemWithError(event, s_kind);
    if (kind == NULL || !PyUnicode_Check(kind)) {
        if (PyErr_Occurred())
            goto error;
        out = PyList_New(0);
        goto done;
    }
    Py_INCREF(kind);
    int rec = PySet_Contains(self->recovery, kind);
    if (rec < 0)
        goto error_kind;
    if (rec) {
        PyObject *args[2] = {kind, event};
        PyObject *r = PyObject_Vectorcall(self->recover, args, 2, NULL);
        if (r == NULL)
            goto error_kind;
        Py_DECREF(r);
    }
    cands = candidates_of(self, kind, event);
    Py_DECREF(kind);
    if (cands == NULL)
        goto error;
    if (!PyList_CheckExact(cands)) {
        PyErr_SetString(PyExc_TypeError, "candidates must be a list");
        goto error;
    }
    Py_ssize_t nc = PyList_GET_SIZE(cands);
    if (nc > SMALL && !(matched = PyMem_Malloc(nc * sizeof(CRule *)))) {
        PyErr_NoMemory();
        goto error;
    }
    Py_ssize_t nm = 0;
    for (Py_ssize_t i = 0; i < nc; i++) {
        PyObject *c = PyList_GET_ITEM(cands, i);
        if (!PyObject_TypeCheck(c, &CRuleType)) {
            PyErr_SetString(PyExc_TypeError, "candidates must be CompiledRule objects");
            goto error;
        }
        int m = rule_matches((CRule *)c, event);
        if (m < 0)
            goto error;
        if (m)
            matched[nm++] = (CRule *)c;
    }
    out = PyList_New(0);
    if (out == NULL || nm == 0)
        goto done;

    /* What every decision on this event shares, computed once. */
    double t;
    if (now_obj == Py_None) {
        now = PyObject_CallOneArg(self->event_time, event);
        if (now == NULL)
            goto error;
    } else {
        now = Py_NewRef(now_obj);
    }
    t = PyFloat_AsDouble(now);
    if (t == -1.0 && PyErr_Occurred())
        goto error;
    ve = PyDict_GetItemWithError(event, s_ve);
    if (ve == NULL && PyErr_Occurred())
        goto error;
    ve = Py_NewRef(ve ? ve : Py_None);
    PyObject *dev = PyDict_GetItemWithError(event, s_device);
    if (dev == NULL && PyErr_Occurred())
        goto error;
    device = dev != NULL && PyDict_Check(dev) ? PyDict_GetItemWithError(dev, s_name) : NULL;
    if (device == NULL && PyErr_Occurred())
        goto error;
    device = Py_NewRef(device ? device : Py_None);
    if (!(dev_key = state_key(self, self->dev_keys, "dev:", device)))
        goto error;
    ve_key = ve == Py_None ? Py_NewRef(dev_key) : state_key(self, self->key_cache, "ve:", ve);
    if (ve_key == NULL)
        goto error;
    PyObject *id = PyDict_GetItemWithError(event, s_id);
    if (id == NULL && PyErr_Occurred())
        goto error;
    if (!(eid = id ? PyObject_Str(id) : Py_NewRef(s_empty)))
        goto error;
    long long count = 1;
    PyObject *c = PyDict_GetItemWithError(event, s_count);
    if (c == NULL && PyErr_Occurred())
        goto error;
    if (c != NULL && PyLong_Check(c) && !PyBool_Check(c)) {
        int overflow;
        count = PyLong_AsLongLongAndOverflow(c, &overflow);
        if (count == -1 && PyErr_Occurred())
            goto error;
        if (overflow > 0 || count > MAX_FACTS)
            count = MAX_FACTS;
        else if (overflow < 0 || count < 0)
            count = 1;
    }
    if (!(count_obj = PyLong_FromLongLong(count)))
        goto error;

    self->matched += nm;
    for (Py_ssize_t i = 0; i < nm; i++) {
        CRule *cr = matched[i];
        int has_th = cr->th_count != NULL;
        PyObject *key = has_th && cr->per_device ? dev_key : ve_key;
        PyObject *skey = PyTuple_Pack(2, cr->name, key);
        PyObject *ids = NULL, *total_obj = NULL, *d;
        if (skey == NULL)
            goto error;
        PyObject *total = s_int0, *need = s_int0, *within = s_float0;
        if (cr->gated && self->gate != Py_None) {
            PyObject *gargs[7] = {cr->rule, key, now, event, ve, device, eid};
            PyObject *g = PyObject_Vectorcall(self->gate, gargs, 7, NULL);
            if (g == NULL)
                goto loop_error;
            if (g != Py_None) {
                /* suppressed: a decision to report (when explaining), or silently */
                if (self->explain && PyTuple_Check(g) && PyList_Append(out, g) < 0) {
                    Py_DECREF(g);
                    goto loop_error;
                }
                Py_DECREF(g);
                Py_DECREF(skey);
                continue;
            }
            Py_DECREF(g);
        }
        if (has_th) {
            PyObject *w = PyDict_GetItemWithError(self->windows, skey);
            if (w == NULL) {
                if (PyErr_Occurred())
                    goto loop_error;
                PyObject *entries = PyList_New(0);
                w = entries ? PyList_New(2) : NULL;
                if (w == NULL) {
                    Py_XDECREF(entries);
                    goto loop_error;
                }
                PyList_SET_ITEM(w, 0, Py_NewRef(s_int0));
                PyList_SET_ITEM(w, 1, entries);
                int rc = PyDict_SetItem(self->windows, skey, w);
                Py_DECREF(w); /* the dict holds it */
                if (rc < 0 || evict_oldest(self, self->windows) < 0)
                    goto loop_error;
            }
            if (!PyList_CheckExact(w) || PyList_GET_SIZE(w) != 2 || !PyList_CheckExact(PyList_GET_ITEM(w, 1))) {
                PyErr_SetString(PyExc_TypeError, "a window is [total, entries]");
                goto loop_error;
            }
            Py_INCREF(w); /* eviction below may drop the dict's reference */
            PyObject *entries = PyList_GET_ITEM(w, 1);
            long long tot = PyLong_AsLongLong(PyList_GET_ITEM(w, 0));
            if (tot == -1 && PyErr_Occurred()) {
                Py_DECREF(w);
                goto loop_error;
            }
            if (count) {
                PyObject *entry = PyTuple_Pack(3, now, count_obj, eid);
                if (entry != NULL)
                    PyObject_GC_UnTrack(entry); /* a float, an int and a str: no cycles */
                if (entry == NULL || PyList_Append(entries, entry) < 0) {
                    Py_XDECREF(entry);
                    Py_DECREF(w);
                    goto loop_error;
                }
                Py_DECREF(entry);
                tot += count;
            }
            double horizon = t - cr->within;
            Py_ssize_t n = PyList_GET_SIZE(entries), drop = 0;
            /* First what is past the window, then beyond threshold.count entries: each entry
             * stands for at least one fact, so the newest `count` still reach the threshold. */
            for (int phase = 0; phase < 2; phase++) {
                for (; drop < n; drop++) {
                    PyObject *e = PyList_GET_ITEM(entries, drop);
                    if (phase == 0) {
                        double et = PyFloat_AsDouble(PyTuple_GET_ITEM(e, 0));
                        if (et == -1.0 && PyErr_Occurred()) {
                            Py_DECREF(w);
                            goto loop_error;
                        }
                        if (!(et < horizon))
                            break;
                    } else if (n - drop <= cr->need) {
                        break;
                    }
                    tot -= PyLong_AsLongLong(PyTuple_GET_ITEM(e, 1));
                }
            }
            if (drop && PyList_SetSlice(entries, 0, drop, NULL) < 0) {
                Py_DECREF(w);
                goto loop_error;
            }
            total_obj = PyLong_FromLongLong(tot);
            if (total_obj == NULL) {
                Py_DECREF(w);
                goto loop_error;
            }
            PyList_SetItem(w, 0, Py_NewRef(total_obj));
            self->dirty = 1;
            total = total_obj;
            need = cr->th_count;
            within = cr->th_within;
            if (tot < cr->need) {
                Py_DECREF(w);
                self->suppressed_threshold++;
                if (self->explain) {
                    ids = PyTuple_Pack(1, eid);
                    if (ids == NULL)
                        goto loop_error;
                    PyObject_GC_UnTrack(ids);
                    d = decision(self, now, cr, s_threshold, ve, device, key, ids, total, need, within, s_float0);
                    if (append_decision(out, d) < 0)
                        goto loop_error;
                }
                Py_XDECREF(ids);
                Py_XDECREF(total_obj);
                Py_DECREF(skey);
                continue;
            }
            Py_ssize_t ne = PyList_GET_SIZE(entries);
            ids = PyTuple_New(ne);
            if (ids == NULL) {
                Py_DECREF(w);
                goto loop_error;
            }
            for (Py_ssize_t j = 0; j < ne; j++)
                PyTuple_SET_ITEM(ids, j, Py_NewRef(PyTuple_GET_ITEM(PyList_GET_ITEM(entries, j), 2)));
            PyObject_GC_UnTrack(ids); /* strings only */
            Py_DECREF(w);
        } else {
            if (!(ids = PyTuple_Pack(1, eid)))
                goto loop_error;
            PyObject_GC_UnTrack(ids);
        }
        if (cr->cooldown > 0) {
            PyObject *last = PyDict_GetItemWithError(self->cooldowns, skey);
            if (last == NULL && PyErr_Occurred())
                goto loop_error;
            if (last != NULL) {
                double lt = PyFloat_AsDouble(last);
                if (lt == -1.0 && PyErr_Occurred())
                    goto loop_error;
                if (t - lt < cr->cooldown) {
                    self->suppressed_cooldown++;
                    if (self->explain) {
                        PyObject *left = PyFloat_FromDouble(lt + cr->cooldown - t);
                        if (left == NULL)
                            goto loop_error;
                        d = decision(self, now, cr, s_cooldown, ve, device, key, ids, total, need, within, left);
                        Py_DECREF(left);
                        if (append_decision(out, d) < 0)
                            goto loop_error;
                    }
                    Py_DECREF(ids);
                    Py_XDECREF(total_obj);
                    Py_DECREF(skey);
                    continue;
                }
            }
            if (discard(self->cooldowns, skey) < 0 || PyDict_SetItem(self->cooldowns, skey, now) < 0
                || evict_oldest(self, self->cooldowns) < 0)
                goto loop_error;
            self->dirty = 1;
        }
        if (has_th && discard(self->windows, skey) < 0) /* a fired threshold counts afresh */
            goto loop_error;
        self->fired++;
        d = decision(self, now, cr, s_fired, ve, device, key, ids, total, need, within, s_float0);
        if (append_decision(out, d) < 0)
            goto loop_error;
        Py_DECREF(ids);
        Py_XDECREF(total_obj);
        Py_DECREF(skey);
        if (!cr->cont) {
            self->matched -= nm - 1 - i;
            break;
        }
        continue;
    loop_error:
        Py_XDECREF(ids);
        Py_XDECREF(total_obj);
        Py_DECREF(skey);
        goto error;
    }
    goto done;

error_kind:
    Py_DECREF(kind);
error:
    Py_CLEAR(out);
done:
    if (matched != small)
        PyMem_Free(matched);
    Py_XDECREF(cands); Py_XDECREF(owned_event); Py_XDECREF(ve); Py_XDECREF(device); Py_XDECREF(dev_key);
    Py_XDECREF(ve_key); Py_XDECREF(eid); Py_XDECREF(count_obj); Py_XDECREF(now);
    return out;
}

static PyObject *
Core_process(Core *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "process(event, now=None)");
        return NULL;
    }
    return process_one(self, args[0], nargs == 2 ? args[1] : Py_None);
}

/* process_timed(items) -> decisions of every (time, event) pair (or (time, seq, event)
 * triple: the event is the last item), in order: a replay's loop without the interpreter. */
static PyObject *
Core_process_timed(Core *self, PyObject *items)
{
    PyObject *it = PyObject_GetIter(items), *item, *all = PyList_New(0);
    if (it == NULL || all == NULL)
        goto error;
    while ((item = PyIter_Next(it)) != NULL) {
        if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) < 2) {
            Py_DECREF(item);
            PyErr_SetString(PyExc_TypeError, "items are (time, event) or (time, seq, event) tuples");
            goto error;
        }
        PyObject *ds = process_one(self, PyTuple_GET_ITEM(item, PyTuple_GET_SIZE(item) - 1),
                                   PyTuple_GET_ITEM(item, 0));
        Py_DECREF(item);
        if (ds == NULL)
            goto error;
        int rc = PyList_GET_SIZE(ds) ? PyList_SetSlice(all, PY_SSIZE_T_MAX, PY_SSIZE_T_MAX, ds) : 0;
        Py_DECREF(ds);
        if (rc < 0)
            goto error;
    }
    if (PyErr_Occurred())
        goto error;
    Py_DECREF(it);
    return all;
error:
    Py_XDECREF(it);
    Py_XDECREF(all);
    return NULL;
}

static PyMethodDef Core_methods[] = {
    {"process", (PyCFunction)(void (*)(void))Core_process, METH_FASTCALL,
     "process(event, now=None) -> list of decisions"},
    {"process_timed", (PyCFunction)Core_process_timed, METH_O,
     "process_timed(items) -> decisions of (time, event) or (time, seq, event) items, in order"},
    {NULL},
};

static PyMemberDef Core_members[] = {
    {"dirty", T_BOOL, offsetof(Core, dirty), 0, NULL},
    {"explain", T_BOOL, offsetof(Core, explain), READONLY, NULL},
    {"events", T_LONGLONG, offsetof(Core, events), 0, NULL},
    {"matched", T_LONGLONG, offsetof(Core, matched), 0, NULL},
    {"fired", T_LONGLONG, offsetof(Core, fired), 0, NULL},
    {"suppressed_threshold", T_LONGLONG, offsetof(Core, suppressed_threshold), 0, NULL},
    {"suppressed_cooldown", T_LONGLONG, offsetof(Core, suppressed_cooldown), 0, NULL},
    {"evicted", T_LONGLONG, offsetof(Core, evicted), 0, NULL},
    {"cleared", T_LONGLONG, offsetof(Core, cleared), 0, NULL},
    {NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fsnotifyd.rules._decide.Core",
    .tp_doc = "The rules engine's per-event decision loop (reference: fsnotifyd.rules.decide.Core).",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Core_init,
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_traverse = (traverseproc)Core_traverse,
    .tp_clear = (inquiry)Core_clear,
    .tp_methods = Core_methods,
    .tp_members = Core_members,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_decide",
    "The rules engine's per-event path in C (reference implementation: fsnotifyd.rules.decide).", -1,
};

PyMODINIT_FUNC
PyInit__decide(void)
{
#define INTERN(var, text) if (!(var = PyUnicode_InternFromString(text))) return NULL
    INTERN(s_kind, "kind"); INTERN(s_ve, "ve"); INTERN(s_device, "device"); INTERN(s_name, "name");
    INTERN(s_id, "id"); INTERN(s_count, "count"); INTERN(s_fullmatch, "fullmatch");
    INTERN(s_fired, "fired"); INTERN(s_threshold, "threshold"); INTERN(s_cooldown, "cooldown");
    INTERN(s_empty, "");
#undef INTERN
    if (!(s_int0 = PyLong_FromLong(0)) || !(s_float0 = PyFloat_FromDouble(0.0)))
        return NULL;
    if (PyType_Ready(&CRuleType) < 0 || PyType_Ready(&CoreType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    PyObject *ops = PyTuple_New(OP_COUNT_);
    if (ops == NULL)
        goto error;
    for (int i = 0; i < OP_COUNT_; i++) {
        PyObject *s = PyUnicode_FromString(OP_NAMES[i]);
        if (s == NULL) {
            Py_DECREF(ops);
            goto error;
        }
        PyTuple_SET_ITEM(ops, i, s);
    }
    if (PyModule_AddObject(m, "OPS", ops) < 0) {
        Py_DECREF(ops);
        goto error;
    }
    if (PyModule_AddObject(m, "MAX_FACTS", PyLong_FromLongLong(MAX_FACTS)) < 0
        || PyModule_AddIntConstant(m, "ABI", FSNOTIFYD_ABI) < 0
        || PyModule_AddObjectRef(m, "CompiledRule", (PyObject *)&CRuleType) < 0
        || PyModule_AddObjectRef(m, "Core", (PyObject *)&CoreType) < 0)
        goto error;
    return m;
error:
    Py_DECREF(m);
    return NULL;
}
