/* The per-request step profiler's hot path in C: app.monitor._stepdriver.
 *
 * An optional speedup, like aiohttp's, yarl's and multidict's: app/monitor/middleware.py and
 * app/monitor/routes.py hold the pure-Python implementation, which runs when this module was not
 * built or LOOP_LAB_NO_EXTENSIONS is set. Both must behave the same (tests/test_stepdriver.py).
 *
 * - RouteCounters: one route's per-request figures (in flight, counts per status, longest and
 *   last step, the duration and step histograms), updated in C; read from Python as attributes.
 * - StepDriver: the awaitable a metered handler returns. It drives the handler's coroutine one
 *   step at a time (am_send / send / throw / close, like a generator's `yield from`), times each
 *   step with CLOCK_MONOTONIC (the clock time.perf_counter reads on Linux), and accounts the
 *   request into its route's RouteCounters when it ends.
 * - Metered: the callable installed as a route's handler: handler(request) wrapped in a
 *   StepDriver, with no Python frame of its own. It stores the driver in the request under the
 *   configured key (app.monitor.steps.STEPS), where demo handlers read max_step_so_far() mid-step.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <time.h>

#define CLIENT_CLOSED 499 /* the client went away before the answer (nginx's convention) */

/* set once by configure(): the request key demo handlers read their driver under (a plain
 * dict-like store: a context variable cost more than the rest of the driver's bookkeeping), and
 * the exception classes whose requests get a status of their own */
static PyObject *steps_key = NULL;
static PyObject *http_exception_type = NULL;
static PyObject *cancelled_error_type = NULL;
/* optional: exc -> the plain response a raised HTTPException stands for, returned instead of
 * re-raising it (app.monitor.middleware.http_error_response); NULL: HTTPExceptions go on up */
static PyObject *http_error_response = NULL;
/* interned attribute names */
static PyObject *str_status = NULL;
/* aiohttp's own fields behind `StreamResponse.status` and the request's `__setitem__`: read and
 * written directly, they spare every request two Python frames (a property and a method that
 * warns about string keys). Should a later aiohttp rename them, the public ways are used. */
static PyObject *str__status = NULL;
static PyObject *str__state = NULL;
static PyObject *str_throw = NULL;
static PyObject *str_close = NULL;

static inline double
monotonic_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- RouteCounters ------------------------------------------------------------------------ */

#define STATUS_SLOTS 600 /* statuses 0..599 are counted in an array */

typedef struct {
    PyObject_HEAD
    PyObject *route;
    /* counts per status: HTTP's in an array (a dict update would allocate an int per request),
     * any other in the dict; `statuses` merges them when read */
    unsigned long long status_counts[STATUS_SLOTS];
    /* the array's statuses in the order first seen, so reading walks only those */
    short seen_statuses[STATUS_SLOTS];
    Py_ssize_t n_seen_statuses;
    PyObject *statuses; /* dict: status -> count, for statuses outside 0..STATUS_SLOTS-1 */
    Py_ssize_t in_flight;
    double max_step;
    double last_step;
    double duration_sum;
    double step_sum;
    Py_ssize_t n_duration; /* bounds; the counts have one slot more (+Inf) */
    Py_ssize_t n_step;
    double *duration_bounds;
    double *step_bounds;
    unsigned long long *duration_counts;
    unsigned long long *step_counts;
} RouteCounters;

static PyTypeObject RouteCountersType;

static int
read_bounds(PyObject *seq, double **bounds, unsigned long long **counts, Py_ssize_t *n)
{
    PyObject *fast = PySequence_Fast(seq, "bucket bounds must be a sequence of numbers");
    if (fast == NULL) {
        return -1;
    }
    Py_ssize_t size = PySequence_Fast_GET_SIZE(fast);
    double *b = PyMem_Calloc(size + 1, sizeof(double));
    unsigned long long *c = PyMem_Calloc(size + 1, sizeof(unsigned long long));
    if (b == NULL || c == NULL) {
        PyMem_Free(b);
        PyMem_Free(c);
        Py_DECREF(fast);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < size; i++) {
        b[i] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(fast, i));
        if (b[i] == -1.0 && PyErr_Occurred()) {
            PyMem_Free(b);
            PyMem_Free(c);
            Py_DECREF(fast);
            return -1;
        }
        if (i > 0 && !(b[i] > b[i - 1])) {
            PyMem_Free(b);
            PyMem_Free(c);
            Py_DECREF(fast);
            PyErr_SetString(PyExc_ValueError, "bucket bounds must increase");
            return -1;
        }
    }
    Py_DECREF(fast);
    PyMem_Free(*bounds);
    PyMem_Free(*counts);
    *bounds = b;
    *counts = c;
    *n = size;
    return 0;
}

