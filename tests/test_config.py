import tomllib
from pathlib import Path

import pytest

from stm_live.config import ConfigError, Settings, load_settings, settings_as_toml

ROOT = Path(__file__).resolve().parents[1]


def test_config_toml_lists_every_setting_with_its_default():
    with open(ROOT / "config.toml", "rb") as fh:
        shipped = tomllib.load(fh)
    assert shipped == Settings().model_dump()
    assert tomllib.loads(settings_as_toml(Settings())) == shipped


def test_layers_file_then_env_then_flags(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[daemon]\nengine = "none"\nreconstruct_every_lines = 4\n[sim]\nsize = 64\n')
    env = {"STM_LIVE_DAEMON__RECONSTRUCT_EVERY_LINES": "32", "STM_LIVE_SIM__PLAN": "sr:2"}
    s = load_settings(cfg, {"sim": {"size": 128, "seed": None}}, environ=env)
    assert s.daemon.engine == "none"
    assert s.daemon.reconstruct_every_lines == 32
    assert s.sim.plan == "sr:2"
    assert s.sim.size == 128
    assert s.sim.seed == 0


@pytest.mark.parametrize("text", ['[daemon]\nengien = "x"\n', '[nosuch]\na = 1\n', '[daemon]\nreconstruct_every_lines = -1\n',
                                  '[sim]\nplan = "lines:0"\n', '[limits]\nmax_rows = "many"\n', "not toml ["])
def test_bad_config_is_refused_with_the_key(tmp_path, text):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError):
        load_settings(cfg, environ={})


def test_env_lists_are_written_as_in_toml():
    s = load_settings(environ={"STM_LIVE_LOCALIZE__DIRECTIONS": '["forward"]',
                               "STM_LIVE_LOCALIZE__CHANNELS": "['Z', 'Height']"})
    assert s.localize.directions == ["forward"] and s.localize.channels == ["Z", "Height"]
    with pytest.raises(ConfigError, match="not a list"):
        load_settings(environ={"STM_LIVE_LOCALIZE__DIRECTIONS": "[forward"})


def test_bad_env_name_is_refused():
    with pytest.raises(ConfigError):
        load_settings(environ={"STM_LIVE_ENGINE": "none"})


def test_tensorrt_profiles_must_be_ordered_and_reach_the_runner():
    from pydantic import ValidationError

    from stm_live.config import DaemonSettings

    with pytest.raises(ValidationError, match="min <= opt <= max"):
        DaemonSettings(tensorrt_batch=[8, 1, 32])
    options = DaemonSettings(tensorrt_size_px=[64, 512, 2048], engine_half=True).runner_options()
    assert options.trt_size_px == (64, 512, 2048) and options.half and options.trt_batch == (1, 8, 32)
