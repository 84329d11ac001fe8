"""Unit tests of `service.settings.load_settings`: environment, flags, and refusals naming the key."""

from __future__ import annotations

import pytest

from service.settings import Settings, SettingsError, load_settings


def test_defaults_with_empty_environment():
    s = load_settings({}, {})
    assert s == Settings()
    assert (s.host, s.port, s.data_dir, s.slots, s.gpus) == ("127.0.0.1", 8080, "./data", None, None)
    assert (s.runtime, s.log_level, s.gpus_per_slot) == ("runc", "info", 1)
    assert s.access_log is False


def test_environment_values_are_parsed():
    env = {
        "RATCHET_HOST": "0.0.0.0",
        "RATCHET_PORT": "9000",
        "RATCHET_DATA_DIR": "/var/lib/ratchet",
        "RATCHET_SLOTS": "4",
        "RATCHET_GPUS_PER_SLOT": "2",
        "RATCHET_RUNTIME": "runsc",
        "RATCHET_LOG_BYTES": "8192",
        "RATCHET_LOG_TAIL_BYTES": "0",
        "RATCHET_MAX_WORKSPACE_FILES": "10",
        "RATCHET_INSTANCE": "blue",
        "RATCHET_LOG_LEVEL": "debug",
        "RATCHET_DEFAULT_IMAGE": "me/img:1",
        "RATCHET_ACCESS_LOG": "true",
    }
    s = load_settings({}, env)
    assert s.host == "0.0.0.0"
    assert s.port == 9000
    assert s.data_dir == "/var/lib/ratchet"
    assert s.slots == 4
    assert s.gpus_per_slot == 2
    assert s.runtime == "runsc"
    assert s.log_bytes == 8192
    assert s.log_tail_bytes == 0
    assert s.max_workspace_files == 10
    assert s.instance == "blue"
    assert s.log_level == "debug"
    assert s.default_image == "me/img:1"
    assert s.access_log is True


def test_unrelated_variables_are_ignored():
    s = load_settings({}, {"RATCHET_NOPE": "x", "PORT": "1", "ratchet_port": "2", "HOST": "h"})
    assert s == Settings()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("0,1,2", ["0", "1", "2"]),
        (" 0 , 3 ", ["0", "3"]),
        ("0,,1,", ["0", "1"]),
        ("GPU-1234,GPU-abcd", ["GPU-1234", "GPU-abcd"]),
        ("", []),
        (" , ", []),
    ],
)
def test_gpu_list_parsing(raw, expected):
    assert load_settings({}, {"RATCHET_GPUS": raw}).gpus == expected


def test_flags_win_over_environment():
    env = {"RATCHET_PORT": "9000", "RATCHET_HOST": "0.0.0.0", "RATCHET_GPUS": "0,1"}
    s = load_settings({"port": 7000, "gpus": ["3"]}, env)
    assert s.port == 7000
    assert s.gpus == ["3"]
    assert s.host == "0.0.0.0"


def test_none_flags_do_not_override_environment():
    s = load_settings({"port": None, "slots": None}, {"RATCHET_PORT": "9000", "RATCHET_SLOTS": "3"})
    assert (s.port, s.slots) == (9000, 3)


def test_flags_alone():
    s = load_settings({"port": 1234, "data_dir": "/d", "slots": 2}, {})
    assert (s.port, s.data_dir, s.slots) == (1234, "/d", 2)


def test_process_environment_is_the_default(monkeypatch):
    monkeypatch.setenv("RATCHET_PORT", "8765")
    monkeypatch.setenv("RATCHET_GPUS", "5")
    s = load_settings()
    assert (s.port, s.gpus) == (8765, ["5"])