static int
counters_init(RouteCounters *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"route", "duration_bounds", "step_bounds", NULL};
    PyObject *route, *duration_bounds, *step_bounds;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "UOO:RouteCounters", kwlist, &route,
                                     &duration_bounds, &step_bounds)) {
        return -1;
    }
    if (read_bounds(duration_bounds, &self->duration_bounds, &self->duration_counts,
                    &self->n_duration) < 0 ||
        read_bounds(step_bounds, &self->step_bounds, &self->step_counts, &self->n_step) < 0) {
        return -1;
    }
    PyObject *statuses = PyDict_New();
    if (statuses == NULL) {
        return -1;
    }
    Py_INCREF(route);
    Py_XSETREF(self->route, route);
    Py_XSETREF(self->statuses, statuses);
    memset(self->status_counts, 0, sizeof(self->status_counts));
    self->n_seen_statuses = 0;
    self->in_flight = 0;
    self->max_step = self->last_step = self->duration_sum = self->step_sum = 0.0;
    return 0;
}

static void
counters_dealloc(RouteCounters *self)
{
    Py_CLEAR(self->route);
    Py_CLEAR(self->statuses);
    PyMem_Free(self->duration_bounds);
    PyMem_Free(self->step_bounds);
    PyMem_Free(self->duration_counts);
    PyMem_Free(self->step_counts);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* the first bound >= value, i.e. Prometheus' `le` bucket (bisect_left); n is +Inf */
static inline Py_ssize_t
bucket_of(const double *bounds, Py_ssize_t n, double value)
{
    Py_ssize_t i = 0;
    while (i < n && bounds[i] < value) {
        i++;
    }
    return i;
}

static int
counters_add_status(RouteCounters *self, long status)
{
    if (status >= 0 && status < STATUS_SLOTS) {
        if (self->status_counts[status]++ == 0) {
            self->seen_statuses[self->n_seen_statuses++] = (short)status;
        }
        return 0;
    }
    PyObject *key = PyLong_FromLong(status);
    if (key == NULL) {
        return -1;
    }
    long long count = 1;
    PyObject *current = PyDict_GetItemWithError(self->statuses, key); /* borrowed */
    if (current != NULL) {
        count = PyLong_AsLongLong(current) + 1;
        if (count == 0 && PyErr_Occurred()) {
            Py_DECREF(key);
            return -1;
        }
    }
    else if (PyErr_Occurred()) {
        Py_DECREF(key);
        return -1;
    }
    PyObject *value = PyLong_FromLongLong(count);
    if (value == NULL) {
        Py_DECREF(key);
        return -1;
    }
    int rc = PyDict_SetItem(self->statuses, key, value);
    Py_DECREF(key);
    Py_DECREF(value);
    return rc;
}

/* one answered request: its status, wall time and longest step (seconds) */
static int
counters_record(RouteCounters *self, long status, double duration, double step)
{
    if (self->duration_counts == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "RouteCounters.__init__ was not called");
        return -1;
    }
    if (counters_add_status(self, status) < 0) {
        return -1;
    }
    self->last_step = step;
    if (step > self->max_step) {
        self->max_step = step;
    }
    self->duration_counts[bucket_of(self->duration_bounds, self->n_duration, duration)]++;
    self->duration_sum += duration;
    self->step_counts[bucket_of(self->step_bounds, self->n_step, step)]++;
    self->step_sum += step;
    return 0;
}

