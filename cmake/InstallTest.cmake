# Installs the build tree into a scratch prefix, then builds and runs a tiny
# consumer with find_package(attn) (shared and static targets) and with
# pkg-config. Run by ctest (label install):
#   cmake -DBUILD_DIR=... -DSOURCE_DIR=tests/consumer -DWORK_DIR=... -DLIBDIR=lib
#         -DC_COMPILER=cc -DCONFIG=Release -P InstallTest.cmake

function(run)
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    string(REPLACE ";" " " cmd "${ARGV}")
    message(FATAL_ERROR "failed (${rc}): ${cmd}\n${out}")
  endif()
  set(last_output "${out}" PARENT_SCOPE)
endfunction()

set(prefix "${WORK_DIR}/prefix")
file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")

message(STATUS "installing into ${prefix}")
if(CONFIG)
  run(${CMAKE_COMMAND} --install "${BUILD_DIR}" --prefix "${prefix}" --config "${CONFIG}")
else()
  run(${CMAKE_COMMAND} --install "${BUILD_DIR}" --prefix "${prefix}")
endif()

foreach(f include/attn.h ${LIBDIR}/libattn.a ${LIBDIR}/cmake/attn/attnConfig.cmake
          ${LIBDIR}/cmake/attn/attnConfigVersion.cmake ${LIBDIR}/pkgconfig/attn.pc bin/attn)
  if(NOT EXISTS "${prefix}/${f}")
    message(FATAL_ERROR "not installed: ${f}")
  endif()
endforeach()

# The installed CLI finds the installed shared library through its RPATH.
run("${prefix}/bin/attn" --version)
message(STATUS "installed attn --version: ${last_output}")

# 1. find_package(attn)
set(cm_build "${WORK_DIR}/cmake-consumer")
run(${CMAKE_COMMAND} -S "${SOURCE_DIR}" -B "${cm_build}"
    "-DCMAKE_PREFIX_PATH=${prefix}" "-DCMAKE_C_COMPILER=${C_COMPILER}"
    -DCMAKE_BUILD_TYPE=Release)
run(${CMAKE_COMMAND} --build "${cm_build}")
foreach(exe consumer_shared consumer_static)
  run("${cm_build}/${exe}")
  message(STATUS "${exe}: ${last_output}")
endforeach()

# 2. pkg-config
find_program(PKG_CONFIG pkg-config pkgconf)
if(NOT PKG_CONFIG)
  message(FATAL_ERROR "pkg-config not found")
endif()
set(ENV{PKG_CONFIG_PATH} "${prefix}/${LIBDIR}/pkgconfig")
run(${PKG_CONFIG} --modversion attn)
message(STATUS "pkg-config --modversion attn: ${last_output}")
run(${PKG_CONFIG} --cflags attn)
string(STRIP "${last_output}" cflags)
run(${PKG_CONFIG} --libs attn)
string(STRIP "${last_output}" libs)
run(${PKG_CONFIG} --static --libs attn)
string(STRIP "${last_output}" static_libs)
separate_arguments(cflags UNIX_COMMAND "${cflags}")
separate_arguments(libs UNIX_COMMAND "${libs}")
separate_arguments(static_libs UNIX_COMMAND "${static_libs}")

set(pc_exe "${WORK_DIR}/pkgconfig-consumer")
run(${C_COMPILER} -std=c11 "${SOURCE_DIR}/main.c" ${cflags} ${libs} -o "${pc_exe}")
set(ENV{LD_LIBRARY_PATH} "${prefix}/${LIBDIR}")
run("${pc_exe}")
message(STATUS "pkg-config consumer (shared): ${last_output}")

# Static through pkg-config: the archive by path, then Libs.private.
list(REMOVE_ITEM static_libs -lattn)
set(pcs_exe "${WORK_DIR}/pkgconfig-consumer-static")
run(${C_COMPILER} -std=c11 "${SOURCE_DIR}/main.c" ${cflags}
    "${prefix}/${LIBDIR}/libattn.a" ${static_libs} -o "${pcs_exe}")
unset(ENV{LD_LIBRARY_PATH})
run("${pcs_exe}")
message(STATUS "pkg-config consumer (static): ${last_output}")

file(REMOVE_RECURSE "${WORK_DIR}")
