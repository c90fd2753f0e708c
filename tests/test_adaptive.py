"""The adaptive context controller on scripted chunk traces (no timing: compute is given)."""
import pytest

from modules.adaptive import ChunkReport, ContextController, device_utilization

FRAME = 0.04
CONTEXTS = [(8, 0), (16, 1), (32, 3), (64, 7)]  # chunks of 40, 80, 160, 320 ms
# CPU-like: small chunks cost MORE per second of audio (300, 200, 150, 125 ms per s)
CPU_MS = {(8, 0): 12.0, (16, 1): 16.0, (32, 3): 24.0, (64, 7): 40.0}
# one chunk size, growing left: more left costs a little more
LEFTS = [(8, 3), (16, 3), (32, 3), (64, 3)]
LEFTS_MS = {(8, 3): 20.0, (16, 3): 21.0, (32, 3): 22.0, (64, 3): 24.0}


def controller(contexts=CONTEXTS, compute_ms=CPU_MS, **options):
    return ContextController(contexts, FRAME, compute_ms=compute_ms, **options)


def run(control, steps):
    """Streams ``steps`` of (load, snr_db[, utilization]): each chunk runs under the context the
    controller chose and takes ``load`` x its calibrated compute. Returns the context of every
    chunk after the first, and checks that a reason comes exactly with a change."""
    context, seconds, contexts = control.first_context(), 0.0, []
    for load, snr, *utilization in steps:
        seconds += (context[1] + 1) * FRAME
        report = ChunkReport(context, (context[1] + 1) * FRAME,
                             control.compute_ms[context] * load / 1000,
                             seconds, snr, *utilization)
        decision = control.next_context(report)
        assert (decision.reason is None) == (decision.context == context), decision
        context = decision.context
        contexts.append(context)
    assert all(s["reason"] for s in control.switches)
    return contexts


def test_latency_budget_takes_the_most_accurate_context_that_fits():
    # latencies 52, 96, 184, 360 ms
    assert controller(policies=["latency"], latency_budget_ms=200).first_context() == (32, 3)
    assert controller(policies=["latency"], latency_budget_ms=400).first_context() == (64, 7)
    ranked = controller(policies=["latency"], latency_budget_ms=400,
                        accuracy_rank=[(16, 1), (64, 7), (32, 3), (8, 0)])
    assert ranked.first_context() == (16, 1)
    # without the load policy the load factor stays 1: a slow chunk changes nothing
    latency_only = controller(policies=["latency"], latency_budget_ms=200)
    assert run(latency_only, [(5.0, None)] * 3) == [(32, 3)] * 3
    assert latency_only.load_factor == 1


def test_latency_budget_says_when_nothing_fits():
    control = controller(policies="latency", latency_budget_ms=30)
    assert control.first_context() == (8, 0)  # the lowest latency, 52 ms
    reason = control.switches[0]["reason"]
    assert reason.startswith("nothing fits: latency: [8, 0] predicted 40 + 12.0 ms = 52 ms > 30 ms")
    assert "lowest latency" in reason


def test_load_moves_at_once_and_comes_back_after_the_hysteresis():
    control = controller(policies=["latency", "load"], latency_budget_ms=200, upgrade_after=5,
                         load_smoothing=0.5)
    trace = [(1.0, None)] * 2 + [(3.0, None)] * 4 + [(1.0, None)] * 10
    contexts = run(control, trace)
    # load x2 after the first slow chunk: [32, 3] needs 160 + 48 = 208 ms > 200: out at once
    assert contexts[:2] == [(32, 3)] * 2 and contexts[2] == (16, 1)
    moved = control.switches[1]
    assert moved["reason"].startswith("latency: [32, 3] predicted 160 + 48.0 ms = 208 ms > 200 ms")
    assert moved["to"] == (16, 1) and "-> [16, 1]" in moved["reason"]
    # load 2.875 -> 1.94, 1.47 (fits again from here), 1.23, 1.12, 1.06, 1.03: back at the 5th
    assert contexts[2:11] == [(16, 1)] * 9 and contexts[11:] == [(32, 3)] * 5
    back = control.switches[2]
    assert back["reason"] == ("most accurate that fits: [32, 3] (latency 185 <= 200 ms, compute "
                              "24.7 <= 0.7 x 160 ms at load x1.03); held 5 chunks")
    assert len(control.switches) == 3


