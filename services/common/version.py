"""The Cachegate version, from the installed package metadata."""

from importlib import metadata

try:
    VERSION = metadata.version("cachegate")
except metadata.PackageNotFoundError:  # running from a source tree without install
    VERSION = "0.1.0"


def major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        return -1