static PyObject *
counters_add(RouteCounters *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "add(status, duration, step) takes 3 arguments");
        return NULL;
    }
    long status = PyLong_AsLong(args[0]);
    if (status == -1 && PyErr_Occurred()) {
        return NULL;
    }
    double duration = PyFloat_AsDouble(args[1]);
    if (duration == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    double step = PyFloat_AsDouble(args[2]);
    if (step == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    if (counters_record(self, status, duration, step) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
counts_list(const unsigned long long *counts, Py_ssize_t n)
{
    if (counts == NULL) {
        return PyList_New(0);
    }
    PyObject *list = PyList_New(n + 1);
    if (list == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i <= n; i++) {
        PyObject *item = PyLong_FromUnsignedLongLong(counts[i]);
        if (item == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, item);
    }
    return list;
}

/* every status counted so far: status -> count (a new dict) */
static PyObject *
counters_get_statuses(RouteCounters *self, void *closure)
{
    PyObject *merged = self->statuses == NULL ? PyDict_New() : PyDict_Copy(self->statuses);
    if (merged == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < self->n_seen_statuses; i++) {
        long status = self->seen_statuses[i];
        PyObject *key = PyLong_FromLong(status);
        PyObject *value = PyLong_FromUnsignedLongLong(self->status_counts[status]);
        if (key == NULL || value == NULL || PyDict_SetItem(merged, key, value) < 0) {
            Py_XDECREF(key);
            Py_XDECREF(value);
            Py_DECREF(merged);
            return NULL;
        }
        Py_DECREF(key);
        Py_DECREF(value);
    }
    return merged;
}

static PyObject *
counters_get_duration_buckets(RouteCounters *self, void *closure)
{
    return counts_list(self->duration_counts, self->n_duration);
}

static PyObject *
counters_get_step_buckets(RouteCounters *self, void *closure)
{
    return counts_list(self->step_counts, self->n_step);
}

static PyMethodDef counters_methods[] = {
    {"add", (PyCFunction)(void (*)(void))counters_add, METH_FASTCALL,
     "add(status, duration, step): count one answered request (seconds)."},
    {NULL},
};

static PyMemberDef counters_members[] = {
    {"route", T_OBJECT, offsetof(RouteCounters, route), READONLY, NULL},
    {"in_flight", T_PYSSIZET, offsetof(RouteCounters, in_flight), 0, NULL},
    {"max_step", T_DOUBLE, offsetof(RouteCounters, max_step), 0, NULL},
    {"last_step", T_DOUBLE, offsetof(RouteCounters, last_step), 0, NULL},
    {"duration_sum", T_DOUBLE, offsetof(RouteCounters, duration_sum), 0, NULL},
    {"step_sum", T_DOUBLE, offsetof(RouteCounters, step_sum), 0, NULL},
    {NULL},
};

static PyGetSetDef counters_getset[] = {
    {"statuses", (getter)counters_get_statuses, NULL,
     "Requests answered per status: status -> count (a copy).", NULL},
    {"duration_buckets", (getter)counters_get_duration_buckets, NULL,
     "Non-cumulative counts per duration bucket; the last is +Inf (a copy).", NULL},
    {"step_buckets", (getter)counters_get_step_buckets, NULL,
     "Non-cumulative counts per step bucket; the last is +Inf (a copy).", NULL},
    {NULL},
};

static PyTypeObject RouteCountersType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "app.monitor._stepdriver.RouteCounters",
    .tp_basicsize = sizeof(RouteCounters),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "RouteCounters(route, duration_bounds, step_bounds): one route's request figures.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)counters_init,
    .tp_dealloc = (destructor)counters_dealloc,
    .tp_methods = counters_methods,
    .tp_members = counters_members,
    .tp_getset = counters_getset,
};

/* ---- StepDriver --------------------------------------------------------------------------- */

enum { DRIVER_NEW, DRIVER_SUSPENDED, DRIVER_DONE };

typedef struct {
    PyObject_HEAD
    PyObject *coro;           /* the handler's coroutine (or a view's __await__ iterator) */
    RouteCounters *record;    /* where the request is accounted when it ends */
    double started;           /* start of the first step */
    double step_started;      /* start of the step running now; 0.0 between steps */
    double max_step;
    Py_ssize_t steps;
    int state;
    int running;              /* inside a step: a re-entrant send is an error, as for generators */
} StepDriver;

static PyTypeObject StepDriverType;

static PyObject *
driver_new(PyObject *coro, RouteCounters *record)
{
    StepDriver *self = PyObject_GC_New(StepDriver, &StepDriverType);
    if (self == NULL) {
        return NULL;
    }
    Py_INCREF(coro);
    self->coro = coro;
    Py_INCREF(record);
    self->record = record;
    self->started = self->step_started = self->max_step = 0.0;
    self->steps = 0;
    self->state = DRIVER_NEW;
    self->running = 0;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static PyObject *
driver_tp_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *coro;
    PyObject *record;
    static char *kwlist[] = {"coro", "record", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO!:StepDriver", kwlist, &coro,
                                     &RouteCountersType, &record)) {
        return NULL;
    }
    return driver_new(coro, (RouteCounters *)record);
}

static int
driver_traverse(StepDriver *self, visitproc visit, void *arg)
{
    Py_VISIT(self->coro);
    Py_VISIT(self->record);
    return 0;
}

static int
driver_clear(StepDriver *self)
{
    Py_CLEAR(self->coro);
    Py_CLEAR(self->record);
    return 0;
}

/* an HTTPException's status; 500 if it cannot be read. Call with no exception set. */
static long
http_status_of(PyObject *exc)
{
    long status = 500;
    PyObject *attr = exc == NULL ? NULL : PyObject_GetAttr(exc, str_status);
    if (attr != NULL) {
        status = PyLong_AsLong(attr);
        Py_DECREF(attr);
    }
    if (status == -1) {
        status = 500;
    }
    PyErr_Clear(); /* a failed getattr: keep the handler's own exception */
    return status;
}

/* the status a request that ended with the exception being raised now is counted under */
static long
status_of_error(void)
{
    if (http_exception_type != NULL && PyErr_ExceptionMatches(http_exception_type)) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        long status = http_status_of(value);
        PyErr_Restore(type, value, tb);
        return status;
    }
    if (cancelled_error_type != NULL && PyErr_ExceptionMatches(cancelled_error_type)) {
        return CLIENT_CLOSED;
    }
    return 500;
}

