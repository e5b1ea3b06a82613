// Registers the CPU kernels with the `cascadexml_fast` torch library. The op schemas themselves are defined once,
// in Python (cascadexml_fast/ops/_library.py), so that they exist even when this extension cannot be loaded; here
// we only attach implementations. The module object is empty apart from two introspection helpers for info().
#include <Python.h>
#include <torch/library.h>

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

// The clone the ifunc resolver picks for CXF_MULTIVERSION functions follows the same tests.
const char* cpu_isa() {
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "avx512 (x86-64-v4)";
  if (__builtin_cpu_supports("x86-64-v3")) return "avx2+fma (x86-64-v3)";
  return "baseline (x86-64)";
#else
  return "baseline (not multiversioned on this compiler/architecture)";
#endif
}

PyObject* py_cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(cpu_isa()); }

PyObject* py_compiler(PyObject*, PyObject*) {
#if defined(__clang__)
  return PyUnicode_FromString("clang " __clang_version__);
#elif defined(__GNUC__)
  return PyUnicode_FromString("gcc " __VERSION__);
#else
  return PyUnicode_FromString("unknown");
#endif
}

PyObject* py_int8_dot_isa(PyObject*, PyObject*) { return PyUnicode_FromString(cxf::int8_dot_isa()); }

// Forces the int8 dot-product variant (tests cover every variant the CPU supports); "auto" restores the best.
// Returns True when set, False when the CPU lacks it; ValueError for a name unknown to this build.
PyObject* py_set_int8_dot_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8AndSize(arg, nullptr);  // in the limited API since 3.10
  if (name == nullptr) return nullptr;
  const int status = cxf::set_int8_dot_isa(name);
  if (status < 0) {
    PyErr_Format(PyExc_ValueError, "unknown int8 dot variant %s on this build (avx512, avx2, scalar, auto)", name);
    return nullptr;
  }
  return PyBool_FromLong(status);
}

PyMethodDef methods[] = {
    {"cpu_isa", py_cpu_isa, METH_NOARGS, "Instruction set of the CPU kernel clones chosen at load time."},
    {"int8_dot_isa", py_int8_dot_isa, METH_NOARGS, "The int8-table dot-product variant in use."},
    {"_set_int8_dot_isa", py_set_int8_dot_isa, METH_O, "Force the int8 dot variant (tests): avx512, avx2, scalar, auto."},
    {"compiler", py_compiler, METH_NOARGS, "Compiler that built the extension."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "cascadexml_fast CPU kernels", -1, methods};

}  // namespace

extern "C" PyObject* PyInit__C(void) { return PyModule_Create(&module); }