def test_load_uses_measured_cost_not_context_size():
    # the most accurate context is a small one; on this CPU small chunks cost more per second
    control = controller(policies=["load"], load_smoothing=1.0,
                         accuracy_rank=[(16, 1), (32, 3), (64, 7), (8, 0)])
    contexts = run(control, [(3.0, None), (4.0, None), (10.0, None)])
    assert contexts[0] == (16, 1)  # x3: 48 ms <= 0.7 x 80 ms
    # x4: 64 ms > 56 ms: it moves to a LONGER chunk, which fits (96 <= 112 ms)
    assert contexts[1] == (32, 3)
    assert control.switches[1]["reason"] == ("load: [16, 1] predicted 64.0 ms > 0.7 x 80 ms "
                                             "chunk (load x4.00) -> [32, 3]")
    # x10: nothing fits; the cheapest per second of audio is the longest chunk, not [8, 0]
    assert contexts[2] == (64, 7)
    assert "nothing fits" in control.switches[2]["reason"]
    assert "cheapest per second of audio" in control.switches[2]["reason"]


def test_busy_device_holds_back_costlier_upgrades():
    control = controller(LEFTS, LEFTS_MS, policies=["snr"], upgrade_after=2)
    busy = run(control, [(1.0, 5.0, 0.95)] * 4)
    assert busy == [(8, 3)] * 4
    assert run(control, [(1.0, 5.0, 0.95)] * 2 + [(1.0, 5.0, 0.5)] * 2)[-1] == (64, 3)


def test_snr_buys_left_context_and_hysteresis_stops_flapping():
    control = controller(LEFTS, LEFTS_MS, policies=["snr"], upgrade_after=3)
    assert control.first_context() == (8, 3)  # SNR unknown: the cheapest
    clean, noisy = [(1.0, 25.0)] * 3, [(1.0, 7.0)] * 4
    hover_10 = [(1.0, snr) for snr in (9.0, 11.0, 9.5, 12.5, 8.0, 12.9)]  # recovery needs 13
    middle = [(1.0, 15.0)]
    hover_20 = [(1.0, snr) for snr in (19.0, 21.0, 18.0, 22.9)]  # recovery needs 23
    contexts = run(control, clean + noisy + hover_10 + middle + hover_20 + clean)
    assert contexts[:5] == [(8, 3)] * 5  # clean, then the upgrade held for 3 chunks
    assert contexts[5:13] == [(64, 3)] * 8  # noisy, and no flapping around 10 dB
    assert contexts[13:18] == [(32, 3)] * 5  # 15 dB: the middle left at once (cheaper), and
    assert contexts[18:] == [(8, 3)] * 3  # no flapping around 20 dB; clean: the cheapest at once
    reasons = [s["reason"] for s in control.switches[1:]]
    assert reasons[0].startswith("snr: 7.0 dB < 10 dB, needs left >= 64: cheapest such [64, 3]")
    assert reasons[0].endswith("held 3 chunks")
    assert reasons[1].startswith("snr: 15.0 dB < 20 dB, needs left >= 32")
    assert reasons[2].startswith("snr: 25.0 dB >= 20 dB, no left needed")
    assert len(reasons) == 3


def test_snr_hovering_at_the_first_threshold_switches_once():
    control = controller(LEFTS, LEFTS_MS, policies=["snr"], upgrade_after=3)
    contexts = run(control, [(1.0, snr) for snr in (21.0, 19.0, 21.0, 19.5, 22.0, 18.0, 22.5)])
    assert contexts == [(8, 3)] * 3 + [(32, 3)] * 4
    assert len(control.switches) == 2


def test_an_upgrade_needs_consecutive_chunks():
    control = controller(LEFTS, LEFTS_MS, policies=["snr"], upgrade_after=3)
    assert run(control, [(1.0, snr) for snr in (5.0, 25.0) * 4]) == [(8, 3)] * 8
    assert run(control, [(1.0, 25.0)] + [(1.0, 5.0)] * 3)[-1] == (64, 3)


def test_snr_takes_the_cheapest_context_with_enough_left():
    # clean audio runs the cheapest per second of audio, the longest chunk here
    assert controller(policies=["snr"]).first_context() == (64, 7)
    levels = [(20.0, 16), (10.0, 32)]
    control = controller(LEFTS, LEFTS_MS, policies=["snr"], snr_levels=levels, upgrade_after=1)
    assert run(control, [(1.0, 15.0), (1.0, 5.0)]) == [(16, 3), (32, 3)]


