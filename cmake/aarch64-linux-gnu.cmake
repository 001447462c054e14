# Cross build for aarch64 Linux with Debian's cross gcc, tests run under
# qemu-user (make test-neon):
#   apt-get install gcc-aarch64-linux-gnu qemu-user
#   cmake -S . -B build-neon -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake
#   cmake --build build-neon -j2 && ctest --test-dir build-neon
# ctest prefixes every test command that names a target with
# CMAKE_CROSSCOMPILING_EMULATOR; -L points qemu at the aarch64 sysroot
# (dynamic loader, libc, libgomp).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(ATTN_CROSS_PREFIX aarch64-linux-gnu CACHE STRING "Prefix of the cross tools")
set(ATTN_CROSS_SYSROOT /usr/${ATTN_CROSS_PREFIX} CACHE PATH "Target root (qemu -L)")

set(CMAKE_C_COMPILER ${ATTN_CROSS_PREFIX}-gcc)
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64 -L ${ATTN_CROSS_SYSROOT})

# Libraries and headers from the target root only; programs from the host.
set(CMAKE_FIND_ROOT_PATH ${ATTN_CROSS_SYSROOT})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