/* With an HTTPException being raised and http_error_response configured: take the exception, set
 * *code to its status and *response to the response it stands for (a new reference), as the
 * Python driver's `except web.HTTPException: return http_error_response(exc)`. Returns 1 then;
 * 0, leaving the exception alone, if it is not one to answer; -1 if answering it raised. */
static int
answer_http_error(long *code, PyObject **response)
{
    *response = NULL;
    if (http_error_response == NULL || http_exception_type == NULL ||
        !PyErr_ExceptionMatches(http_exception_type)) {
        return 0;
    }
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value == NULL || !PyErr_GivenExceptionMatches(value, http_exception_type)) {
        *code = 500; /* normalizing failed: raise what it raised */
        PyErr_Restore(type, value, tb);
        return -1;
    }
    /* its traceback holds the handler's frames: it goes now, with the exception */
    Py_XDECREF(type);
    Py_XDECREF(tb);
    *code = http_status_of(value);
    *response = PyObject_CallOneArg(http_error_response, value);
    Py_DECREF(value);
    return *response == NULL ? -1 : 1;
}

/* obj.name (a new reference); NULL without an error set if obj has no such attribute */
static PyObject *
optional_attr(PyObject *obj, PyObject *name)
{
    PyObject *attr = PyObject_GetAttr(obj, name);
    if (attr == NULL && PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear();
    }
    return attr;
}

/* response.status (a new reference), read from aiohttp's `_status` field where it has one */
static PyObject *
response_status(PyObject *response)
{
    PyObject *attr = optional_attr(response, str__status);
    if (attr != NULL && PyLong_CheckExact(attr)) {
        return attr;
    }
    Py_XDECREF(attr);
    return PyErr_Occurred() ? NULL : PyObject_GetAttr(response, str_status);
}

/* request[key] = value, into the request's own `_state` dict where it has one */
static int
store_in_request(PyObject *request, PyObject *key, PyObject *value)
{
    PyObject *state = optional_attr(request, str__state);
    int rc;
    if (state != NULL && PyDict_CheckExact(state)) {
        rc = PyDict_SetItem(state, key, value);
    }
    else if (PyErr_Occurred()) {
        rc = -1;
    }
    else {
        rc = PyObject_SetItem(request, key, value);
    }
    Py_XDECREF(state);
    return rc;
}

/* The request ended at `ended`: close its last step and account it. Keeps the
 * exception being raised, if any; returns -1 with an exception set only if accounting failed and
 * none was being raised. */
static int
driver_finish(StepDriver *self, long status, double ended)
{
    if (self->step_started != 0.0) { /* the handler returned or raised: its last step ends now */
        double step = ended - self->step_started;
        self->step_started = 0.0;
        if (step > self->max_step) {
            self->max_step = step;
        }
    }
    self->state = DRIVER_DONE;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    RouteCounters *record = self->record;
    int rc = 0;
    if (record != NULL) {
        record->in_flight--;
        rc = counters_record(record, status, ended - self->started, self->max_step);
    }
    Py_CLEAR(self->coro); /* the handler's frame and its request go now, not with the driver */
    if (type != NULL) {
        if (rc < 0) {
            PyErr_WriteUnraisable((PyObject *)self);
        }
        PyErr_Restore(type, value, tb);
        return 0;
    }
    return rc;
}

/* One step: send `arg` into the handler, or throw `throw_args` (a tuple) into it.
 * Like am_send: PYGEN_NEXT with what the handler yielded (for the Task), PYGEN_RETURN with its
 * result, or PYGEN_ERROR with its exception set. */
