"""Credentials and the token without a server (pserver/rpc/security.py): each role needs
only its own certificate, bad tokens are named and never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from pserver import config as cfg
from pserver.rpc import security
from tests.security import OTHER, TOKEN


def test_each_role_needs_only_its_own_certificate(pki: Path) -> None:
    ca = str(pki / "ca.pem")
    trainer = cfg.build({"rpc": {"tls": "tls", "tls_ca": ca}}).rpc  # no server files at all
    assert security.channel_credentials(trainer) is not None
    with pytest.raises(cfg.ConfigError, match="rpc.tls_cert: a pserver needs its certificate "
                       "when rpc.tls is 'tls'"):
        security.server_credentials(trainer)
    with pytest.raises(cfg.ConfigError, match="rpc.tls_client_cert: a client needs a "
                       "certificate when rpc.tls is 'mtls'"):
        security.channel_credentials(cfg.build({"rpc": {"tls": "mtls", "tls_ca": ca}}).rpc)
    client_only = {"tls": "mtls", "tls_ca": ca, "tls_client_cert": str(pki / "client.pem"),
                   "tls_client_key": str(pki / "client.key")}
    assert security.channel_credentials(cfg.build({"rpc": client_only}).rpc) is not None


@pytest.mark.parametrize("text,env,error", [
    ("short", None, "rpc.token_file: the token must have at least 16 characters, it has 5"),
    ("has a space in it ......", None, "rpc.token_file: the token must be printable ASCII"),
    (None, "tab\tin-the-token-value", "PSRT_TOKEN: the token must be printable ASCII"),
    (TOKEN, OTHER, "rpc.token_file: is set and so is the PSRT_TOKEN environment variable"),
])
def test_bad_tokens_are_named_and_never_shown(tmp_path: Path, text: str | None, env: str | None,
                                              error: str) -> None:
    keys = {}
    if text is not None:
        (tmp_path / "t").write_text(text)
        keys["token_file"] = str(tmp_path / "t")
    config = cfg.build({"rpc": keys})
    with pytest.raises(cfg.ConfigError) as e:
        security.token(config.rpc, {} if env is None else {"PSRT_TOKEN": env})
    assert str(e.value).startswith(error), e.value
    assert all(s not in str(e.value) for s in (text, env) if s and len(s) > 5)
    missing = cfg.build({"rpc": {"token_file": str(tmp_path / "nope")}})
    with pytest.raises(cfg.ConfigError, match="rpc.token_file: no such file: .*nope"):
        security.token(missing.rpc, {})
    assert security.token(cfg.build({}).rpc, {"PSRT_TOKEN": f"  {TOKEN}\n"}) == TOKEN
