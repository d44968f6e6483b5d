"""Packaging for lazyiscsi: one console script, runtime dependencies only."""

from setuptools import find_packages, setup

setup(
    name="lazyiscsi",
    version="0.1.0",
    description="iSCSI LUNs that hydrate lazily from a remote source site",
    python_requires=">=3.11",
    packages=find_packages(include=["lazyiscsi", "lazyiscsi.*"]),
    install_requires=[
        "crc32c>=2.3",
        "gevent>=22.10",
        "jeepney>=0.8",
        "rtslib-fb>=2.1.75",
        "structlog>=22.3",
    ],
    extras_require={
        "test": ["pytest>=7.2", "pytest-timeout>=2.1", "hypothesis>=6.67", "ruff>=0.4"],
    },
    entry_points={"console_scripts": ["lazyiscsi = lazyiscsi.cli:main"]},
)
