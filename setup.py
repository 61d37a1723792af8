"""Build and install walstore; the C extension is compiled by cffi (native/build_native.py)."""

from setuptools import find_packages, setup

setup(
    name="walstore",
    version="0.1.0",
    description="A replicated, durable event store on a write-ahead log",
    python_requires=">=3.11",
    packages=find_packages(include=["walstore", "walstore.*"]),
    setup_requires=["cffi>=1.16"],
    cffi_modules=["native/build_native.py:ffibuilder"],
    install_requires=[
        "cffi>=1.16",
        "trio>=0.25",
        "orjson>=3.10",
        "crc32c>=2.4",
        "click>=8.1",
        "prometheus-client>=0.20",
        # etcd3's last release; its generated protobuf modules need the pure-Python
        # protobuf backend with protobuf >= 4 (walstore.election.etcd sets that up).
        "etcd3>=0.12",
        "protobuf>=4",
        "grpcio>=1.60",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-trio>=0.8",
            "hypothesis>=6.100",
            # the oracle our HTTP request parser is checked against (tests/test_http_parser.py)
            "h11>=0.14",
            "ruff>=0.5",
            "mypy>=1.10",
            "kubernetes-validate>=1.30",
            "pyyaml>=6",
            # the fuzz smoke test runs a few seconds of the atheris harness
            "atheris>=2.3",
        ],
        "fuzz": ["atheris>=2.3"],
    },
    entry_points={"console_scripts": ["walstore = walstore.cli:main"]},
    zip_safe=False,
)
