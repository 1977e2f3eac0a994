# gqsa_prepare_llama_cpp(<dir_var> <commit_var>)
#
# Assembles the patched llama.cpp tree in ${CMAKE_BINARY_DIR}/llama.cpp at configure time by
# running native/fetch_llama_cpp.py (pinned source, overlay native/src, apply
# native/llama.cpp.patch), sets <dir_var> to its path and <commit_var> to the pinned upstream
# commit (short hash).
#
# Where the pristine source comes from is remembered in the cache so that a re-configure started
# by `cmake --build` (without the environment of the first configure) uses the same one:
#   GQSA_LLAMA_CPP_SOURCE  local llama_cpp_python-0.3.36.tar.gz or extracted llama.cpp directory;
#                          empty: download the pinned sdist with pip
#   GQSA_GGUF_CACHE        download/extract cache; empty: ~/.cache/gqsa-gguf
# Both are read from the environment variables of the same name when those are set.
#
# native/src/**, native/llama.cpp.patch and the script are configure dependencies: editing,
# adding or removing any of them makes the next build re-run configure, which rewrites only the
# affected files of the tree, so ninja then recompiles only what changed.

set(GQSA_NATIVE_DIR "${CMAKE_CURRENT_LIST_DIR}/..")
cmake_path(NORMAL_PATH GQSA_NATIVE_DIR)

function(_gqsa_env_cache var doc)
    if(DEFINED ENV{${var}})
        set(${var} "$ENV{${var}}" CACHE STRING "${doc}" FORCE)
    else()
        set(${var} "" CACHE STRING "${doc}")
    endif()
endfunction()

function(gqsa_prepare_llama_cpp dir_var commit_var)
    _gqsa_env_cache(GQSA_LLAMA_CPP_SOURCE
        "llama_cpp_python-0.3.36.tar.gz or extracted llama.cpp tree; empty: download with pip")
    _gqsa_env_cache(GQSA_GGUF_CACHE "download/extract cache; empty: ~/.cache/gqsa-gguf")

    find_package(Python COMPONENTS Interpreter REQUIRED)

    set(script "${GQSA_NATIVE_DIR}/fetch_llama_cpp.py")
    set(tree "${CMAKE_BINARY_DIR}/llama.cpp")
    file(GLOB_RECURSE overlay CONFIGURE_DEPENDS LIST_DIRECTORIES false "${GQSA_NATIVE_DIR}/src/*")
    file(GLOB patch CONFIGURE_DEPENDS "${GQSA_NATIVE_DIR}/llama.cpp.patch")
    set_property(DIRECTORY "${CMAKE_SOURCE_DIR}" APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS
        "${script}" ${overlay} ${patch})

    execute_process(
        COMMAND "${Python_EXECUTABLE}" "${script}"
            --tree "${tree}"
            --source "${GQSA_LLAMA_CPP_SOURCE}"
            --cache-dir "${GQSA_GGUF_CACHE}"
            --native-src "${GQSA_NATIVE_DIR}/src"
            --patch "${GQSA_NATIVE_DIR}/llama.cpp.patch"
        RESULT_VARIABLE rc)
    if(NOT rc EQUAL 0)
        message(FATAL_ERROR "could not prepare the llama.cpp source tree (see the error above); "
                            "native/README.md explains GQSA_LLAMA_CPP_SOURCE and offline builds")
    endif()
    file(READ "${tree}.state.json" state)
    string(JSON commit GET "${state}" commit)
    set(${dir_var} "${tree}" PARENT_SCOPE)
    set(${commit_var} "${commit}" PARENT_SCOPE)
endfunction()