static PySendResult
driver_step(StepDriver *self, PyObject *arg, PyObject *throw_args, PyObject **result)
{
    *result = NULL;
    if (self->running) {
        PyErr_SetString(PyExc_ValueError, "step driver already executing");
        return PYGEN_ERROR;
    }
    if (self->state == DRIVER_NEW && throw_args != NULL) {
        /* thrown in before the first step: like a generator, end without running anything */
        self->state = DRIVER_DONE;
    }
    if (self->state == DRIVER_DONE || self->coro == NULL) {
        if (throw_args != NULL) { /* like an exhausted generator: the exception comes back */
            PyObject *typ = PyTuple_GET_ITEM(throw_args, 0); /* checked: a class or instance */
            if (PyExceptionClass_Check(typ)) {
                PyErr_SetObject(typ, PyTuple_GET_SIZE(throw_args) > 1
                                         ? PyTuple_GET_ITEM(throw_args, 1)
                                         : NULL);
            }
            else {
                PyErr_SetObject((PyObject *)Py_TYPE(typ), typ);
            }
            return PYGEN_ERROR;
        }
        Py_INCREF(Py_None);
        *result = Py_None;
        return PYGEN_RETURN;
    }
    double started = monotonic_now();
    if (self->state == DRIVER_NEW) {
        if (throw_args == NULL && arg != Py_None) {
            PyErr_SetString(PyExc_TypeError,
                            "can't send non-None value to a just-started step driver");
            return PYGEN_ERROR;
        }
        self->state = DRIVER_SUSPENDED;
        self->record->in_flight++;
        self->started = started;
    }
    self->step_started = started;
    self->running = 1;
    PyObject *coro = self->coro;
    Py_INCREF(coro);
    PySendResult status;
    if (throw_args == NULL) {
        status = PyIter_Send(coro, arg, result);
    }
    else {
        PyObject *throw = PyObject_GetAttr(coro, str_throw);
        PyObject *yielded = throw == NULL ? NULL : PyObject_Call(throw, throw_args, NULL);
        Py_XDECREF(throw);
        if (yielded != NULL) {
            *result = yielded;
            status = PYGEN_NEXT;
        }
        else if (PyErr_ExceptionMatches(PyExc_StopIteration)) {
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            PyErr_NormalizeException(&type, &value, &tb);
            if (value != NULL &&
                PyObject_TypeCheck(value, (PyTypeObject *)PyExc_StopIteration)) {
                *result = Py_NewRef(((PyStopIterationObject *)value)->value);
                Py_XDECREF(type);
                Py_XDECREF(value);
                Py_XDECREF(tb);
                status = PYGEN_RETURN;
            }
            else { /* normalizing failed (no memory): raise that */
                PyErr_Restore(type, value, tb);
                status = PYGEN_ERROR;
            }
        }
        else {
            status = PYGEN_ERROR;
        }
    }
    Py_DECREF(coro);
    self->running = 0;
    double ended = monotonic_now();
    self->steps++;
    if (status == PYGEN_NEXT) {
        double step = ended - started;
        if (step > self->max_step) {
            self->max_step = step;
        }
        self->step_started = 0.0;
        return PYGEN_NEXT;
    }
    long code;
    if (status == PYGEN_RETURN) {
        PyObject *attr = response_status(*result);
        if (attr == NULL) {
            code = 500;
            Py_CLEAR(*result);
            status = PYGEN_ERROR; /* as the Python driver: reading response.status raised */
        }
        else {
            code = PyLong_AsLong(attr);
            Py_DECREF(attr);
            if (code == -1 && PyErr_Occurred()) {
                code = 500;
                Py_CLEAR(*result);
                status = PYGEN_ERROR;
            }
        }
    }
    else {
        int answered = answer_http_error(&code, result);
        if (answered > 0) {
            status = PYGEN_RETURN;
        }
        else if (answered == 0) {
            code = status_of_error();
        }
        /* < 0: answering it raised; that goes up, counted under the HTTPException's status */
    }
    if (driver_finish(self, code, ended) < 0) {
        Py_CLEAR(*result);
        return PYGEN_ERROR;
    }
    return status;
}

static PySendResult
driver_am_send(StepDriver *self, PyObject *arg, PyObject **result)
{
    return driver_step(self, arg, NULL, result);
}

/* a return value as StopIteration(value), as generators raise it */
static void
set_stop_iteration(PyObject *value)
{
    if (value == Py_None) {
        PyErr_SetNone(PyExc_StopIteration);
        return;
    }
    if (PyTuple_Check(value) || PyExceptionInstance_Check(value)) {
        PyObject *exc = PyObject_CallOneArg(PyExc_StopIteration, value);
        if (exc != NULL) {
            PyErr_SetObject(PyExc_StopIteration, exc);
            Py_DECREF(exc);
        }
        return;
    }
    PyErr_SetObject(PyExc_StopIteration, value);
}

