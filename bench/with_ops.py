"""Run a module (``mxonnx.cli``, ``bench.speed``) with extra onnxruntime custom-op libraries registered in every
session the project opens, so a peer's model (Quark's ``com.amd.quark`` ops) goes through the same eval code.

``mxonnx.session.session_options`` gains one ``register_custom_ops_library`` call per library; nothing else
changes. torch is imported first because Quark's library links against libtorch.

    python bench/with_ops.py LIB.so [LIB2.so ...] -- mxonnx.cli eval MODEL --json
"""

from __future__ import annotations

import functools
import runpy
import sys


def register_extra_libraries(libraries: list[str]) -> None:
    import torch  # noqa: F401  (puts libtorch in the process for libraries built with torch's cpp_extension)

    import mxonnx.session

    plain = mxonnx.session.session_options

    @functools.wraps(plain)
    def with_libraries(*args, **kwargs):
        options = plain(*args, **kwargs)
        for lib in libraries:
            options.register_custom_ops_library(lib)
        return options

    mxonnx.session.session_options = with_libraries


def main() -> None:
    if "--" not in sys.argv:
        sys.exit("usage: with_ops.py LIB [LIB ...] -- MODULE [ARGS ...]")
    split = sys.argv.index("--")
    libraries, (module, *args) = sys.argv[1:split], sys.argv[split + 1 :]
    register_extra_libraries(libraries)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
