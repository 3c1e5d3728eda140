"""Build a wheel of the code this process runs, so that hosts install exactly this version.

The wheel holds the ``services`` and ``cachegate`` (generated protobuf) packages as they are
on disk, and metadata from ``pyproject.toml`` when running from a source tree, else from the
installed distribution. It is reproducible: the same code gives the same bytes (fixed file
times, sorted entries), so its SHA-256 can be pinned in install.sh.
"""

from __future__ import annotations

import base64
import hashlib
import io
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

PACKAGES = ("services", "cachegate")
EPOCH = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class Wheel:
    name: str
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def _package_dirs() -> dict[str, Path]:
    import cachegate
    import services

    return {"services": Path(services.__file__).resolve().parent,
            "cachegate": Path(cachegate.__file__).resolve().parent}


def _project_metadata(version: str) -> tuple[list[str], str, dict[str, str]]:
    """(requirements, requires-python, console scripts)."""
    pyproject = Path(_package_dirs()["services"]).parent / "pyproject.toml"
    if pyproject.is_file():
        import tomllib

        project = tomllib.loads(pyproject.read_text()).get("project", {})
        if project.get("name") == "cachegate":
            return (list(project.get("dependencies", [])), project.get("requires-python", ""),
                    dict(project.get("scripts", {})))
    dist = metadata.distribution("cachegate")
    reqs = [r for r in (dist.requires or []) if "extra ==" not in r]
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    return reqs, dist.metadata.get("Requires-Python", ""), scripts


def _files() -> list[tuple[str, Path]]:
    out = []
    for pkg, root in _package_dirs().items():
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root)
            if not path.is_file() or "__pycache__" in rel.parts or path.suffix in (".pyc", ".pyo"):
                continue
            out.append((f"{pkg}/{rel.as_posix()}", path))
    return sorted(out)


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(version: str) -> Wheel:
    reqs, requires_python, scripts = _project_metadata(version)
    dist_info = f"cachegate-{version}.dist-info"
    meta = ["Metadata-Version: 2.1", "Name: cachegate", f"Version: {version}",
            "Summary: Secure, audited access to Azure Cache for Redis"]
    if requires_python:
        meta.append(f"Requires-Python: {requires_python}")
    meta += [f"Requires-Dist: {r}" for r in reqs]
    entries: list[tuple[str, bytes]] = [(name, path.read_bytes()) for name, path in _files()]
    entries += [
        (f"{dist_info}/METADATA", ("\n".join(meta) + "\n").encode()),
        (f"{dist_info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: cachegate-proxy\nRoot-Is-Purelib: true\n"
                                b"Tag: py3-none-any\n"),
        (f"{dist_info}/entry_points.txt",
         ("[console_scripts]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(scripts.items()))).encode()),
        (f"{dist_info}/top_level.txt", "".join(p + "\n" for p in PACKAGES).encode()),
    ]
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in entries)
    record += f"{dist_info}/RECORD,,\n"
    entries.append((f"{dist_info}/RECORD", record.encode()))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            info = zipfile.ZipInfo(name, EPOCH)
            info.external_attr = (0o100755 if name.endswith(".sh") else 0o100644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return Wheel(f"cachegate-{version}-py3-none-any.whl", buf.getvalue())