static PyObject *
driver_result(PySendResult status, PyObject *result)
{
    if (status == PYGEN_NEXT) {
        return result;
    }
    if (status == PYGEN_RETURN) {
        set_stop_iteration(result);
        Py_DECREF(result);
    }
    return NULL;
}

static PyObject *
driver_iternext(StepDriver *self)
{
    PyObject *result;
    PySendResult status = driver_step(self, Py_None, NULL, &result);
    if (status == PYGEN_RETURN && result == Py_None) {
        Py_DECREF(result);
        return NULL; /* exhausted, no value: tp_iternext may return NULL without an exception */
    }
    return driver_result(status, result);
}

static PyObject *
driver_send(StepDriver *self, PyObject *arg)
{
    PyObject *result;
    PySendResult status = driver_step(self, arg, NULL, &result);
    return driver_result(status, result);
}

static PyObject *driver_close(StepDriver *self, PyObject *unused);

/* throw()'s arguments checked as a generator's throw checks them, before anything runs: a bad
 * call raises TypeError and leaves the request where it was */
static int
check_throw_args(PyObject *args)
{
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    if (n < 1 || n > 3) {
        PyErr_SetString(PyExc_TypeError, "throw expected 1 to 3 arguments");
        return -1;
    }
    PyObject *typ = PyTuple_GET_ITEM(args, 0);
    PyObject *val = n > 1 ? PyTuple_GET_ITEM(args, 1) : Py_None;
    PyObject *tb = n > 2 ? PyTuple_GET_ITEM(args, 2) : Py_None;
    if (tb != Py_None && !PyTraceBack_Check(tb)) {
        PyErr_SetString(PyExc_TypeError, "throw() third argument must be a traceback object");
        return -1;
    }
    if (PyExceptionClass_Check(typ)) {
        return 0;
    }
    if (PyExceptionInstance_Check(typ)) {
        if (val != Py_None) {
            PyErr_SetString(PyExc_TypeError, "instance exception may not have a separate value");
            return -1;
        }
        return 0;
    }
    PyErr_Format(PyExc_TypeError,
                 "exceptions must be classes or instances deriving from BaseException, not %s",
                 Py_TYPE(typ)->tp_name);
    return -1;
}

static PyObject *
driver_throw(StepDriver *self, PyObject *args)
{
    if (check_throw_args(args) < 0) {
        return NULL;
    }
    PyObject *typ = PyTuple_GET_ITEM(args, 0);
    int is_exit = PyExceptionInstance_Check(typ)
                      ? PyErr_GivenExceptionMatches(typ, PyExc_GeneratorExit)
                      : (PyExceptionClass_Check(typ) &&
                         PyErr_GivenExceptionMatches(typ, PyExc_GeneratorExit));
    if (is_exit && self->state == DRIVER_SUSPENDED && !self->running) {
        /* as the Python driver: GeneratorExit closes the handler, then goes on up */
        PyObject *closed = driver_close(self, NULL);
        if (closed == NULL) {
            return NULL;
        }
        Py_DECREF(closed);
        if (PyExceptionInstance_Check(typ)) {
            PyErr_SetObject((PyObject *)Py_TYPE(typ), typ);
        }
        else {
            PyErr_SetObject(typ, PyTuple_GET_SIZE(args) > 1 ? PyTuple_GET_ITEM(args, 1) : NULL);
        }
        return NULL;
    }
    PyObject *result;
    PySendResult status = driver_step(self, Py_None, args, &result);
    return driver_result(status, result);
}

