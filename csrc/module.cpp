// The Python module softmax_ce._C: importing it loads the kernels' registrations
// (TORCH_LIBRARY_IMPL in the cpu/ and cuda/ sources). Plain CPython API, no pybind11; it only
// reports what was built.
#include <Python.h>

#include "cpu/kernels.h"

namespace {

PyObject* cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(softmax_ce::cpu::kernels().isa);
}

PyObject* cuda_compiled(PyObject*, PyObject*) {
#ifdef SOFTMAX_CE_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "The instruction set of the CPU kernels in use."},
    {"cuda_compiled", cuda_compiled, METH_NOARGS, "Whether the CUDA kernels were built."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "softmax_ce compiled kernels", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
