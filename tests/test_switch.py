"""Switch: set in code beats the environment variable, which beats the default; off() restores; note() says why."""

from mlx_kvpred.switch import Switch


def test_switch_order_and_notes(monkeypatch):
    default = [True]
    s = Switch("KVPRED_TEST_SWITCH", lambda: default[0], "on", "off", "no default")
    monkeypatch.delenv("KVPRED_TEST_SWITCH", raising=False)
    assert s.enabled() and s.note() == "on"
    default[0] = False
    assert not s.enabled() and s.note() == "off (no default)"
    default[0] = True
    monkeypatch.setenv("KVPRED_TEST_SWITCH", "0")
    assert not s.enabled() and s.note() == "off (KVPRED_TEST_SWITCH=0)"
    assert s.set(True) is False and s.enabled()  # set in code wins over the environment
    with s.off():
        assert not s.enabled() and s.note() == "off (switched off in code)"
    assert s.enabled()
    s.set(None)
    assert not s.enabled()