static PyObject *
driver_close(StepDriver *self, PyObject *unused)
{
    if (self->state == DRIVER_NEW) {
        /* never started: nothing ran, nothing is counted (a generator's close does the same) */
        self->state = DRIVER_DONE;
        Py_RETURN_NONE;
    }
    if (self->state == DRIVER_DONE || self->coro == NULL) {
        Py_RETURN_NONE;
    }
    if (self->running) {
        PyErr_SetString(PyExc_ValueError, "step driver already executing");
        return NULL;
    }
    /* closed between steps (the Python driver's `except GeneratorExit: coro.close()`): no step
     * is running; the request counts as a 500, as there */
    PyObject *coro = self->coro;
    Py_INCREF(coro);
    PyObject *closed = PyObject_CallMethodNoArgs(coro, str_close);
    Py_DECREF(coro);
    double ended = monotonic_now();
    long code = 500;
    int failed = closed == NULL;
    Py_XDECREF(closed);
    if (failed) {
        /* the handler's cleanup raised: counted, and answered, as the Python driver does */
        PyObject *response;
        int answered = answer_http_error(&code, &response);
        if (answered > 0) {
            Py_DECREF(response); /* a generator's close() drops what it returns */
            failed = 0;
        }
        else if (answered == 0) {
            code = status_of_error();
        }
    }
    if (driver_finish(self, code, ended) < 0 || failed) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static void
driver_finalize(StepDriver *self)
{
    if (self->state != DRIVER_SUSPENDED) {
        return;
    }
    /* an unfinished request is dropped: close it so it leaves in-flight, as a generator would */
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *closed = driver_close(self, NULL);
    if (closed == NULL) {
        PyErr_WriteUnraisable((PyObject *)self);
    }
    else {
        Py_DECREF(closed);
    }
    PyErr_Restore(type, value, tb);
}

static void
driver_dealloc(StepDriver *self)
{
    if (PyObject_CallFinalizerFromDealloc((PyObject *)self) < 0) {
        return; /* resurrected */
    }
    PyObject_GC_UnTrack(self);
    driver_clear(self);
    PyObject_GC_Del(self);
}

static PyObject *
driver_await(StepDriver *self)
{
    Py_INCREF(self);
    return (PyObject *)self;
}

static PyObject *
driver_max_step_so_far(StepDriver *self, PyObject *unused)
{
    double longest = self->max_step;
    if (self->step_started != 0.0) {
        double running = monotonic_now() - self->step_started;
        if (running > longest) {
            longest = running;
        }
    }
    return PyFloat_FromDouble(longest);
}

static PyMethodDef driver_methods[] = {
    {"send", (PyCFunction)driver_send, METH_O, "Send a value into the handler: one step."},
    {"throw", (PyCFunction)driver_throw, METH_VARARGS, "Throw an exception into the handler."},
    {"close", (PyCFunction)driver_close, METH_NOARGS, "Close the handler between steps."},
    {"max_step_so_far", (PyCFunction)driver_max_step_so_far, METH_NOARGS,
     "Longest step including the one running now, in seconds."},
    {NULL},
};

static PyMemberDef driver_members[] = {
    {"max_step", T_DOUBLE, offsetof(StepDriver, max_step), READONLY, NULL},
    {"steps", T_PYSSIZET, offsetof(StepDriver, steps), READONLY, NULL},
    {"started", T_DOUBLE, offsetof(StepDriver, started), READONLY, NULL},
    {"step_started", T_DOUBLE, offsetof(StepDriver, step_started), READONLY, NULL},
    {NULL},
};

static PyAsyncMethods driver_as_async = {
    .am_await = (unaryfunc)driver_await,
    .am_send = (sendfunc)driver_am_send,
};

static PyTypeObject StepDriverType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "app.monitor._stepdriver.StepDriver",
    .tp_basicsize = sizeof(StepDriver),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "StepDriver(coro, record): await it to run coro step by step, timed and counted.",
    .tp_new = driver_tp_new,
    .tp_dealloc = (destructor)driver_dealloc,
    .tp_finalize = (destructor)driver_finalize,
    .tp_traverse = (traverseproc)driver_traverse,
    .tp_clear = (inquiry)driver_clear,
    .tp_as_async = &driver_as_async,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)driver_iternext,
    .tp_methods = driver_methods,
    .tp_members = driver_members,
};

/* ---- Metered ------------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    PyObject *handler;
    RouteCounters *record;
    int view; /* a class-based view: the handler's result is awaitable, not a coroutine */
    vectorcallfunc vectorcall;
} Metered;

static PyTypeObject MeteredType;
static PyObject *metered_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf,
                                    PyObject *kwnames);

static PyObject *
metered_tp_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *handler;
    PyObject *record;
    int view = 0;
    static char *kwlist[] = {"handler", "record", "view", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO!|p:Metered", kwlist, &handler,
                                     &RouteCountersType, &record, &view)) {
        return NULL;
    }
    if (!PyCallable_Check(handler)) {
        PyErr_SetString(PyExc_TypeError, "handler must be callable");
        return NULL;
    }
    Metered *self = (Metered *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    Py_INCREF(handler);
    self->handler = handler;
    Py_INCREF(record);
    self->record = (RouteCounters *)record;
    self->view = view;
    self->vectorcall = metered_vectorcall;
    return (PyObject *)self;
}

