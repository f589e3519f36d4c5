"""The fuzzer in small: every decoder meets mutated input and raises only its own error type."""

import pytest

from stm_live.config import ConfigError, load_settings
from stm_live.fuzz import fuzz


def test_a_short_fuzz_run_finds_no_crash(tmp_path):
    targets = ("protocol", "action", "crops", "nanonis", "config")
    result = fuzz(seconds=120.0, seed=1, out_dir=tmp_path / "crashes", targets=targets, inputs=500)
    assert result["crashes"] == 0, result
    for name, target in result["targets"].items():
        assert target["inputs"] == 500 and (target["rejected_cleanly"] > 0 or name == "action"), (name, target)
    assert result["targets"]["action"]["accepted"] == result["targets"]["action"]["inputs"]


def test_a_short_fuzz_run_over_scan_files_finds_no_crash(tmp_path):
    """Apart: a mutated .sm4 takes spym up to 1.4 s, where a message takes microseconds."""
    result = fuzz(seconds=5.0, seed=1, out_dir=tmp_path / "crashes", targets=("scanfile",))
    assert result["crashes"] == 0 and result["targets"]["scanfile"]["inputs"] >= 2, result


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path):
    """Found by `stm-live bench fuzz`: a binary config file raised UnicodeDecodeError."""
    path = tmp_path / "config.toml"
    path.write_bytes(b"[daemon]\n\xff\xfe = 1\n")
    with pytest.raises(ConfigError, match="config file"):
        load_settings(path, environ={})


def test_an_action_that_is_not_a_name_is_refused():
    """Found by `stm-live bench fuzz`: {"action": {...}} raised TypeError in the limit check."""
    from stm_live.drivers.conditioning import ConditioningGate, ConditioningLimits

    gate = ConditioningGate(ConditioningLimits())
    for action in ({"x": 1}, [1], None, 3):
        verdict = gate.check({"action": action, "bias_v": 1.0, "width_s": 0.01}, "fuzz")
        assert not verdict["accepted"] and "unknown action" in verdict["reason"]
