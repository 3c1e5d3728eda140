"""docs/config.md against the config schema (services/common/config.py): every key of the
schema is documented, every documented key exists, and a documented default is the real one."""

from __future__ import annotations

import re
import typing

from pydantic import BaseModel

from services.common import config as cfgmod
from services.common.durations import parse_duration
from tests.helpers import REPO

DOC = REPO / "docs" / "config.md"


def _model_of(annotation) -> tuple[type[BaseModel] | None, bool]:
    """(model, is_list) of a field: a nested section, a list of entries, or neither."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    if typing.get_origin(annotation) is list:
        (arg,) = typing.get_args(annotation)
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg, True
    return None, False


def schema_keys(model: type[BaseModel] = cfgmod.Config, prefix: str = "") -> dict[str, object]:
    """Every leaf key as a dotted path, with its field. A list of entries (discovery's
    ``azure``, ``static``) is one key whose entry fields are ``key[].field``."""
    out: dict[str, object] = {}
    for name, field in model.model_fields.items():
        path = prefix + name
        sub, is_list = _model_of(field.annotation)
        if sub is None:
            out[path] = field
        elif is_list:
            out[path] = field
            out.update(schema_keys(sub, path + "[]."))
        else:
            out.update(schema_keys(sub, path + "."))
    return out


def doc_rows() -> dict[str, tuple[str, str]]:
    """Documented key -> (default cell, meaning cell), from the tables of docs/config.md. A
    table under "## Top level" has top-level keys; under "## <section>" they are in that
    section. A row naming a list of entries names the entry fields in backticks in its
    meaning."""
    sections = set(cfgmod.Config.model_fields)
    prefix: str | None = None
    rows: dict[str, tuple[str, str]] = {}
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            title = line[3:].strip()
            prefix = "" if title == "Top level" else (title + "." if title in sections else None)
            continue
        if prefix is None or not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        key_cell, default, meaning = cells[0], cells[1], cells[2]
        for key in re.findall(r"`([^`]+)`", key_cell):
            rows[prefix + key] = (default, meaning)
    return rows


def documented_keys() -> set[str]:
    keys = set(doc_rows())
    schema = schema_keys()
    for key, (_, meaning) in doc_rows().items():
        # Entry fields of a list (or fields of a section documented in one row) named in the meaning.
        for sub in [k for k in schema if k.startswith(key + "[].") or k.startswith(key + ".")]:
            if f"`{sub.rsplit('.', 1)[1]}`" in meaning:
                keys.add(sub)
    return keys


def test_every_config_key_is_documented_in_docs_config_md():
    missing = sorted(set(schema_keys()) - documented_keys())
    assert not missing, f"keys of services/common/config.py missing from docs/config.md: {missing}"


def test_docs_config_md_names_no_key_that_does_not_exist():
    schema = set(schema_keys())
    # A row may document a whole section in one line (azure_endpoints: its fields in the meaning).
    sections = {k.rsplit(".", 1)[0] for k in schema if "." in k} | {k.split("[]", 1)[0] for k in schema}
    unknown = sorted(k for k in doc_rows() if k not in schema and k not in sections)
    assert not unknown, f"docs/config.md documents keys the config does not have: {unknown}"


def test_documented_defaults_are_the_schema_defaults():
    schema = schema_keys()
    wrong = []
    for key, (default, _) in doc_rows().items():
        field = schema.get(key)
        literal = re.fullmatch(r"`([^`]*)`", default)
        if field is None or not literal or field.default in (None, "") or field.default_factory is not None:
            continue
        value, real = literal.group(1), field.default
        if isinstance(real, bool):
            ok = value == str(real).lower()
        elif isinstance(real, (int, float)):
            ok = parse_duration(value) == real
        else:
            ok = value == str(real)
        if not ok:
            wrong.append(f"{key}: docs say {value!r}, the schema {real!r}")
    assert not wrong, wrong


def test_the_check_sees_a_key_that_is_not_documented():
    """The check is not vacuous: a section with a key docs/config.md lacks is reported."""

    class Extra(cfgmod._Model):
        made_up_key: int = 1

    class WithExtra(cfgmod.Config):
        made_up_section: Extra = Extra()

    assert "made_up_section.made_up_key" in set(schema_keys(WithExtra)) - documented_keys()
    assert len(doc_rows()) > 60


def test_every_yaml_example_of_docs_config_md_loads():
    """The examples are configs the services accept (no key that does not exist)."""
    import yaml

    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S)
    assert blocks
    for block in blocks:
        cfgmod.load_config(data=yaml.safe_load(block), environ={})
