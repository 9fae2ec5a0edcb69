# Installs the build tree BUILD_DIR into a fresh PREFIX and checks the package files are there.
file(REMOVE_RECURSE "${PREFIX}")
execute_process(COMMAND "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${PREFIX}"
                RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "cmake --install failed (${rc})")
endif()
foreach(f share/cmake/mla/mlaConfig.cmake share/cmake/mla/mlaConfigVersion.cmake
          share/cmake/mla/mlaTargets.cmake share/cmake/mla/mlaIoTargets.cmake include/mla/mla.hpp
          include/mla/fp8.hpp
          include/mla/detail/bit_cast.hpp)
  if(NOT EXISTS "${PREFIX}/${f}")
    message(FATAL_ERROR "install is missing ${f}")
  endif()
endforeach()
# The installed config is plain CMake: no configure-time leftovers such as if(ON).
file(READ "${PREFIX}/share/cmake/mla/mlaConfig.cmake" _config)
if(_config MATCHES "if\\((ON|OFF|TRUE|FALSE)\\)")
  message(FATAL_ERROR "mlaConfig.cmake holds a constant condition")
endif()
