"""Only the C extensions live here; everything else about the package is in pyproject.toml."""

from setuptools import Extension, setup

FLAGS = ["-O2", "-Wall", "-Werror=implicit-function-declaration"]

setup(ext_modules=[
    Extension("fsnotifyd.rules._decide", ["fsnotifyd/rules/_decide.c"], extra_compile_args=FLAGS),
    Extension("fsnotifyd.replay._jsonl", ["fsnotifyd/replay/_jsonl.c"], extra_compile_args=FLAGS),
    Extension("fsnotifyd.image._fastio", ["fsnotifyd/image/_fastio.c"], extra_compile_args=FLAGS),
])
