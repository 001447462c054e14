# cmake -DEXPECT=<code> -DCMD=<program;args...> -P ExpectExit.cmake
# Passes when the command exits with exactly EXPECT (a signal never passes).
execute_process(COMMAND ${CMD} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
message(STATUS "exit: ${rc}\nstdout: ${out}\nstderr: ${err}")
if(NOT "${rc}" STREQUAL "${EXPECT}")
  message(FATAL_ERROR "expected exit code ${EXPECT}, got '${rc}'")
endif()
if("${err}" STREQUAL "")
  message(FATAL_ERROR "expected a message on stderr")
endif()
