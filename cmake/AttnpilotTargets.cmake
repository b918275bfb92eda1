# Helpers that give every target the same flags, the shared LibTorch precompiled header
# and the folder label for CTest.

# attnpilot_library(<folder> SOURCES ... DEPS ...): library target attnpilot_<folder>.
function(attnpilot_library folder)
  cmake_parse_arguments(ARG "" "" "SOURCES;DEPS;CUDA_SOURCES" ${ARGN})
  set(_name attnpilot_${folder})
  set(_srcs ${ARG_SOURCES})
  if(ATTNPILOT_CUDA AND ARG_CUDA_SOURCES)
    list(APPEND _srcs ${ARG_CUDA_SOURCES})
  endif()
  add_library(${_name} STATIC ${_srcs})
  attnpilot_unity(${_name})
  if(ARG_CUDA_SOURCES)  # CUDA sources (and their host wrappers) are compiled one by one
    set_source_files_properties(${ARG_CUDA_SOURCES} PROPERTIES SKIP_UNITY_BUILD_INCLUSION ON)
  endif()
  target_include_directories(${_name} PUBLIC ${PROJECT_SOURCE_DIR})
  target_link_libraries(${_name} PUBLIC ${ARG_DEPS})
  attnpilot_compile_options(${_name})
  if(ATTNPILOT_CUDA)
    target_compile_definitions(${_name} PUBLIC ATTNPILOT_WITH_CUDA=1)
    set_target_properties(${_name} PROPERTIES CUDA_SEPARABLE_COMPILATION OFF)
  endif()
  add_library(attnpilot::${folder} ALIAS ${_name})
endfunction()

# attnpilot_unity(<target>): batches the target's C++ sources when ATTNPILOT_UNITY is ON.
function(attnpilot_unity target)
  if(ATTNPILOT_UNITY)
    set_target_properties(${target} PROPERTIES UNITY_BUILD ON UNITY_BUILD_BATCH_SIZE 8)
  endif()
endfunction()

function(attnpilot_compile_options target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wno-unused-parameter -Wno-sign-compare>
    $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr -lineinfo>)
  if(ATTNPILOT_PCH AND NOT target STREQUAL "attnpilot_common")
    target_precompile_headers(${target} REUSE_FROM attnpilot_common)
  endif()
endfunction()

# attnpilot_test(<folder> <name> SOURCES ... DEPS ... [TIMEOUT s]): one GoogleTest
# executable, every test labelled with its folder.
function(attnpilot_test folder name)
  cmake_parse_arguments(ARG "" "TIMEOUT" "SOURCES;DEPS;LABELS" ${ARGN})
  add_executable(${name} ${ARG_SOURCES})
  target_link_libraries(${name} PRIVATE ${ARG_DEPS} GTest::gtest GTest::gtest_main)
  attnpilot_compile_options(${name})
  if(NOT ARG_TIMEOUT)
    set(ARG_TIMEOUT 600)
  endif()
  gtest_discover_tests(${name}
    WORKING_DIRECTORY ${PROJECT_SOURCE_DIR}
    PROPERTIES TIMEOUT ${ARG_TIMEOUT}
    DISCOVERY_TIMEOUT 120)
  # gtest_discover_tests writes every list element of PROPERTIES as a separate value, so
  # list-valued properties (labels, environment) are set by a file CTest reads after the
  # discovered tests, through the <target>_TESTS list that discovery defines.
  set(_props "${CMAKE_CURRENT_BINARY_DIR}/${name}_properties.cmake")
  file(WRITE "${_props}" "if(DEFINED ${name}_TESTS)
  set_tests_properties(\${${name}_TESTS} PROPERTIES
    LABELS \"${folder};${ARG_LABELS}\"
    ENVIRONMENT \"OMP_NUM_THREADS=1;ATTNPILOT_SOURCE_DIR=${PROJECT_SOURCE_DIR};ATTNPILOT_BUILD_DIR=${PROJECT_BINARY_DIR};ATTNPILOT_PYTHON=${ATTNPILOT_PYTHON}\")
endif()
")
  set_property(DIRECTORY APPEND PROPERTY TEST_INCLUDE_FILES "${_props}")
endfunction()
