"""Where the configuration comes from: file search order, WAN_DAEMON_* variables, flags, and what
``config show`` says of each value; the job history on this host's own disk."""

from __future__ import annotations

import json

import pytest

from daemon import cli
from daemon.config import ConfigError
from daemon.config_sources import env_overrides, find_config, load_effective, local_state_dir


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_the_file_is_looked_for_where_operators_look_in_order(tmp_path):
    system = tmp_path / "etc" / "wan-daemon" / "config.yaml"
    user = tmp_path / "xdg" / "wan-daemon" / "config.yaml"
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path / "home")}
    assert find_config(None, env, system_config=system) == (None, "none found")
    write(user, "{}")
    assert find_config(None, env, system_config=system) == (user, "default location")
    write(system, "{}")
    assert find_config(None, env, system_config=system) == (system, "default location")
    named = tmp_path / "named.yaml"
    assert find_config(None, {**env, "WAN_DAEMON_CONFIG": str(named)}, system_config=system)[0] == named
    assert find_config("cli.yaml", {**env, "WAN_DAEMON_CONFIG": str(named)}, system_config=system)[0].name == "cli.yaml"


def test_without_xdg_config_home_the_user_file_is_under_home(tmp_path):
    user = write(tmp_path / "home" / ".config" / "wan-daemon" / "config.yaml", "{}")
    assert find_config(None, {"HOME": str(tmp_path / "home")}, system_config=tmp_path / "none")[0] == user


def test_a_named_file_that_is_missing_is_an_error_not_the_defaults(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_effective(None, None, {"WAN_DAEMON_CONFIG": str(tmp_path / "missing.yaml")})


def test_environment_variables_override_the_file_and_flags_override_both(tmp_path):
    config = write(tmp_path / "c.yaml", "worker: {max_attempts: 2, retry_base_seconds: 7}\npaths: {inbox: from-file}\n")
    env = {
        "WAN_DAEMON_WORKER__MAX_ATTEMPTS": "5",
        "WAN_DAEMON_HARDWARE__GPUS": "[0, 2]",
        "WAN_DAEMON_MODELS__AUTO_DOWNLOAD": "false",
        "WAN_DAEMON_PATHS__INBOX": str(tmp_path / "from-env"),
        "XDG_STATE_HOME": str(tmp_path / "state"),
    }
    eff = load_effective(config, {"paths": {"inbox": str(tmp_path / "from-flag")}}, env)
    s = eff.settings
    assert s.worker.max_attempts == 5 and s.worker.retry_base_seconds == 7
    assert s.hardware.gpus == [0, 2] and s.models.auto_download is False
    assert s.paths.inbox == tmp_path / "from-flag"
    origins = {key: origin for key, _, origin in eff.rows()}
    assert origins["worker.max_attempts"] == "env WAN_DAEMON_WORKER__MAX_ATTEMPTS"
    assert origins["worker.retry_base_seconds"] == str(config)
    assert origins["paths.inbox"] == "command line"
    assert origins["worker.retry_cap_seconds"] == "default"
    assert origins["paths.state"] == "default (derived)"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("WAN_DAEMON_WORKR__MAX_ATTEMPTS", "no setting 'workr' in the top level"),
        ("WAN_DAEMON_WORKER__MAX_ATEMPTS", "no setting 'max_atempts' in worker"),
        ("WAN_DAEMON_WORKER__MAX_ATTEMPTS__X", "not a section"),
    ],
)
def test_a_variable_that_names_no_setting_is_refused(name, message):
    with pytest.raises(ConfigError, match=message):
        env_overrides({name: "1"})


def test_a_variable_with_a_bad_value_is_refused_with_the_setting_named():
    with pytest.raises(ConfigError, match="worker.max_attempts"):
        load_effective(None, None, {"WAN_DAEMON_WORKER__MAX_ATTEMPTS": "many"})
    with pytest.raises(ConfigError, match="WAN_DAEMON_HARDWARE__GPUS: not valid JSON"):
        env_overrides({"WAN_DAEMON_HARDWARE__GPUS": "[0,"})


def test_the_history_lives_on_local_disk_even_when_the_inbox_is_on_a_share(tmp_path):
    share = tmp_path / "mnt" / "share"
    env = {"XDG_STATE_HOME": str(tmp_path / "xdg-state"), "HOME": str(tmp_path)}
    s = load_effective(None, {"paths": {"inbox": str(share / "inbox")}, "instance": {"id": "gpu7"}}, env).settings
    assert s.history.path == tmp_path / "xdg-state" / "wan-daemon" / "history" / "gpu7.sqlite"
    assert share not in s.history.path.parents
    assert s.paths.state == share / "inbox" / ".wan-daemon"  # the spool stays with the inbox
    under_systemd = {"STATE_DIRECTORY": str(tmp_path / "var-lib") + ":/elsewhere", **env}
    s = load_effective(None, {"instance": {"id": "gpu7"}}, under_systemd).settings
    assert s.history.path == tmp_path / "var-lib" / "history" / "gpu7.sqlite"
    assert local_state_dir({"HOME": "/home/w"}) == local_state_dir({"HOME": "/home/w", "XDG_STATE_HOME": ""})


def test_config_show_prints_every_setting_with_its_origin(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WAN_DAEMON_WORKER__MAX_ATTEMPTS", "4")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "none"))
    assert cli.main(["config", "show", "--json", "--inbox", str(tmp_path / "in")]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["settings"]["worker.max_attempts"] == {"value": 4, "from": "env WAN_DAEMON_WORKER__MAX_ATTEMPTS"}
    assert doc["settings"]["paths.inbox"]["from"] == "command line"
    assert doc["settings"]["logging.format"] == {"value": "text", "from": "default"}
    assert cli.main(["config", "show", "--inbox", str(tmp_path / "in")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "worker.max_attempts\t4\tenv WAN_DAEMON_WORKER__MAX_ATTEMPTS" in lines  # piped: tab-separated
    monkeypatch.setenv("WAN_DAEMON_NOPE", "1")
    assert cli.main(["config", "show"]) == cli.EXIT_CONFIG
    assert "no setting 'nope'" in capsys.readouterr().err
