"""Every line auth and dbproxy write is JSON, the gRPC C-core's included; a traced login's log
lines carry the trace id its exported spans carry; traces never land in the log."""

from __future__ import annotations

import json

import pytest

from tests.helpers import Cluster, run_cli

pytestmark = pytest.mark.slow

PASSWORD = "correct horse battery staple 42"
CHATTY = {"GRPC_VERBOSITY": "debug", "GRPC_TRACE": "http_keepalive,connectivity_state"}


def parse_all(path) -> list[dict]:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            out.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"{path.name} line {n} is not JSON: {line[:200]!r}") from None
    return out


def test_every_line_json_and_login_traced(tmp_path):
    c = Cluster(tmp_path)
    spans = {"auth": tmp_path / "auth.spans", "dbproxy": tmp_path / "dbproxy.spans"}
    try:
        tele = lambda svc: {"traces": "console", "traces_output": str(spans[svc])}  # noqa: E731
        auth = c.proc("auth", c.base(telemetry=tele("auth"), auth_service={
            "enabled": True, "cluster_name": "test-cluster", "listen_addr": "127.0.0.1:0",
            "join_listen_addr": "127.0.0.1:0"}))
        auth.extra_env = CHATTY
        auth.start()
        cfg = c.joiner_config("dbproxy", c.token("proxy"))
        cfg["telemetry"] = tele("dbproxy")
        proxy = c.proc("dbproxy", cfg)
        proxy.extra_env = CHATTY
        proxy.start()
        addr = f"127.0.0.1:{proxy.info['public_port']}"
        invite = json.loads(c.cgctl("users", "add", "tracy", "--format=json").stdout)["invite"]
        home = {"CACHEGATE_HOME": str(tmp_path / "home")}
        run_cli("cgate", "login", f"--proxy={addr}", f"--invite={invite}", f"--ca-pin={c.ca_pin}",
                "--password-stdin", input=PASSWORD + "\n", extra_env=home)
        run_cli("cgate", "login", f"--proxy={addr}", "--user=tracy", "--password-stdin",
                input=PASSWORD + "\n", extra_env=home)
        bad = run_cli("cgate", "login", f"--proxy={addr}", "--user=tracy", "--password-stdin",
                      input="wrong\n", extra_env=home, check=False)
        assert bad.returncode == 1
    finally:
        c.stop()

    logs = {name: parse_all(c.procs[name].log) for name in ("auth", "dbproxy")}
    # The C-core did talk, and its lines are records too.
    assert any(r["logger"] == "grpc.core" for r in logs["auth"] + logs["dbproxy"])
    # Span JSON only in the span files, one span per line.
    assert not any("context" in r and "kind" in r for r in logs["auth"])
    exported = [json.loads(line) for svc in spans for line in spans[svc].read_text().splitlines()]
    trace_ids = {s["context"]["trace_id"].removeprefix("0x") for s in exported}
    span_ids = {s["context"]["span_id"].removeprefix("0x") for s in exported}

    logins = [r for r in logs["auth"] if r.get("event") == "user.login"]
    assert [r["success"] for r in logins] == [True, True, False], logins  # invite, password, wrong
    for r in logins:
        assert r["user"] == "tracy" and r["trace_id"] in trace_ids and r["span_id"] in span_ids
        assert PASSWORD not in json.dumps(r)
    assert logins[2]["level"] == "warning" and logins[2]["error"] == "password mismatch"
    # Every line logged within that login's trace, in either service, carries that id.
    tid = logins[0]["trace_id"]
    same = [r for rs in logs.values() for r in rs if r.get("trace_id") == tid]
    assert same and all(r["span_id"] in span_ids for r in same)
    login_spans = [s for s in exported if s["context"]["trace_id"].removeprefix("0x") == tid]
    assert {s["resource"]["attributes"]["service.name"] for s in login_spans} >= {"cachegate-auth",
                                                                                  "cachegate-dbproxy"}
