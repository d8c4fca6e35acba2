"""The bench (ds4-bench's frontier sweep) and its plot: frontiers, the CSV, the tokens it generates
against a fresh generation, its command line and its errors."""

import numpy as np
import pytest
from conftest import CHUNK, CTX, run_cli

from ds4jax.bench import HEADER, check_plan, csv_text, frontiers, live_state_bytes, run_bench
from ds4jax.errors import DS4Error
from ds4jax.sampling import SamplingParams
from ds4jax.speed_plot import default_title, nice_step, plot, read_rows


def test_frontiers_follow_ds4_bench():
    assert frontiers(2048, 8192, 2048, 1.0) == [2048, 4096, 6144, 8192]
    assert frontiers(2048, 7000, 2048, 1.0) == [2048, 4096, 6144, 7000]  # always ends at ctx_max
    assert frontiers(1000, 5000, 1, 2.0) == [1000, 2000, 4000, 5000]
    assert frontiers(3, 6, 1, 1.1) == [3, 4, 5, 6]  # ceil(F * mul), at least F + 1
    assert frontiers(5, 5, 7, 1.0) == [5]
    for args, msg in (
        ((0, 5, 1, 1.0), "ctx_start"),
        ((6, 5, 1, 1.0), "ctx_start"),
        ((1, 5, 0, 1.0), "step_incr"),
        ((1, 5, 1, 0.5), "step_mul"),
        ((1, 5, 1, float("nan")), "step_mul"),
    ):
        with pytest.raises(DS4Error, match=msg):
            frontiers(*args)


