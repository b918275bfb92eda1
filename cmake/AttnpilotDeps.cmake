# Every dependency by find_package, exposed as one imported target each.
# LibTorch: PyPI's torch (its torch.utils.cmake_prefix_path on CMAKE_PREFIX_PATH).
if(NOT DEFINED TORCH_CUDA_ARCH_LIST)
  set(TORCH_CUDA_ARCH_LIST "9.0")
endif()
# PyPI's torch is a CUDA build: its TorchConfig.cmake insists on a CUDA toolkit. On a
# machine without one (a plain Debian 12), import its CPU libraries directly instead; the
# CUDA parts of attnpilot are then off (ATTNPILOT_CUDA needs the toolkit anyway).
find_file(_torch_config TorchConfig.cmake PATH_SUFFIXES Torch NO_CACHE)
set(_torch_manual OFF)
if(_torch_config AND NOT CMAKE_CUDA_COMPILER)
  get_filename_component(_torch_root "${_torch_config}" DIRECTORY)  # .../torch/share/cmake/Torch
  get_filename_component(_torch_root "${_torch_root}/../../.." ABSOLUTE)
  if(EXISTS "${_torch_root}/lib/libtorch_cuda.so")
    set(_torch_manual ON)
  endif()
endif()
if(_torch_manual)
  message(STATUS "LibTorch at ${_torch_root} is a CUDA build and no CUDA toolkit was found: "
                 "importing its CPU libraries directly (CUDA features off)")
  add_library(attnpilot_torch INTERFACE)
  target_include_directories(attnpilot_torch SYSTEM INTERFACE
    "${_torch_root}/include" "${_torch_root}/include/torch/csrc/api/include")
  target_compile_definitions(attnpilot_torch INTERFACE _GLIBCXX_USE_CXX11_ABI=1)
  target_link_libraries(attnpilot_torch INTERFACE
    "${_torch_root}/lib/libtorch_cpu.so" "${_torch_root}/lib/libc10.so")
  # The CUDA libraries that libtorch_cpu.so needs at run time sit in nvidia/ beside torch/.
  string(APPEND CMAKE_EXE_LINKER_FLAGS
         " -Wl,-rpath,${_torch_root}/lib -Wl,-rpath-link,${_torch_root}/lib -Wl,--allow-shlib-undefined")
else()
  find_package(Torch REQUIRED)
  # Torch's CUDA setup turns CMAKE_CUDA_ARCHITECTURES off and appends "-gencode
  # arch=compute_90,code=sm_90" (TORCH_CUDA_ARCH_LIST) to every CUDA compile. The wgmma
  # kernel's object library must get sm_90a alone (attention/CMakeLists.txt), so the flag moves
  # back into CMAKE_CUDA_ARCHITECTURES (the same sm_90 code), which a target can override.
  if(ATTNPILOT_CUDA)
    string(REGEX REPLACE "-gencode[ =]+arch=compute_[0-9a-z]+,code=[][a-z_0-9,]+" ""
           CMAKE_CUDA_FLAGS "${CMAKE_CUDA_FLAGS}")
    set(CMAKE_CUDA_ARCHITECTURES 90-real)
  endif()
  # attnpilot_torch: LibTorch without the thin libtorch.so. PyPI's libtorch.so exports
  # broken copies of std::filesystem functions (remove_all jumps to address 0; seen with
  # torch 2.11.0 on Debian 12 and Ubuntu 24.04); libtorch_cpu.so carries working ones and
  # everything the C++ API needs. libtorch_cuda.so stays linked with --no-as-needed (via
  # torch's own interface) so CUDA registers itself.
  get_target_property(_torch_inc torch INTERFACE_INCLUDE_DIRECTORIES)
  get_target_property(_torch_defs torch INTERFACE_COMPILE_DEFINITIONS)
  get_target_property(_torch_opts torch INTERFACE_COMPILE_OPTIONS)
  get_target_property(_torch_libs torch INTERFACE_LINK_LIBRARIES)
  add_library(attnpilot_torch INTERFACE)
  target_include_directories(attnpilot_torch SYSTEM INTERFACE ${_torch_inc})
  if(_torch_defs)
    target_compile_definitions(attnpilot_torch INTERFACE ${_torch_defs})
  endif()
  if(_torch_opts)
    target_compile_options(attnpilot_torch INTERFACE ${_torch_opts})
  endif()
  target_link_libraries(attnpilot_torch INTERFACE ${_torch_libs})
  foreach(_extra ${TORCH_LIBRARIES})
    if(NOT _extra STREQUAL "torch")
      target_link_libraries(attnpilot_torch INTERFACE ${_extra})
    endif()
  endforeach()
endif()
add_library(attnpilot::torch ALIAS attnpilot_torch)
find_package(Threads REQUIRED)
find_package(Boost 1.74 REQUIRED)
find_package(CLI11 REQUIRED)
find_package(yaml-cpp REQUIRED)
find_package(fmt REQUIRED)
find_package(spdlog REQUIRED)
find_package(nlohmann_json 3.9 REQUIRED)
find_package(SentencePiece REQUIRED)
if(ATTNPILOT_TESTS)
  find_package(GTest REQUIRED)
  include(GoogleTest)
endif()
if(ATTNPILOT_ZMQ)
  find_package(cppzmq REQUIRED)
endif()

# yaml-cpp 0.7 (Debian 12) exports `yaml-cpp`, 0.8 (Ubuntu 24.04) `yaml-cpp::yaml-cpp`.
if(NOT TARGET yaml-cpp::yaml-cpp)
  add_library(yaml-cpp::yaml-cpp INTERFACE IMPORTED)
  target_link_libraries(yaml-cpp::yaml-cpp INTERFACE yaml-cpp)
endif()
if(NOT TARGET CLI11::CLI11)
  add_library(CLI11::CLI11 INTERFACE IMPORTED)
  target_link_libraries(CLI11::CLI11 INTERFACE CLI11)
endif()

find_program(GNUPLOT_EXECUTABLE gnuplot)
if(NOT GNUPLOT_EXECUTABLE)
  message(STATUS "gnuplot not found: plots are skipped with a message at run time")
endif()

# The Python interpreter of the project's virtual environment (transformers, gymnasium,
# pyzmq, ...) used by tests that compare against Python references.
set(ATTNPILOT_PYTHON "" CACHE FILEPATH "Python with the reference packages (the project's venv)")
if(NOT ATTNPILOT_PYTHON)
  find_package(Python3 COMPONENTS Interpreter QUIET)
  if(Python3_FOUND)
    set(ATTNPILOT_PYTHON "${Python3_EXECUTABLE}" CACHE FILEPATH "" FORCE)
  endif()
endif()
