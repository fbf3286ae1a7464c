// The Python module softmax_ce._C: importing it loads the kernels' registrations
// (TORCH_LIBRARY_IMPL in the cpu/ and cuda/ sources). Plain CPython API, no pybind11; it only
// reports what was built.
#include <Python.h>

#include <exception>

#include <cstdint>

#include "cpu/bindings.h"
#include "cpu/kernels.h"

#ifdef SOFTMAX_CE_WITH_CUDA
namespace softmax_ce::cuda {
bool take_bad_target(int64_t* value);  // ce_cuda.cu
}
#endif

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

// The out-of-range class index the CUDA kernels recorded on the current device since the last
// call (None if there was none), cleared. Synchronises with the device.
PyObject* cuda_take_target_error(PyObject*, PyObject*) {
#ifdef SOFTMAX_CE_WITH_CUDA
  int64_t value = 0;
  bool found = false;
  try {
    found = softmax_ce::cuda::take_bad_target(&value);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  if (found) return PyLong_FromLongLong(value);
#endif
  Py_RETURN_NONE;
}

PyObject* empty_cache(PyObject*, PyObject*) {
  softmax_ce::cpu::empty_output_cache();
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"empty_cache", empty_cache, METH_NOARGS, "Release the CPU kernels' cached output buffers."},
    {"cuda_take_target_error", cuda_take_target_error, METH_NOARGS,
     "The out-of-range class index recorded by the CUDA kernels (or None), cleared."},
    {"cpu_isa", cpu_isa, METH_NOARGS, "The instruction set of the CPU kernels in use."},
    {"cuda_compiled", cuda_compiled, METH_NOARGS, "Whether the CUDA kernels were built."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "softmax_ce compiled kernels", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
