"""The main command on the embedded default model."""

import pytest
from conftest import CHUNK, CTX, run_cli

from ds4jax.errors import DS4Error


def test_main_loads_default_model_and_prints_summary(tiny_paths):
    r = run_cli("ds4jax.main", "--summary")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "layers     4 (compress ratios 0,0,4,128; hash-routed layers 0..2)" in out
    assert "vocab 129280" in out
    assert "gate/up IQ2_XXS, down Q2_K" in out
    assert f"mtp        {tiny_paths[1]}: 32 tensors" in out and "gate/up Q4_K, down Q4_K" in out
    assert "into quant planes on cpu" in out
    assert "Traceback" not in r.stderr


def test_main_without_mtp_file_says_so(tiny_paths):
    r = run_cli("ds4jax.main", f"--model={tiny_paths[0]}", "--summary", "--noload")
    assert r.returncode == 0, r.stderr
    assert "mtp        not loaded" in r.stdout and "loaded " not in r.stdout


def test_cli_rejects_bad_input(tiny_paths):
    """Inputs refused before anything is compiled, each with one line on stderr (the default model
    made beforehand: its first run says so)."""
    r = run_cli("ds4jax.main", "--prompt_ids=" + ",".join(["5"] * 600), f"--ctx={CTX}")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "does not fit the context" in r.stderr
    r = run_cli("ds4jax.main", "--prompt=x", "--temp=-2")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "--temp" in r.stderr
    r = run_cli("ds4jax.main", "--prompt_ids=1,x")
    assert r.returncode == 1 and "comma-separated integers" in r.stderr
    r = run_cli("ds4jax.main", "--prompt_ids=1,2", "--steps_per_call=0")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "--steps_per_call must be >= 1" in r.stderr
    r = run_cli("ds4jax.main", "--prompt_ids=1,2", "--mtp_draft=3")
    assert r.returncode == 1 and "--mtp_draft must be 0 or 2" in r.stderr


def test_a_model_too_large_for_the_device_is_one_line(tiny_files):
    """Weights and state larger than the device's free memory: a clear error before loading (the
    check reads the allocator's headroom on a GPU; given here); XLA's out-of-memory past it: one line."""
    from ds4jax.cli import device_error
    from ds4jax.engine import check_fits

    check_fits(tiny_files, tiny_files.config, CTX, CHUNK, headroom=1 << 40)
    with pytest.raises(DS4Error, match=r"weights \(.* GB\) and a 512-token state .* do not fit the 0.0 GB"):
        check_fits(tiny_files, tiny_files.config, CTX, CHUNK, headroom=1 << 20)
    oom = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 10739515392 bytes.\nmore")
    assert (
        str(device_error(oom))
        == "out of device memory: RESOURCE_EXHAUSTED: Out of memory while trying to allocate 10739515392 bytes."
    )
    assert device_error(RuntimeError("INTERNAL: something else")) is None


def test_chat_reads_turns_and_commands_from_stdin(tiny_paths):
    # (/ctx builds a new engine; no turn after it, so the test compiles one prefill + decode)
    turns = "/help\n/think\nCiao!\n/nothink\nE adesso?\n/ctx 300\n/ctx zero\n/bogus\n/quit\nnever read\n"
    r = run_cli("ds4jax.main", "--temp=0", "--n_predict=3", "--ctx=512", "--chunk=32", "--mtp_draft=0", stdin=turns)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "/nothink" in out and "thinking: high" in out and "thinking: off" in out
    assert "context: 300 tokens" in out and "usage: /ctx N" in out and "unknown command /bogus" in out
    assert (
        len(
            [
                ln
                for ln in out.splitlines()
                if ln.strip() and not ln.startswith(("  /", "commands", "thinking", "context", "usage", "unknown"))
            ]
        )
        >= 2
    )
    assert r.stderr.count("plain: prompt") == 0  # chat answers carry no per-turn report


def test_compile_cache_flag(tmp_path):
    """--compile_cache (ds4jax.main's and the bench's) points JAX's persistent cache at a directory
    (before anything compiles); 'off' leaves it alone; with no flag an already configured directory
    is kept."""
    import jax

    from ds4jax.cli import use_compile_cache

    before = jax.config.jax_compilation_cache_dir
    try:
        for flag, want in ((str(tmp_path / "xla"), str(tmp_path / "xla")), ("off", str(tmp_path / "xla")), ("", None)):
            use_compile_cache(flag)
            assert jax.config.jax_compilation_cache_dir == (want or str(tmp_path / "xla"))
        jax.config.update("jax_compilation_cache_dir", None)
        use_compile_cache("")  # nothing configured, no flag: the ds4jax cache dir
        assert jax.config.jax_compilation_cache_dir.endswith("xla")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_prompt_files_are_read_with_one_line_errors(tmp_path):
    """``cli.read_text`` (both commands' prompt files): the text, or an error naming the flag for a
    missing file and for one that is not UTF-8."""
    from ds4jax.cli import read_text

    good, latin = tmp_path / "p.txt", tmp_path / "latin.txt"
    good.write_text("héllo", encoding="utf-8")
    latin.write_bytes("héllo".encode("latin-1"))
    assert read_text(str(good), "prompt_file") == "héllo"
    with pytest.raises(DS4Error, match="cannot read --prompt_file"):
        read_text(str(tmp_path / "none.txt"), "prompt_file")
    with pytest.raises(DS4Error, match="--chat_prompt_file .* is not UTF-8 text"):
        read_text(str(latin), "chat_prompt_file")