def test_combined_policies():
    contexts = [(8, 1), (64, 1), (8, 3), (64, 3)]
    compute = {(8, 1): 16.0, (64, 1): 20.0, (8, 3): 24.0, (64, 3): 30.0}  # 200, 250, 150, 188 /s
    control = controller(contexts, compute, policies=["latency", "snr", "load"],
                         latency_budget_ms=200, load_smoothing=1.0, upgrade_after=2)
    trace = [(1.0, 25.0)] * 2 + [(1.0, 5.0)] * 3 + [(1.5, 5.0)] * 2 + [(1.0, 5.0)] * 3 \
        + [(1.0, 25.0)] * 2 + [(2.5, 25.0), (8.0, 25.0)]
    chosen = run(control, trace)
    assert chosen[:3] == [(8, 3)] * 3  # clean: the cheapest per second; noisy: held 2 chunks
    assert chosen[3:5] == [(64, 3)] * 2  # noisy: left 64, the cheaper of the two
    # load x1.5: [64, 3] needs 160 + 45 = 205 ms > 200 ms: at once to [64, 1], still left 64
    assert chosen[5] == (64, 1)
    assert control.switches[2]["reason"] == ("latency: [64, 3] predicted 160 + 45.0 ms = 205 ms "
                                             "> 200 ms budget -> [64, 1]")
    assert chosen[6:10] == [(64, 1), (64, 1), (64, 3), (64, 3)]  # back after the hold
    assert chosen[10:12] == [(8, 3)] * 2  # clean: the cheapest at once
    # x2.5, clean: [8, 3] needs 160 + 60 = 220 ms: the cheapest that fits, [8, 1], at once
    assert chosen[12] == (8, 1)
    assert control.switches[-2]["reason"].startswith("latency: [8, 3] predicted 160 + 60.0 ms")
    # x8: nothing fits the budget nor the headroom: the cheapest per second of audio
    assert chosen[13] == (8, 3)
    assert control.switches[-1]["reason"].startswith(
        "latency: [8, 1] predicted 80 + 128.0 ms = 208 ms > 200 ms budget; load: [8, 1] "
        "predicted 128.0 ms > 0.7 x 80 ms chunk (load x8.00) -> nothing fits: latency: [8, 3]")
    assert control.switches[-1]["reason"].endswith("running the cheapest per second of audio")
    assert [s["to"] for s in control.switches] == [(8, 3), (64, 3), (64, 1), (64, 3), (8, 3),
                                                   (8, 1), (8, 3)]


def test_device_utilization_is_optional(monkeypatch):
    assert device_utilization("cpu") is None
    monkeypatch.setitem(__import__("sys").modules, "pynvml", None)  # not installed
    assert device_utilization("cuda") is None


@pytest.mark.parametrize("options, message", [
    (dict(contexts=[]), "contexts is empty"),
    (dict(contexts=[(8, 0), (8, 0)]), "duplicates"),
    (dict(contexts=[(-1, 0)]), "unlimited"),
    (dict(compute_ms={(8, 0): 1.0}), r"compute_ms has no calibrated compute for \[\[16, 1\]"),
    (dict(compute_ms={**CPU_MS, (8, 0): 0.0}), r"compute_ms\[\[8, 0\]\] must be"),
    (dict(policies=["latency", "speed"], latency_budget_ms=300), r"unknown policies \['speed'\]"),
    (dict(policies=[]), "policies is empty"),
    (dict(policies=["latency"]), "'latency' policy needs latency_budget_ms"),
    (dict(policies=["load"], latency_budget_ms=300), "used only by the 'latency' policy"),
    (dict(policies=["latency"], latency_budget_ms=-5), "latency_budget_ms must be"),
    (dict(snr_levels=[(10.0, 32), (20.0, 64)]), "snr_levels"),
    (dict(snr_levels=[(20.0, 64), (10.0, 32)]), "snr_levels"),
    (dict(snr_levels=[(20.0, 128)]), "snr_levels"),
    (dict(snr_levels=[(float("nan"), 16)]), "snr_levels"),
    (dict(snr_levels=[20.0]), "snr_levels"),
    (dict(policies=["load"], snr_levels=[(20.0, 16)]), "used only by the 'snr' policy"),
    (dict(snr_hysteresis_db=-1.0), "snr_hysteresis_db"),
    (dict(headroom=1.5), "headroom must be in"),
    (dict(load_smoothing=0), "load_smoothing must be"),
    (dict(upgrade_after=0), "upgrade_after"),
    (dict(accuracy_rank=[(8, 0), (16, 1)]), "accuracy_rank"),
])
def test_bad_arguments_are_clear(options, message):
    options = {"policies": ["snr"], **options}
    with pytest.raises(ValueError, match=message):
        controller(**options)


def test_bad_reports_are_clear():
    control = controller(policies=["load"])
    control.first_context()
    with pytest.raises(ValueError, match=r"context \[4, 0\] is not one of"):
        control.next_context(ChunkReport((4, 0), 0.04, 0.01, 0.04, None))
    with pytest.raises(ValueError, match="compute_seconds"):
        control.next_context(ChunkReport((8, 0), 0.04, -1.0, 0.04, None))
    with pytest.raises(ValueError, match="utilization"):
        control.next_context(ChunkReport((8, 0), 0.04, 0.01, 0.04, None, 50.0))
