"""speed-bench/devtime.py's timeline sums, on made-up kernel events (name, start ns, end ns)."""

import importlib.util
import pathlib

_PATH = pathlib.Path(__file__).resolve().parents[1] / "speed-bench" / "devtime.py"
_spec = importlib.util.spec_from_file_location("devtime", _PATH)
devtime = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(devtime)


def test_idle_gaps_count_only_stretches_with_nothing_running_anywhere():
    events = [
        ("a", 0, 100),
        ("b", 50, 300),  # overlaps a: no gap before it
        ("c", 400, 500),  # 100 ns with nothing running (b ended at 300)
        ("d", 450, 9_000),
        ("e", 20_000, 20_100),  # 11,000 ns idle: a gap over 5 us
        ("c", 20_300, 20_400),  # c's second gap: 200 ns
    ]
    assert devtime.idle_gaps(events) == {"c": (2, 300, 0), "e": (1, 11_000, 1)}
    busy, alone = devtime.exposed(events)
    assert busy == 300 + 8_600 + 100 + 100  # the union of the running stretches
    assert alone == {"a": 50, "b": 200, "c": 50 + 100, "d": 8_500, "e": 100}
