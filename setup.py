"""The one thing pyproject.toml cannot say: the C extension, compiled by cffi from native/.

Everything else (name, version, dependencies, extras, the ``walstore`` command) is PEP 621
metadata in pyproject.toml.
"""

from setuptools import setup

setup(cffi_modules=["native/build_native.py:ffibuilder"])
