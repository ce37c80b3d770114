// SPDX-License-Identifier: MIT
/*
 * pyglue.c - the one place the core is called with the GIL held.
 *
 * cffi releases the GIL around every call into the core, and that is what
 * the rest of the core wants.  Here it is what must not happen.  When the
 * program installs a SIGSEGV or SIGBUS handler over ours (signal.signal,
 * faulthandler.enable), there is a window between the interpreter's
 * sigaction and our putting uksm_sigsegv back on top.  A thread that
 * writes a merged page with cow="signal" inside that window faults into
 * the interpreter's handler, which only notes the signal and returns: the
 * write faults again, for ever, and if that thread holds the GIL, the
 * thread that was to re-install ours never runs again.  So the program's
 * call and our re-install are made here, one C function called through
 * ctypes.PyDLL: the GIL is held from before the one to after the other,
 * and no Python thread runs in between.  (A thread running without the
 * GIL, numpy inside a large copy, may still fault in the window; it spins
 * until ours is back, microseconds later, and goes on.)
 */
#include <Python.h>

#include "uksm.h"

/*
 * uksm_py_call_then_install - @fn(*@args, **@kwargs), then, if @install,
 * uksm_install_handler().  Appends the call's result and the install's
 * return to @out.  Returns 0, or -1 with a Python exception set (ctypes
 * raises it).
 */
int uksm_py_call_then_install(PyObject *fn, PyObject *args, PyObject *kwargs,
			      int install, PyObject *out)
{
	PyObject *r, *n;
	int ret;

	r = PyObject_Call(fn, args, kwargs == Py_None ? NULL : kwargs);
	if (!r)
		return -1;
	ret = install ? uksm_install_handler() : 0;
	n = PyLong_FromLong(ret);
	if (!n || PyList_Append(out, r) || PyList_Append(out, n)) {
		Py_XDECREF(n);
		Py_DECREF(r);
		return -1;
	}
	Py_DECREF(n);
	Py_DECREF(r);
	return 0;
}