@pytest.mark.parametrize(
    ("key", "value", "field"),
    [
        ("RATCHET_PORT", "eighty", "port"),
        ("RATCHET_PORT", "70000", "port"),
        ("RATCHET_PORT", "-1", "port"),
        ("RATCHET_SLOTS", "0", "slots"),
        ("RATCHET_SLOTS", "many", "slots"),
        ("RATCHET_GPUS_PER_SLOT", "0", "gpus_per_slot"),
        ("RATCHET_RUNTIME", "kata", "runtime"),
        ("RATCHET_LOG_LEVEL", "verbose", "log_level"),
        ("RATCHET_LOG_BYTES", "100", "log_bytes"),
        ("RATCHET_LOG_TAIL_BYTES", "-5", "log_tail_bytes"),
        ("RATCHET_MAX_BODY_BYTES", "1.5", "max_body_bytes"),
        ("RATCHET_MAX_WORKSPACE_FILES", "0", "max_workspace_files"),
    ],
)
def test_malformed_environment_value_names_the_key(key, value, field):
    with pytest.raises(SettingsError) as info:
        load_settings({}, {key: value})
    msg = str(info.value)
    assert msg.startswith("invalid setting: ")
    assert f"$.{field}`" in msg
    assert "RATCHET_<NAME>" in msg


def test_malformed_flag_names_the_key():
    with pytest.raises(SettingsError, match=r"\$\.port"):
        load_settings({"port": "abc"}, {})


def test_unknown_flag_is_refused():
    with pytest.raises(SettingsError, match="colour"):
        load_settings({"colour": "blue"}, {})


def test_settings_error_is_a_value_error():
    assert issubclass(SettingsError, ValueError)


def test_with_overrides_returns_a_new_settings():
    s = load_settings({}, {})
    t = s.with_overrides(port=1)
    assert (s.port, t.port) == (8080, 1)


def test_fault_handling_settings():
    env = {"RATCHET_ENGINE_RETRIES": "0", "RATCHET_ENGINE_BACKOFF_S": "0.5", "RATCHET_VERIFY_BLOBS": "all"}
    s = load_settings({}, env)
    assert (s.engine_retries, s.engine_backoff_s, s.verify_blobs, s.fault_point) == (0, 0.5, "all", None)
    with pytest.raises(SettingsError, match="verify_blobs"):
        load_settings({}, {"RATCHET_VERIFY_BLOBS": "sometimes"})
    with pytest.raises(SettingsError, match="engine_retries"):
        load_settings({}, {"RATCHET_ENGINE_RETRIES": "-1"})


def test_empty_operator_values_mean_unset(tmp_path):
    """compose passes `${VAR:-}` through as an empty string."""
    env = {"RATCHET_ADMIN_TOKEN": "", "RATCHET_WEBHOOK_URL": " ", "RATCHET_WEBHOOK_SECRET": ""}
    s = load_settings({}, env)
    assert (s.admin_token, s.webhook_url, s.webhook_secret) == (None, None, None)
    assert load_settings({}, {"RATCHET_GPUS": ""}).gpus == []  # an empty list still means no GPUs


def test_admin_token_from_a_file(tmp_path):
    secret = tmp_path / "admin_token"
    secret.write_text("from-a-file-0123456789\n")
    s = load_settings({}, {"RATCHET_ADMIN_TOKEN_FILE": str(secret)})
    assert s.admin_token == "from-a-file-0123456789"
    assert (
        load_settings(
            {}, {"RATCHET_ADMIN_TOKEN_FILE": str(secret), "RATCHET_ADMIN_TOKEN": "x" * 20}
        ).admin_token
        == "x" * 20
    )
    with pytest.raises(SettingsError, match="RATCHET_ADMIN_TOKEN_FILE: cannot read"):
        load_settings({}, {"RATCHET_ADMIN_TOKEN_FILE": str(tmp_path / "missing")})
    secret.write_text("short\n")
    with pytest.raises(SettingsError, match="admin_token"):
        load_settings({}, {"RATCHET_ADMIN_TOKEN_FILE": str(secret)})


def test_webhook_settings_are_checked_at_start():
    from service.http.operations import check_settings, service_webhook

    assert service_webhook(Settings()) is None
    hook = service_webhook(
        Settings(webhook_url="https://hooks.example/x", webhook_events="keep, loop_paused")
    )
    assert hook is not None and [e.value for e in hook.events] == ["keep", "loop_paused"]
    with pytest.raises(SettingsError, match="RATCHET_WEBHOOK_EVENTS: unknown webhook event"):
        check_settings(Settings(webhook_url="https://hooks.example/x", webhook_events="keep,kept"))
    with pytest.raises(SettingsError, match="RATCHET_WEBHOOK_URL"):
        check_settings(Settings(webhook_url="file:///etc/passwd"))
