// spear_kernels._C as a Python module: loading it registers every op (torch.ops.spear_kernels.*, one file per op
// under ops/); the functions here are the few that are not tensor ops.
#include "dispatch.h"
#include "group_index.h"

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <utility>
#include <vector>

namespace spear_kernels {
namespace {

double exp_bound_cpu(int64_t n) {
  TORCH_CHECK(n >= 0, "exp_bound: n must be >= 0");
  return kernels().exp_bound(n);
}

// Python objects (verl's uid strings, or any hashables) -> group numbers, with Python's own
// hash and equality, written into an int64 buffer (a numpy array). The ids are read from a
// snapshot of the list and held by owned references: __hash__ / __eq__ run arbitrary Python code,
// which may mutate or clear the caller's list. A one-element tensor id stands for its value
// (tensors hash by identity), as in the eager reference.
int64_t group_index_objects(const pybind11::list& ids, const pybind11::buffer& out, const pybind11::object& tensor_type) {
  namespace py = pybind11;
  const py::list snapshot = py::reinterpret_steal<py::list>(PyList_GetSlice(ids.ptr(), 0, PY_SSIZE_T_MAX));
  if (!snapshot) throw py::error_already_set();
  const auto n = static_cast<int64_t>(PyList_GET_SIZE(snapshot.ptr()));
  const py::buffer_info info = out.request(/*writable=*/true);
  if (info.ndim != 1 || info.itemsize != 8 || info.size != n || info.format.find_first_of("qlLQ") == std::string::npos) {
    throw py::value_error("out must be a writable int64 buffer with one element per id");
  }
  TORCH_CHECK(PyType_Check(tensor_type.ptr()), "tensor_type must be a type");
  const auto* tensor_cls = reinterpret_cast<PyTypeObject*>(tensor_type.ptr());
  std::vector<py::object> owned;  // values of tensor ids
  std::vector<PyObject*> keys(n);
  for (int64_t i = 0; i < n; ++i) {
    PyObject* o = PyList_GET_ITEM(snapshot.ptr(), i);
    if (PyObject_TypeCheck(o, const_cast<PyTypeObject*>(tensor_cls))) {
      const py::object t = py::reinterpret_borrow<py::object>(o);
      if (t.attr("numel")().cast<int64_t>() != 1) {
        throw py::value_error("a group id that is a tensor must hold one value");
      }
      owned.push_back(t.attr("item")());
      o = owned.back().ptr();
    }
    keys[i] = o;
  }
  auto key_at = [](const void* src, int64_t i) { return static_cast<PyObject* const*>(src)[i]; };
  auto hash = [](PyObject* o) {
    const Py_hash_t h = PyObject_Hash(o);
    if (h == -1) throw py::error_already_set();
    return static_cast<uint64_t>(h);
  };
  auto equal = [](PyObject* a, PyObject* b) {
    if (a == b) return true;
    const int eq = PyObject_RichCompareBool(a, b, Py_EQ);
    if (eq < 0) throw py::error_already_set();
    return eq == 1;
  };
  return assign_groups<PyObject*>(n, +key_at, keys.data(), hash, equal, static_cast<int64_t*>(info.ptr));
}

}  // namespace
}  // namespace spear_kernels

PYBIND11_MODULE(_C, m) {
  m.doc() = "spear_kernels C++ CPU kernels (operators live in torch.ops.spear_kernels)";
  m.def("cpu_capability", [] { return std::string(spear_kernels::kernels().name); },
        "The CPU capability whose kernels this process runs (DEFAULT, AVX2 or AVX512).");
  m.def("policy_loss_modes", [] {
    using spear_kernels::PolicyLossMode;
    return std::vector<std::pair<std::string, int>>{{"vanilla", static_cast<int>(PolicyLossMode::kVanilla)},
                                                    {"clip_cov", static_cast<int>(PolicyLossMode::kClipCov)},
                                                    {"kl_cov", static_cast<int>(PolicyLossMode::kKlCov)},
                                                    {"gpg", static_cast<int>(PolicyLossMode::kGpg)}};
  }, "The C++ policy-loss mode ids by name.");
  m.def("exp_bound", &spear_kernels::exp_bound_cpu, pybind11::arg("n"),
        "Computes n of the kernels' exp2 with no memory traffic (the benchmarks' compute limit).");
  m.def("group_index", &spear_kernels::group_index_objects, pybind11::arg("ids"), pybind11::arg("out"),
        pybind11::arg("tensor_type"),
        "Number the hashables in `ids` by first appearance into the int64 buffer `out`; returns the count.");
  m.def("compiled_capabilities", [] {
    std::vector<std::string> caps{"DEFAULT"};
#ifdef SPEAR_HAVE_AVX2
    caps.emplace_back("AVX2");
#endif
#ifdef SPEAR_HAVE_AVX512
    caps.emplace_back("AVX512");
#endif
    return caps;
  });
}
