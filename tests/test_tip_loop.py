"""The tip monitor in the running daemon, and the conditioning loop over real sockets."""

import threading

import zmq

from stm_live.drivers.conditioning import ConditioningGate, ConditioningLimits
from stm_live.protocol import ActionReport, TipAlert, TipReport
from stm_live.sim.instrument import SimInstrument
from stm_live.tip.classifier import WINDOW_ROWS

from conftest import Harness
from stm_live.demo import free_tcp_endpoint


class Running:
    """A simulator scanning on its own thread until done or stopped."""

    def __init__(self, sim: SimInstrument, frames: int) -> None:
        self.sim, self.stop = sim, threading.Event()
        self.thread = threading.Thread(target=sim.run, args=(frames, 10.0, self.stop.is_set), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(60)
        self.sim.close()


def of(listener, kind):
    return [m for m in listener.messages if isinstance(m, kind)]


def test_daemon_publishes_a_tip_reading_per_window_and_alerts_on_a_change(settings):
    settings.tip.hop = 4
    context = zmq.Context()
    h = Harness(settings, context, with_publisher=False).start()
    sim = SimInstrument(settings.daemon.input, size=128, plan="full", line_rate_hz=1500, seed=3, tip="change",
                        surface="si111_7x7", frame_nm=12.0, context=context)
    change_row = sim.frame(0).spec.scenario.segments[1].start
    running = Running(sim, 1)
    try:
        running.thread.join(60)
        h.listener.pump(1.0)
        readings = of(h.listener, TipReport)
        classified = [r.rows_classified for r in readings]
        assert set(range(WINDOW_ROWS, 129, 4)) <= set(classified) and classified == sorted(set(classified))
        alerts = of(h.listener, TipAlert)
        assert alerts, "no alert after the tip change"
        # the change's first rows stand out and are read at once, not at the next scheduled window
        assert alerts[0].previous == "good" and alerts[0].state == "changed"
        assert change_row <= alerts[0].row <= change_row + 1
        status = h.status_after(lambda s: s.counters.get("tip_windows", 0) == len(readings))
        assert status.counters["tip_alerts"] == len(alerts)
    finally:
        running.close()
        h.stop()
        context.destroy(linger=0)


def conditioning_setup(settings, driver_max_bias_v: float):
    settings.tip.hop = 2
    settings.conditioning.enabled = True
    settings.conditioning.min_interval_s = 0.0
    settings.conditioning.recovery_windows = 8
    settings.conditioning.actions = ["bias_pulse bias_v=3.0 width_s=0.01"]
    settings.conditioning.endpoint = free_tcp_endpoint()
    # The simulator answers actions from a thread of this test process, beside the daemon; the
    # localization thread's numerical work would compete with it for the GIL, which a separate
    # instrument process never does.
    settings.localize.enabled = False
    gate = ConditioningGate(ConditioningLimits(max_bias_v=driver_max_bias_v, min_interval_s=0.0, dry_run=False))
    return gate


def episode_sim(settings, context, gate, **kw) -> SimInstrument:
    """A simulated instrument whose one tip degrades in the first frame and answers actions."""
    return SimInstrument(settings.daemon.input, size=128, plan="full", line_rate_hz=300, seed=11, tip="episode",
                         surface="si111_7x7", frame_nm=12.0, context=context, actions=settings.conditioning.endpoint,
                         gate=gate, degrade_probability=1.0, **kw)


def test_alert_asks_the_instrument_to_condition_and_the_recovery_is_reported(settings):
    gate = conditioning_setup(settings, driver_max_bias_v=4.0)
    context = zmq.Context()
    h = Harness(settings, context, with_publisher=False).start()
    running = Running(episode_sim(settings, context, gate, pulse_outcomes=(1.0, 0.0, 0.0, 0.0)), 40)  # stopped when done
    sim = running.sim
    try:
        h.listener.until(lambda ms: any(isinstance(m, ActionReport) and m.outcome == "recovered" for m in ms),
                         timeout=60, what="a recovered tip")
        outcomes = [m.outcome for m in of(h.listener, ActionReport)]
        assert outcomes[:2] == ["requested", "executed"]
        assert sim.conditioned[0]["outcome"] == "restored" and sim.conditioned[0]["before"] in ("blunt", "multi")
        assert gate.log[0]["origin"] == "stm-live tip monitor"
    finally:
        running.close()
        h.stop()
        context.destroy(linger=0)


def test_the_instrument_refuses_actions_beyond_its_own_limits(settings):
    gate = conditioning_setup(settings, driver_max_bias_v=2.0)
    context = zmq.Context()
    h = Harness(settings, context, with_publisher=False).start()
    running = Running(episode_sim(settings, context, gate), 6)
    sim = running.sim
    try:
        h.listener.until(lambda ms: any(isinstance(m, ActionReport) and m.outcome == "refused" for m in ms),
                         timeout=60, what="a refused action")
        refused = [m for m in of(h.listener, ActionReport) if m.outcome == "refused"][0]
        assert "exceeds the limit" in refused.detail and sim.conditioned == []
    finally:
        running.close()
        h.stop()
        context.destroy(linger=0)
