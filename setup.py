"""Packaging for lazyiscsi: one console script, runtime dependencies only.

The targetcli plugin (``lazyiscsi_targetcli``, the configshell-fb nodes of ``lazyiscsi shell``)
lives in targetcli-plugin/ and ships in the same distribution, so that ``pip install`` and the
Debian package both make it importable beside targetcli's own modules."""

from setuptools import find_packages, setup

setup(
    name="lazyiscsi",
    version="0.1.0",
    description="iSCSI LUNs that hydrate lazily from a remote source site",
    python_requires=">=3.11",
    packages=[*find_packages(include=["lazyiscsi", "lazyiscsi.*"]), "lazyiscsi_targetcli"],
    package_dir={"lazyiscsi_targetcli": "targetcli-plugin/lazyiscsi_targetcli"},
    install_requires=[
        # lazyiscsi shell; the rest of lazyiscsi runs without it (the CLI says what is missing)
        "configshell-fb>=1.1.28",
        "crc32c>=2.3",
        "gevent>=22.10",
        "jeepney>=0.8",
        "rtslib-fb>=2.1.75",
        "structlog>=22.3",
    ],
    extras_require={
        "test": ["pytest>=7.2", "pytest-timeout>=2.1", "hypothesis>=6.67", "ruff>=0.4",
                 "wheel>=0.38"],  # tests/package/test_wheel.py builds the wheel pip installs
        # bench/vm_workload.py's plots; never needed by lazyiscsi or its tests
        "bench": ["matplotlib>=3.6"],
    },
    entry_points={"console_scripts": ["lazyiscsi = lazyiscsi.cli:main"]},
)