static PyObject *
metered_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Metered *self = (Metered *)callable;
    PyObject *coro = PyObject_Vectorcall(self->handler, args, nargsf, kwnames);
    if (coro == NULL) {
        return NULL;
    }
    if (self->view) {
        PyAsyncMethods *am = Py_TYPE(coro)->tp_as_async;
        if (am == NULL || am->am_await == NULL) {
            PyErr_Format(PyExc_TypeError, "%R is not awaitable", coro);
            Py_DECREF(coro);
            return NULL;
        }
        PyObject *iterator = am->am_await(coro);
        Py_DECREF(coro);
        if (iterator == NULL) {
            return NULL;
        }
        coro = iterator;
    }
    PyObject *driver = driver_new(coro, self->record);
    Py_DECREF(coro);
    /* demo responses read their own max_step_ms through it */
    if (driver != NULL && steps_key != NULL && PyVectorcall_NARGS(nargsf) >= 1 &&
        store_in_request(args[0], steps_key, driver) < 0) {
        Py_CLEAR(driver);
    }
    return driver;
}

static int
metered_traverse(Metered *self, visitproc visit, void *arg)
{
    Py_VISIT(self->handler);
    Py_VISIT(self->record);
    return 0;
}

static int
metered_clear(Metered *self)
{
    Py_CLEAR(self->handler);
    Py_CLEAR(self->record);
    return 0;
}

static void
metered_dealloc(Metered *self)
{
    PyObject_GC_UnTrack(self);
    metered_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
metered_get_name(Metered *self, void *closure)
{
    return PyUnicode_FromString("metered");
}

static PyMemberDef metered_members[] = {
    {"__wrapped__", T_OBJECT, offsetof(Metered, handler), READONLY, NULL},
    {"record", T_OBJECT, offsetof(Metered, record), READONLY, NULL},
    {NULL},
};

static PyGetSetDef metered_getset[] = {
    {"__name__", (getter)metered_get_name, NULL, NULL, NULL},
    {NULL},
};

static PyTypeObject MeteredType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "app.monitor._stepdriver.Metered",
    .tp_basicsize = sizeof(Metered),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "Metered(handler, record, view=False): a route handler whose requests are "
              "driven by a StepDriver.",
    .tp_new = metered_tp_new,
    .tp_dealloc = (destructor)metered_dealloc,
    .tp_traverse = (traverseproc)metered_traverse,
    .tp_clear = (inquiry)metered_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Metered, vectorcall),
    .tp_members = metered_members,
    .tp_getset = metered_getset,
};

/* ---- module ------------------------------------------------------------------------------- */

static PyObject *
configure(PyObject *module, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"steps_key", "http_exception", "cancelled_error",
                             "http_error_response", NULL};
    PyObject *key, *http_exception, *cancelled_error, *answer = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO|O:configure", kwlist, &key,
                                     &http_exception, &cancelled_error, &answer)) {
        return NULL;
    }
    if (!PyExceptionClass_Check(http_exception) || !PyExceptionClass_Check(cancelled_error)) {
        PyErr_SetString(PyExc_TypeError, "http_exception and cancelled_error must be classes");
        return NULL;
    }
    if (answer != Py_None && !PyCallable_Check(answer)) {
        PyErr_SetString(PyExc_TypeError, "http_error_response must be callable or None");
        return NULL;
    }
    Py_XSETREF(http_error_response, answer == Py_None ? NULL : Py_NewRef(answer));
    Py_INCREF(key);
    Py_XSETREF(steps_key, key);
    Py_INCREF(http_exception);
    Py_XSETREF(http_exception_type, http_exception);
    Py_INCREF(cancelled_error);
    Py_XSETREF(cancelled_error_type, cancelled_error);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"configure", (PyCFunction)(void (*)(void))configure, METH_VARARGS | METH_KEYWORDS,
     "configure(steps_key, http_exception, cancelled_error, http_error_response=None): the "
     "request key a driver is stored under, what drivers catch, and what answers a raised "
     "HTTPException (None: it goes on up)."},
    {NULL},
};

static struct PyModuleDef stepdriver_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "app.monitor._stepdriver",
    .m_doc = "The per-request step profiler's hot path (optional; see app/monitor/middleware.py).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__stepdriver(void)
{
    if (str_status == NULL) {
        str_status = PyUnicode_InternFromString("status");
        str__status = PyUnicode_InternFromString("_status");
        str__state = PyUnicode_InternFromString("_state");
        str_throw = PyUnicode_InternFromString("throw");
        str_close = PyUnicode_InternFromString("close");
        if (str_status == NULL || str__status == NULL || str__state == NULL || str_throw == NULL ||
            str_close == NULL) {
            return NULL;
        }
    }
    if (PyType_Ready(&RouteCountersType) < 0 || PyType_Ready(&StepDriverType) < 0 ||
        PyType_Ready(&MeteredType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&stepdriver_module);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddType(module, &RouteCountersType) < 0 ||
        PyModule_AddType(module, &StepDriverType) < 0 ||
        PyModule_AddType(module, &MeteredType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
