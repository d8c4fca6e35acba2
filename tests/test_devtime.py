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


def _ab_decode():
    """speed-bench/ab_decode.py as a module (it imports devtime from its own folder)."""
    import sys

    sys.path.insert(0, str(_PATH.parent))
    try:
        spec = importlib.util.spec_from_file_location("ab_decode", _PATH.parent / "ab_decode.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["ab_decode"] = mod  # its dataclasses look their module up there
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(_PATH.parent))
    return mod


def test_kernel_families_and_diffs_compare_two_programs(capsys):
    """``ab_decode --top``: XLA's per-program numbering and a Pallas kernel's copies fold into one
    family, a Pallas kernel's own name stays, and the diff against the first variant is by family
    (by model line where the HLO names one), largest move first, per step."""
    ab = _ab_decode()
    assert ab.family("q8_0_share__6") == ab.family("q8_0_share_") == "q8_0_share"
    assert ab.family("experts_4112_") == "experts_4112" != ab.family("experts_10")
    assert ab.family("loop_slice_fusion_105_remat2") == ab.family("loop_slice_fusion.3") == "loop_slice_fusion"
    assert ab.family("wrapped_concatenate_remat") == "wrapped_concatenate"
    assert ab.family("sort_151_1") == "sort"
    a = ab.by_family({"q8_0_share": (4, 4000), "loop_add_fusion_12": (2, 100), "sort_3": (2, 60)})
    b = ab.by_family({"q8_0_share__1": (4, 6000), "loop_add_fusion.7": (8, 900)})
    assert a["loop_add_fusion"] == (2, 100) and b["loop_add_fusion"] == (8, 900)
    sites = ab.by_site(
        {"input_reduce_fusion.3": (2, 50), "q8_0_share__2": (1, 10)}, {"input_reduce_fusion.3": ("moe.py:29", "")}
    )
    assert sites == {"moe.py:29": (2, 50), "kernel q8_0_share": (1, 10)}
    ab.kernel_diffs({"x": (a, 2), "y": (b, 2)}, 2)
    out = capsys.readouterr().out.splitlines()
    moves = out[out.index("y against x: kernel families a step, largest moves first") + 1 :]
    assert len(moves) == 2
    assert moves[0].split()[:4] == ["+1.0", "us", "+0.0", "launches"] and moves[0].endswith("q8_0_share")
    assert moves[1].split()[:4] == ["+0.4", "us", "+3.0", "launches"] and moves[1].endswith("loop_add_fusion")


def test_cb_log_counts_recordings_updates_and_moved_allocations_by_graph():
    spec = importlib.util.spec_from_file_location("cb_log", _PATH.parent / "cb_log.py")
    cb_log = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cb_log)
    src = "I1203 17:15:58.1 1837 command_buffer_thunk.cc:{}] {}"
    lines = [
        src.format(
            250, "Initialize command buffer on device #0 by recoding command buffer cmd sequence; num_commands=2107"
        ),
        src.format(270, "Initialized command buffer on device #0 in 22008 μs; num_commands=2107"),
        src.format(455, "Evicted 2 command buffer thunk command buffers"),
        "unrelated line num_commands=9",
    ]
    for allocs, us in ((49, 150), (51, 170), (49, 160)):
        lines.append(
            src.format(
                320,
                "Update command buffer on device #0 by recoding command buffer cmd sequence after 1 "
                f"executions since last update; num_commands=67; updated_allocs={allocs}",
            )
        )
        lines.append(src.format(330, f"Updated command buffer in {us} μs; num_commands=67"))
    s = cb_log.summarize(lines)
    assert s["graphs"] == {
        2107: {"init": 1, "init_us": 22008, "update": 0, "update_us": 0},
        67: {"init": 0, "init_us": 0, "update": 3, "update_us": 480},
    }
    assert s["moved"] == {(67, 1, 49): 2, (67, 1, 51): 1}
    assert s["evicted"] == 2
    text = "\n".join(cb_log.report(s))
    assert "     2107         1     22008        0        0" in text and "      67         0" in text
