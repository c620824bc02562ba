"""The benchmarks' shared pieces: rates over logged intervals, contender order, child processes, and the
process-tree memory sampler (real processes, real /proc; no timing assertions)."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from _common import (  # noqa: E402
    SizedTokenizer, TreeMemorySampler, _busy_fraction, machine_state, overall_rate, rotated, settle, spawn_json,
)

MB = 1 << 20
linux_only = pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="needs Linux /proc")


def test_overall_rate_is_the_harmonic_mean_over_intervals_after_the_warmup():
    history = [{"step": 10, "tokens_per_s": 10.0}, {"step": 20, "tokens_per_s": 100.0},
               {"step": 30, "tokens_per_s": 300.0}, {"step": 40, "mfu": 0.5}]
    # 1000 tokens at 100/s (10 s) + 1000 tokens at 300/s (3.3 s) = 2000 tokens in 13.3 s
    assert overall_rate(history, after_step=10) == pytest.approx(150.0)
    assert overall_rate(history, "mfu") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no logged tokens_per_s after step 30"):
        overall_rate(history, after_step=30)


def test_sized_tokenizer_reports_its_size_and_special_ids():
    tokenizer = SizedTokenizer(512, eos_token_id=0, pad_token_id=1)
    assert len(tokenizer) == 512 and (tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1)


def test_rotated_puts_every_contender_first_once_and_keeps_their_cyclic_order():
    names = ["torch", "hf", "raylm"]
    orders = [rotated(names, repeat) for repeat in range(3)]
    assert [order[0] for order in orders] == names
    assert orders[1] == ["hf", "raylm", "torch"]
    assert rotated(names, 3) == names and rotated([], 2) == []


def test_machine_state_records_load_niceness_and_cpus():
    state = machine_state()
    assert len(state["load_average"]) == 3 and state["cpu_count"] == os.cpu_count()
    assert state["niceness"] == os.nice(0)


def test_spawn_json_returns_what_the_child_wrote_and_reports_a_failing_child(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent("""
        import json, os, sys
        args = sys.argv[1:]
        out = args[args.index("--out") + 1]
        if "--fail" in args:
            sys.exit("the child failed on purpose")
        print("noise on stdout is ignored")
        json.dump({"args": args[: args.index("--out")], "env": os.environ.get("BENCH_TEST_VALUE")}, open(out, "w"))
    """))
    assert spawn_json(script, ["a", "b"], env={"BENCH_TEST_VALUE": "42"}) == {"args": ["a", "b"], "env": "42"}
    with pytest.raises(RuntimeError, match="the child failed on purpose"):
        spawn_json(script, ["--fail"])


def _memory_child(megabytes: int, shared: bool, wait_for_go: bool = False):
    """A child that (through a grandchild when not shared) holds ``megabytes`` of touched memory until stdin closes.

    With ``wait_for_go`` the child starts its grandchild only after reading one line from stdin.
    """
    if shared:
        code = f"""
            import mmap, os, sys
            buffer = mmap.mmap(-1, {megabytes} << 20, flags=mmap.MAP_SHARED)
            buffer.write(b"x" * ({megabytes} << 20))
            if os.fork() == 0:  # the child maps the same pages: shared, not copied
                buffer.seek(0); buffer.read({megabytes} << 20)
                print("ready", flush=True); sys.stdin.read(); os._exit(0)
            sys.stdin.read()
        """
    else:
        code = f"""
            import subprocess, sys
            if {wait_for_go}: sys.stdin.readline()
            grandchild = subprocess.Popen([sys.executable, "-c", "import sys; data = bytearray({megabytes} << 20); "
                                           "data[::4096] = b'x' * len(data[::4096]); print('ready', flush=True); "
                                           "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=sys.stdout)
            sys.stdin.read(); grandchild.stdin.close(); grandchild.wait()
        """
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


# The sampler is rooted at the child: the pytest process's own tree (Ray, servers of other tests) changes
# on its own while a test runs, which would hide or fake a 200 MB difference.


@linux_only
def test_tree_sampler_counts_descendants_down_to_grandchildren():
    child = _memory_child(200, shared=False)
    try:
        assert child.stdout.readline().strip() == "ready"
        sampler = TreeMemorySampler(pid=child.pid)
        during = sampler.sample()
    finally:
        child.stdin.close()
        child.wait()
    assert during > 180 * MB  # the grandchild's 200 MB, one level below the root
    assert sampler.peak_processes >= 2 and sampler.peak_pss == during


@linux_only
def test_tree_sampler_counts_shared_memory_once_where_rss_counts_it_per_process():
    child = _memory_child(100, shared=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        sampler = TreeMemorySampler(pid=child.pid)
        pss = sampler.sample()
    finally:
        child.stdin.close()
        child.wait()
    assert 90 * MB < pss < 150 * MB  # 100 MB mapped by two processes: counted once (plus two interpreters)
    assert sampler.peak_rss > 190 * MB  # ...and twice by RSS


@linux_only
def test_tree_sampler_thread_keeps_the_peak_and_what_sampling_cost():
    child = _memory_child(100, shared=False, wait_for_go=True)  # rooted at the child, as above
    with TreeMemorySampler(pid=child.pid, interval_s=0.05) as sampler:
        baseline = sampler.peak_pss
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "ready"
        seen = sampler.samples
        deadline = time.monotonic() + 60
        while sampler.samples < seen + 2 and time.monotonic() < deadline:  # the thread's samples, not ours
            time.sleep(0.05)
        child.stdin.close()
        child.wait()
    figures = sampler.figures()
    assert figures["memory_samples"] >= seen + 2 and figures["memory_sampling_cpu_s"] > 0
    assert figures["peak_tree_pss_bytes"] - baseline > 80 * MB  # held while the thread sampled, gone at exit


def test_sampler_is_marked_unavailable_without_proc(monkeypatch):
    monkeypatch.setattr(os.path, "exists", lambda path: False)
    with TreeMemorySampler() as sampler:
        pass
    assert not sampler.available and sampler.figures()["peak_tree_pss_bytes"] == 0


@linux_only
def test_settle_waits_while_the_machine_is_busy_and_gives_up_at_the_timeout():
    """settle keeps measuring while the CPU is above max_busy, returns once it is not, and stops at timeout_s."""
    readings = iter([0.9, 0.8, 0.6, 0.1, 0.9])
    measured = []

    def probe(interval_s: float) -> float:
        time.sleep(interval_s)
        measured.append(interval_s)
        return next(readings)

    waited = settle(max_busy=0.5, interval_s=0.05, timeout_s=10.0, busy_fraction=probe)
    assert len(measured) == 4  # three busy readings, then the quiet one ends the wait
    assert 0.2 <= waited < 10.0
    always_busy = settle(max_busy=0.5, interval_s=0.05, timeout_s=0.3, busy_fraction=lambda s: time.sleep(s) or 1.0)
    assert 0.3 <= always_busy < 1.0


def test_busy_fraction_sees_a_spinning_process():
    """The machine's CPU measure counts a process spinning a core (it can only read higher under load)."""
    cores = os.cpu_count() or 1
    busy = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.2)
        fraction = _busy_fraction(0.5)
    finally:
        busy.wait()
    assert busy.returncode == 0
    assert fraction >= 0.5 / cores