def test_live_state_bytes_counts_the_filled_rows(tiny_files):
    import jax

    from ds4jax.state import init_state

    cfg = tiny_files.config
    shapes = jax.eval_shape(lambda: init_state(cfg, CTX, CHUNK))
    hd2 = cfg.head_dim * 2  # an f16 row
    frontier = sum(
        a.size * a.dtype.itemsize for L in shapes["layers"] for k, a in L.items() if k not in ("raw", "comp", "idx")
    )
    for n in (1, 7, 100, 300):
        want = 4 + frontier + cfg.n_layer * min(n, cfg.n_swa) * hd2
        for i in range(cfg.n_layer):
            if cfg.ratio(i):
                want += (n // cfg.ratio(i)) * hd2
                if cfg.has_indexer(i):
                    want += (n // cfg.ratio(i)) * cfg.idx_head_dim * 2
        assert live_state_bytes(shapes, cfg, n) == want
    assert live_state_bytes(shapes, cfg, 300) > live_state_bytes(shapes, cfg, 100)


def test_bench_generates_what_a_fresh_generation_does(engine):
    """Each frontier's tokens (prefilled on top of the previous frontier's state, generated from a
    copy of it) equal a fresh greedy generation from the prompt's first F tokens; frontiers off the
    chunk boundaries."""
    ids = np.random.default_rng(3).integers(0, engine.cfg.n_vocab, 200).tolist()
    points, gen = [40, 100, 133], 8
    rows = run_bench(engine, ids, points, gen, warmup=False)
    assert [r.ctx_tokens for r in rows] == points and [r.prefill_tokens for r in rows] == [40, 60, 33]
    greedy = SamplingParams(temperature=0.0)
    for r in rows:
        assert r.gen_tokens == gen and r.prefill_s > 0 and r.gen_s > 0 and r.drafts is None
        assert r.tokens == engine.generate(ids[: r.ctx_tokens], gen + 1, greedy).tokens, r.ctx_tokens
    text = csv_text(rows).splitlines()
    assert text[0] == ",".join(HEADER) and len(text) == 4
    fields = text[1].split(",")
    assert fields[:2] == ["40", "40"] and fields[3] == str(gen) and float(fields[2]) > 0 and float(fields[4]) > 0
    assert [int(t.split(",")[5]) for t in text[1:]] == [r.kvcache_bytes for r in rows]
    assert rows[0].kvcache_bytes < rows[1].kvcache_bytes < rows[2].kvcache_bytes


def test_bench_plan_errors():
    for args, msg in (
        ((200, [40, 100], 0), "gen_tokens must be >= 1"),
        ((200, [40, 100], 6), "multiple of --steps_per_call"),
        ((90, [40, 100], 8), "prompt has 90 tokens; --ctx_max 100"),
        ((600, [40, 508], 4), "must exceed --ctx_max \\+ --gen_tokens"),
    ):
        with pytest.raises(DS4Error, match=msg):
            check_plan(*args, ctx=512, steps_per_call=4, mtp=False)
    check_plan(200, [40, 100], 6, 512, 4, mtp=True)  # MTP: any count


def test_plot_writes_both_curves(tmp_path):
    path = tmp_path / "h200_q2.csv"
    path.write_text(
        "\ufeff"
        + ",".join(HEADER)
        + "\n4096,4096,900.5,128,110.2,1\n2048,2048,1000,128,120,1\n6144,2048,800,128,100,1\n"
    )
    assert read_rows(path)[0] == (2048.0, 1000.0, 120.0)  # sorted by context, the BOM skipped
    out = plot(path)
    assert out == tmp_path / "h200_q2_ts.svg"
    svg = out.read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") == 2 and svg.count("<circle") == 6
    assert "H200 Q2 t/s" in svg and default_title("m4_max.csv") == "M4 Max t/s"
    assert [nice_step(s) for s in (1000, 7, 0.3)] == [200, 2, 0.1]
    (tmp_path / "one.csv").write_text(",".join(HEADER) + "\n1,1,1,1,1,1\n")
    (tmp_path / "cols.csv").write_text("ctx_tokens,gen_tps\n1,2\n3,4\n")
    (tmp_path / "nan.csv").write_text(",".join(HEADER) + "\n1,1,x,1,1,1\n2,1,1,1,1,1\n")
    for name, msg in (
        ("one", "1 data row"),
        ("cols", "no column prefill_tps"),
        ("nan", "nan.csv:2: not a number"),
        ("no", "cannot read"),
    ):
        with pytest.raises(DS4Error, match=msg):
            plot(tmp_path / f"{name}.csv")


def test_bench_command_line(tmp_path):
    """The CLI on the default model: the CSV in ds4-bench's format and its plot (the programs are the
    shared engine's: ctx 512, chunk 32, in the session's compile cache)."""
    csv = tmp_path / "tiny.csv"
    r = run_cli(
        "ds4jax.bench",
        "--ctx_start=32",
        "--ctx_max=64",
        "--step_incr=32",
        "--gen_tokens=4",
        f"--chunk={CHUNK}",
        f"--ctx_alloc={CTX}",
        f"--csv={csv}",
        "--plot",
    )
    assert r.returncode == 0, r.stderr
    assert "decode path = plain" in r.stderr and "ctx 64: prefill 32 tokens" in r.stderr
    lines = csv.read_text().splitlines()
    assert lines[0] == ",".join(HEADER) and [ln.split(",")[:2] for ln in lines[1:]] == [["32", "32"], ["64", "32"]]
    assert (tmp_path / "tiny_ts.svg").read_text().count("<polyline") == 2


def test_bench_command_line_errors(tmp_path):
    for args, msg in (
        (["--ctx_start=100", "--ctx_max=50"], "need 1 <= --ctx_start <= --ctx_max"),
        (["--ctx_max=64", "--gen_tokens=5"], "multiple of --steps_per_call"),
        (["--ctx_max=64", f"--prompt_file={tmp_path / 'none.txt'}"], "cannot read --prompt_file"),
        (["--ctx_max=64", "--plot"], "--plot needs --csv"),
        (["--ctx_max=64", "--preset=tiny", "--model=x.gguf"], "without --model"),
        (["--ctx_max=64", "--mtp_draft=1"], "--mtp_draft must be 0 or 2"),
    ):
        r = run_cli("ds4jax.bench", f"--chunk={CHUNK}", "--ctx_start=32", *args)
        assert r.returncode == 1, (args, r.stderr)
        assert r.stderr.strip().splitlines()[-1].startswith("ds4jax.bench: error: "), r.stderr
        assert msg in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run_cli("ds4jax.bench", "--ctx_max=many")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
