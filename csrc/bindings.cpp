// Registers the CPU kernels with the `cascadexml_fast` torch library. The op schemas themselves are defined once,
// in Python (cascadexml_fast/ops/_library.py), so that they exist even when this extension cannot be loaded; here
// we only attach implementations. The module object only holds helpers for info() and for choosing the CPU vector path.
#include <Python.h>
#include <torch/library.h>

#include "cpu/isa.h"
#include "cpu/loss.h"
#include "cpu/optim.h"
#include "cpu/search.h"
#include "cpu/shortlist_score.h"
#include "cpu/vec.h"

TORCH_LIBRARY_IMPL(cascadexml_fast, CPU, m) {
  m.impl("shortlist_score", &cxf::shortlist_score_cpu);
  m.impl("shortlist_score_grad_input", &cxf::shortlist_score_grad_input_cpu);
  m.impl("shortlist_score_grad_weight", &cxf::shortlist_score_grad_weight_cpu);
  m.impl("shortlist_score_grad_weight_rows", &cxf::shortlist_score_grad_weight_rows_cpu);
  m.impl("topk", &cxf::topk_cpu);
  m.impl("block_score", &cxf::block_score_cpu);
  m.impl("cascade_search", &cxf::cascade_search_cpu);
  m.impl("sparse_adamw_step", &cxf::sparse_adamw_step_cpu);
  m.impl("shortlist_bce", &cxf::shortlist_bce_cpu);
  m.impl("sparse_rowwise_adagrad_step", &cxf::sparse_rowwise_adagrad_step_cpu);
  m.impl("sparse_adamw8bit_step", &cxf::sparse_adamw8bit_step_cpu);
}

namespace {

PyObject* py_cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(cxf::isa_name(cxf::active_isa())); }

PyObject* py_compiler(PyObject*, PyObject*) {
#if defined(__clang__)
  return PyUnicode_FromString("clang " __clang_version__);
#elif defined(__GNUC__)
  return PyUnicode_FromString("gcc " __VERSION__);
#else
  return PyUnicode_FromString("unknown");
#endif
}

// Forces the vector path of every CPU kernel (int8 dot included): "avx512_vnni", "avx512_dot", "avx512", "avx2",
// "scalar", or "auto" for the default path. Returns True when set, False when the CPU lacks it; ValueError for a
// name unknown to this build.
PyObject* py_set_cpu_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8AndSize(arg, nullptr);  // in the limited API since 3.10
  if (name == nullptr) return nullptr;
  const int status = cxf::set_cpu_isa(name);
  if (status < 0) {
    PyErr_Format(PyExc_ValueError, "unknown CPU vector path %s (avx512_vnni, avx512_dot, avx512, avx2, scalar, auto)",
                 name);
    return nullptr;
  }
  return PyBool_FromLong(status);
}

PyObject* py_supported_isas(PyObject*, PyObject*) {
  PyObject* out = PyList_New(0);
  if (out == nullptr) return nullptr;
  for (int isa : {cxf::kIsaAvx512Vnni, cxf::kIsaAvx512, cxf::kIsaAvx512Dot, cxf::kIsaAvx2, cxf::kIsaScalar}) {
    if (!cxf::isa_supported(isa)) continue;
    PyObject* name = PyUnicode_FromString(cxf::isa_name(isa));
    if (name == nullptr || PyList_Append(out, name) < 0) {
      Py_XDECREF(name);
      Py_DECREF(out);
      return nullptr;
    }
    Py_DECREF(name);
  }
  return out;
}

PyMethodDef methods[] = {
    {"cpu_isa", py_cpu_isa, METH_NOARGS,
     "The vector path the CPU kernels run: avx512_vnni, avx512_dot, avx512, avx2 or scalar."},
    {"supported_isas", py_supported_isas, METH_NOARGS,
     "The vector paths this CPU and build support, the default (auto) first."},
    {"_set_cpu_isa", py_set_cpu_isa, METH_O,
     "Force the CPU kernels' vector path: avx512_vnni, avx512_dot, avx512, avx2, scalar, auto."},
    {"compiler", py_compiler, METH_NOARGS, "Compiler that built the extension."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "cascadexml_fast CPU kernels", -1, methods};

}  // namespace

extern "C" PyObject* PyInit__C(void) { return PyModule_Create(&module); }
