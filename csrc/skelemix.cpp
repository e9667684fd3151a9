// Entry point of skelemix._C: the Python module shell and the build-info op.
//
// _C is imported only to load this shared library, whose static initialisers register the
// torch.ops.skelemix ops. The module itself is empty and created without pybind11, so the extension can be
// built against Python's limited API (one abi3 .so for every CPython). The CMake build
// (SKELEMIX_NO_PYTHON) produces a plain library for torch.ops.load_library instead.
#ifndef SKELEMIX_NO_PYTHON
#include <Python.h>
#endif

#include <torch/library.h>

#include <string>

#ifdef WITH_CUDA
#include <cuda_runtime_api.h>  // CUDART_VERSION of the toolkit that compiled the kernels
#endif

// Set by setup.py and CMakeLists.txt; skelemix._extension compares it with the running torch.
#ifndef SKELEMIX_TORCH_VERSION
#define SKELEMIX_TORCH_VERSION "unknown"
#endif
#ifndef SKELEMIX_CUDA_ARCH_LIST
#define SKELEMIX_CUDA_ARCH_LIST ""
#endif

#ifndef SKELEMIX_NO_PYTHON
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif

namespace skelemix {
namespace {

// "key=value" lines, parsed by skelemix._extension.
std::string build_info() {
  std::string info = std::string("torch=") + SKELEMIX_TORCH_VERSION + "\n";
#ifdef WITH_CUDA
  info += "cuda=1\ncuda_version=" + std::to_string(CUDART_VERSION / 1000) + "." +
          std::to_string(CUDART_VERSION % 1000 / 10) + "\n";
  info += std::string("cuda_arch=") + SKELEMIX_CUDA_ARCH_LIST + "\n";
#else
  info += "cuda=0\n";
#endif
  return info;
}

}  // namespace
}  // namespace skelemix

TORCH_LIBRARY_FRAGMENT(skelemix, m) {
  m.def("_build_info() -> str", &skelemix::build_info);
}
