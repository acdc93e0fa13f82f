"""The C part of the package: tracer._fastpath, the --trace hot path (issue 15).

Everything else is declared in pyproject.toml.  The extension is optional: where
it cannot be built (no compiler or no Python headers), the install goes on and
dcptrace --trace says on stderr that it runs in pure Python.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tracer._fastpath",
            ["tracer/_fastpath.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wno-missing-field-initializers"],
        )
    ]
)
