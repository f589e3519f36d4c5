"""Settings, resolved in one place: defaults < config file < STM_LIVE_* environment < CLI flags.

Every setting, its type and its default live in the models below; `config.toml` at the
repository root lists the same defaults for users to copy (a test keeps the two equal).
Unknown keys anywhere are an error, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from stm_live.plans import parse_plan

if TYPE_CHECKING:
    from stm_live.engines.runners import RunnerOptions

ENV_PREFIX = "STM_LIVE_"
ENV_CONFIG_FILE = "STM_LIVE_CONFIG"


T = TypeVar("T")


class ConfigError(ValueError):
    """A setting is unknown, of the wrong type or out of range."""


def _valid_plan(value: str) -> str:
    parse_plan(value)
    return value


PlanText = Annotated[str, AfterValidator(_valid_plan)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class DaemonSettings(_Section):
    input: str = Field("tcp://127.0.0.1:5550", description="endpoint the daemon connects to for instrument lines")
    output: str = Field("tcp://127.0.0.1:5551", description="endpoint the daemon binds to publish frames and status")
    record_dir: str = Field("recordings", description="directory for raw-line journals and per-scan HDF5 files")
    export_hdf5: bool = Field(True, description="write <uid>.h5 from each finished scan's journal")
    engine: str = Field("classical", description="classical, model, linear, biharmonic; 'none' publishes raw frames only")
    engine_backend: str = Field("auto", description="for the model: auto, tensorrt, torch-cuda, onnxruntime or torch-cpu")
    engine_threads: int = Field(1, ge=1, description="CPU threads a learned engine may use (ingest keeps the rest)")
    engine_half: bool = Field(False, description="half precision on CUDA backends (tensorrt, torch-cuda)")
    engine_cuda_graphs: bool = Field(True, description="torch-cuda: capture each batch shape as a CUDA graph")
    tensorrt_batch: list[int] = Field([1, 8, 32], min_length=3, max_length=3,
                                      description="TensorRT profile: min, opt, max batch")
    tensorrt_size_px: list[int] = Field([32, 256, 1024], min_length=3, max_length=3,
                                        description="TensorRT profile: min, opt, max frame side (frames beyond it "
                                                    "use the next backend)")
    engine_cache_dir: str = Field("~/.cache/stm-live", description="built TensorRT engines and timing caches")
    engine_fallback: str = Field("classical", description="engine that takes a batch the first one failed or timed "
                                                          "out on; 'none' publishes those frames raw only")
    model_units: list[str] = Field(["m"], description="with engine = model: the channel units the network "
                                   "reconstructs (it was trained on heights); channels in other units (current, "
                                   "frequency shift, ...) get the classical engine")
    engine_timeout_s: float = Field(10.0, gt=0, description="deadline per frame of a batch before the batch goes to "
                                                            "the fallback engine")
    reconstruct_every_lines: int = Field(16, ge=0, description="progressive reconstruction cadence; 0 = at scan end only")
    progressive_max_hz: float = Field(60.0, ge=0, description="progressive frames per second per scan direction at "
                                      "most (a display shows no more; matters at video rate); held lines follow "
                                      "within 1/rate s; 0 = no limit")
    preview_max_hz: float = Field(30.0, ge=0, description="frames per second per slot and kind at most on the "
                                  "viewers' `view:` topics (the viewer draws at 30 Hz; the newest frame always "
                                  "follows); 0 = every frame")
    batch_max_frames: int = Field(32, ge=1, le=1024, description="frames per engine call at most (micro-batching)")
    batch_max_delay_us: int = Field(200, ge=0, le=1_000_000, description="when several frames wait but fewer than a "
                                    "full batch, wait this long for more; a lone frame never waits")
    batch_bucket_px: int = Field(64, ge=0, le=4096, description="frame sides are padded up to a multiple of this "
                                 "before the engine (few shapes for compiled engines); 0 = exact sizes")
    heartbeat_interval_s: float = Field(1.0, gt=0)
    status_interval_s: float = Field(1.0, gt=0)
    max_active_scans: int = Field(64, ge=1, description="open scans kept; beyond this the least recently fed is aborted")
    drain_max_messages: int = Field(2000, ge=1, description="messages handled per wake-up before housekeeping")
    scan_timeout_s: float = Field(120.0, gt=0, description="an open scan that receives no line for this long (its "
                                                           "instrument stopped or died) is closed as aborted")


    @field_validator("tensorrt_batch", "tensorrt_size_px")
    @classmethod
    def _ordered_profile(cls, value: list[int]) -> list[int]:
        if not 1 <= value[0] <= value[1] <= value[2]:
            raise ValueError(f"expected 1 <= min <= opt <= max, got {list(value)}")
        return value

    def runner_options(self) -> RunnerOptions:
        from stm_live.engines.runners import RunnerOptions

        return RunnerOptions(self.engine_threads, self.engine_half, self.engine_cuda_graphs, tuple(self.tensorrt_batch),
                             tuple(self.tensorrt_size_px), self.engine_cache_dir)


class LocalizeSettings(_Section):
    enabled: bool = Field(True, description="publish a localization map (atoms, density, lattice) of every final "
                                            "frame of the listed channels")
    channels: list[str] = Field(["Z", "Topography"], description="height channels to localize")
    directions: list[Literal["forward", "backward"]] = Field(
        ["forward", "backward"], min_length=1,
        description="traces to localize; with both, a third map ('both') holds the atoms of both "
                    "traces with the feedback lag removed")
    samples: int = Field(100, ge=1, le=1000, description="stochastic reconstructions per map on a GPU engine")
    samples_cpu: int = Field(16, ge=1, le=1000, description="stochastic reconstructions per map on the CPU")
    spacing_nm: float = Field(0.0, ge=0, description="atom nearest-neighbour distance; 0 = from the dominant "
                                                     "Fourier period (assumes a close-packed layer)")
    sigma_nm: float = Field(0.0, ge=0, description="Gaussian width of the density map; 0 = spacing / 10")
    min_support: float = Field(0.5, gt=0, le=1, description="fraction of reconstructions that must find an atom")
    max_queued: int = Field(4, ge=1, description="frames waiting for localization; beyond this the oldest is dropped")
    max_duty: float = Field(0.5, gt=0, le=1, description="fraction of the time the localization thread may work")
    molecules: bool = Field(False, description="also detect supramolecules in each frame (a detector trained on "
                                               "simulated supramolecules among other molecules)")
    requests: str = Field("", description="endpoint to bind for crop requests (`stm-live crops`): the molecules "
                                          "of the newest map localized on their own super-resolved crops; "
                                          "empty = off")
    crop_factor: int = Field(4, ge=2, le=8, description="super-resolution factor of a requested crop")
    max_crops: int = Field(8, ge=1, le=64, description="molecules localized per request, the best scored first")


class LimitSettings(_Section):
    max_header_bytes: int = Field(65536, ge=256)
    max_rows: int = Field(8192, ge=1)
    max_cols: int = Field(8192, ge=1)
    max_channels: int = Field(16, ge=1)


class ZmqSettings(_Section):
    input_hwm: int = Field(1_000_000, ge=0, description="input queue bound in messages (0 = unbounded)")
    output_hwm: int = Field(200, ge=0, description="per-subscriber output queue bound in messages: a stalled "
                            "subscriber holds at most this many in the daemon's memory")
    linger_ms: int = Field(1000, ge=0)


class SimSettings(_Section):
    bind: str = "tcp://127.0.0.1:5550"
    frames: int = Field(3, ge=1)
    size: int = Field(256, ge=8, le=8192)
    plan: PlanText = "lines:4"
    line_rate_hz: float = Field(0.0, ge=0, description="rows per second; 0 uses each simulated frame's own line time")
    seed: int = 0
    surface: str = Field("si111_7x7", description="one of the simulator's surfaces (docs/simulator.md)")
    tip: str = Field("good", description="tip scenario: good, blunt, multi, unstable, change, or episode (one tip "
                                         "that degrades over frames and answers conditioning actions)")
    frame_nm: float = Field(20.0, ge=0, description="frame edge length; 0 draws a typical size for the surface")
    artefacts: bool = Field(True, description="drift, creep, misalignment, noise and feedback ringing")
    wait_subscriber_s: float = Field(10.0, ge=0, description="wait this long for subscribers before scanning")
    wait_topics: list[str] = Field(["line"], description="topics that must have a subscriber before scanning")
    degrade_probability: float = Field(0.3, ge=0, le=1, description="episode tip: chance a good tip degrades in a frame")
    pulse_outcomes: list[float] = Field([0.55, 0.15, 0.15, 0.15], min_length=4, max_length=4,
                                        description="episode tip: chances an action restores, blunts, multiplies, "
                                                    "or leaves the tip")


    @field_validator("surface", "tip")
    @classmethod
    def _known_name(cls, value: str, info) -> str:
        from stm_live.sim.scan import SCENARIOS
        from stm_live.sim.surfaces import SURFACES

        options = SURFACES if info.field_name == "surface" else (*SCENARIOS, "episode")
        if value not in options:
            raise ValueError(f"unknown {info.field_name} {value!r}; expected one of {', '.join(options)}")
        return value


class NanonisSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(6501, ge=1, le=65535)
    bind: str = Field("tcp://127.0.0.1:5550", description="endpoint the driver publishes lines on")
    timeout_s: float = Field(5.0, gt=0)
    poll_s: float = Field(0.05, gt=0, description="polling interval where Scan.WaitEndOfLine is missing")
    reconnect_s: float = Field(1.0, gt=0)
    plan: PlanText = "full"
    start_scans: bool = Field(False, description="start scans with the plan's buffer, or only follow the user's")


class ReplaySettings(_Section):
    bind: str = "tcp://127.0.0.1:5550"
    line_rate_hz: float = Field(0.0, ge=0, description="rows per second; 0 uses each file's line time")
    plan: PlanText = "full"


def _valid_action(value: str) -> str:
    from stm_live.drivers.conditioning import parse_action

    parse_action(value)
    return value


class ConditioningSettings(_Section):
    enabled: bool = Field(False, description="let tip-conditioning requests reach the instrument at all")
    dry_run: bool = Field(True, description="log accepted requests without executing them")
    max_bias_v: float = Field(4.0, gt=0, le=10.0)
    max_pulse_width_s: float = Field(0.05, gt=0, le=1.0)
    max_dip_nm: float = Field(1.0, gt=0, le=5.0)
    min_interval_s: float = Field(10.0, ge=0, description="driver: least time between two executed actions")
    endpoint: str = Field("tcp://127.0.0.1:5553", description="action channel: the driver binds, the daemon connects")
    actions: list[Annotated[str, AfterValidator(_valid_action)]] = Field(
        ["bias_pulse bias_v=2.0 width_s=0.01", "bias_pulse bias_v=3.0 width_s=0.02", "dip depth_nm=0.3 bias_v=0.05"],
        min_length=1, description="daemon: actions tried in turn while the tip stays bad")
    max_attempts: int = Field(5, ge=1, description="daemon: actions per degradation before it leaves it to the user")
    recovery_windows: int = Field(8, ge=1, description="daemon: windows after an action before judging recovery")
    request_timeout_s: float = Field(2.0, gt=0)


class SecuritySettings(_Section):
    curve: bool = Field(False, description="CURVE encryption and client allow-list on every socket; required to "
                                           "bind anything but loopback")
    keys_dir: str = Field("keys", description="key pairs from `stm-live keys`; allowed client keys in authorized/")


class TipSettings(_Section):
    enabled: bool = Field(True, description="score every line for tip degradation and publish tip/alert messages")
    channel: str = Field("Z", description="height channel (unit m) the monitor reads")
    hop: int = Field(3, ge=1, description="classify the window every hop rows")
    event_mads: float = Field(8.0, ge=0, description="also classify on a row whose step, disagreement, row "
                              "correlation or spike score lies this many median absolute deviations from the "
                              "window's rows before it (0: only every hop rows)")
    enter: float = Field(0.95, gt=0, lt=1, description="P(degraded) the belief must reach to count against the tip")
    leave: float = Field(0.3, gt=0, lt=1, description="P(degraded) below which a window counts for recovery")
    confirm: int = Field(5, ge=1, description="windows in a row to confirm a degradation")
    clear: int = Field(4, ge=1, description="windows in a row to confirm a recovery")
    smoothing: float = Field(0.1, gt=0, le=1, description="weight of the newest window in the monitor's belief")
    kind_margin: float = Field(0.3, ge=0, le=1, description="lead in belief another kind of degradation needs to "
                               "replace the one named")
    kind_enter: float = Field(0.9, gt=0, le=1, description="belief one kind of degradation alone needs to leave "
                              "good (P(degraded) needs enter)")
    max_queued_lines: int = Field(4096, ge=16, description="lines waiting for the monitor; beyond, lines skip it")


class DemoSettings(_Section):
    frames: int = Field(3, ge=1)
    size: int = Field(256, ge=16, le=2048)
    plan: PlanText = "lines:4"
    line_rate_hz: float = Field(2000.0, gt=0)
    seed: int = 1
    tip: str = Field("good", description="simulated tip scenario: good, blunt, multi, unstable or change")
    view: Literal["auto", "window", "snapshots", "off"] = Field(
        "auto", description="viewer: a window with a display, PNG snapshots without one (auto), or none")
    snapshot_dir: str = Field("demo-view", description="where headless viewer snapshots go")
    snapshot_every_s: float = Field(3.0, gt=0)

    @field_validator("tip")
    @classmethod
    def _known_scenario(cls, value: str) -> str:
        from stm_live.sim.scan import SCENARIOS

        if value not in SCENARIOS:
            raise ValueError(f"unknown tip scenario {value!r}; expected one of {', '.join(SCENARIOS)}")
        return value


class Settings(_Section):
    daemon: DaemonSettings = DaemonSettings()
    limits: LimitSettings = LimitSettings()
    zmq: ZmqSettings = ZmqSettings()
    sim: SimSettings = SimSettings()
    nanonis: NanonisSettings = NanonisSettings()
    replay: ReplaySettings = ReplaySettings()
    security: SecuritySettings = SecuritySettings()
    tip: TipSettings = TipSettings()
    localize: LocalizeSettings = LocalizeSettings()
    conditioning: ConditioningSettings = ConditioningSettings()
    demo: DemoSettings = DemoSettings()


def _env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """`STM_LIVE_DAEMON__ENGINE=classical` -> {"daemon": {"engine": "classical"}}; a list is
    written as TOML writes it: `STM_LIVE_LOCALIZE__DIRECTIONS='["forward"]'`."""
    overrides: dict[str, dict[str, Any]] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG_FILE:
            continue
        section, sep, key = name[len(ENV_PREFIX):].lower().partition("__")
        if not sep or not key:
            raise ConfigError(f"environment variable {name}: expected {ENV_PREFIX}SECTION__KEY")
        if value.lstrip().startswith("["):
            try:
                value = tomllib.loads(f"v = {value}")["v"]
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"environment variable {name}: not a list: {exc}") from None
        overrides.setdefault(section, {})[key] = value
    return overrides


def _merge(base: dict[str, Any], layer: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in layer.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(
    path: str | Path | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Resolve settings from all layers; raise ConfigError naming the offending key."""
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = Settings().model_dump()
    path = path or environ.get(ENV_CONFIG_FILE)
    if path:
        try:
            with open(path, "rb") as fh:
                data = _merge(data, tomllib.load(fh))
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path}: {exc}") from exc
    data = _merge(data, _env_overrides(environ))
    if overrides:
        data = _merge(data, {k: {kk: vv for kk, vv in v.items() if vv is not None} for k, v in overrides.items()})
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(problems) from exc


def settings_as_toml(settings: Settings) -> str:
    """Render settings as TOML (used by `stm-live config` and to check config.toml)."""
    lines: list[str] = []
    for section, values in settings.model_dump().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, str):
                lines.append(f'{key} = "{value}"')
            elif isinstance(value, list):
                lines.append(f"{key} = [{', '.join(repr(v).replace(chr(39), chr(34)) for v in value)}]")
            elif isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            else:
                lines.append(f"{key} = {value!r}")
        lines.append("")
    return "\n".join(lines)


def dataclass_from_toml(cls: type[T], path: str | None) -> T:
    """A training configuration (a dataclass) from a TOML file of its fields; defaults without one."""
    if not path:
        return cls()
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    unknown = set(data) - set(cls.__dataclass_fields__)  # type: ignore[attr-defined]
    if unknown:
        raise ConfigError(f"{path}: unknown training settings: {sorted(unknown)}")
    return cls(**data)
