"""The YAML config: sections, environment overrides, and one-line errors."""

from __future__ import annotations

import pytest

from services.common.config import ConfigError, load_config


def write(tmp_path, text: str):
    p = tmp_path / "cachegate.yaml"
    p.write_text(text)
    return p


def test_a_config_with_one_section_per_service_loads(tmp_path):
    cfg = load_config(write(tmp_path, """
version: v1
data_dir: /var/lib/cachegate
auth_service:
  enabled: true
  cluster_name: prod
dbproxy_service:
  enabled: true
  public_addrs: [proxy.example.com:3080]
"""), environ={})
    assert cfg.auth_service.enabled and cfg.auth_service.cluster_name == "prod"
    assert cfg.dbproxy_service.enabled and not cfg.discovery_service.enabled
    assert str(cfg.data_dir) == "/var/lib/cachegate"


def test_unknown_key_is_an_error_that_names_it(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "auth_service:\n  enabled: true\n  clustr_name: prod\n"), environ={})
    msg = str(err.value)
    assert "auth_service.clustr_name" in msg and "\n" not in msg


def test_environment_overrides_the_file(tmp_path):
    path = write(tmp_path, "auth_service:\n  enabled: true\n  cluster_name: from-file\n")
    cfg = load_config(path, environ={"CACHEGATE_AUTH_SERVICE__CLUSTER_NAME": "from-env",
                                     "CACHEGATE_LOG__LEVEL": "debug"})
    assert cfg.auth_service.cluster_name == "from-env"
    assert cfg.log.level == "debug"


def test_environment_override_of_an_unknown_key_names_the_variable(tmp_path):
    with pytest.raises(ConfigError, match="CACHEGATE_AUTH_SERVICE__NOPE"):
        load_config(write(tmp_path, "auth_service:\n  enabled: true\n"),
                    environ={"CACHEGATE_AUTH_SERVICE__NOPE": "1"})


def test_bad_duration_says_how_to_write_one(tmp_path):
    with pytest.raises(ConfigError, match="30s, 15m"):
        load_config(write(tmp_path, "dbproxy_service:\n  limits:\n    tls_handshake_timeout: soon\n"), environ={})


def test_missing_file_and_bad_yaml_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file .*nope.yaml"):
        load_config(tmp_path / "nope.yaml", environ={})
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "auth_service: [unclosed\n"), environ={})
    assert "\n" not in str(err.value)
