"""Tile tuning of the fused MoE kernel (backends/compute/moe_tune.py): the coordinate search finds the best
candidate of a known cost and never keeps a slower one than the current entry; first-use tuning runs once per
token bucket and layer shape, announces itself with one log line, and is kept on disk keyed by GPU, Triton
version and shape, so the next process reads it without tuning. (The timings themselves need a GPU:
`bash benchmarks/gpu_run.sh moe` on a GPU without a table exercises it.)"""
from __future__ import annotations

import json
import logging

import pytest
import torch

moe_tune = pytest.importorskip("msc.backends.compute.moe_tune", reason="triton is not installed")


def _cost(cfg):
    """A made-up cost with one best point: BLOCK_M 32, classic tiles, gate_up 128x64, down 64x128, GROUP_M 16."""
    c = abs(cfg["BLOCK_M"] - 32) / 16 + (0.5 if cfg.get("tma") else 0.0)
    c += abs(cfg["gate_up"]["BLOCK_N"] - 128) / 64 + abs(cfg["gate_up"]["BLOCK_K"] - 64) / 64
    c += abs(cfg["down"]["BLOCK_N"] - 64) / 64 + abs(cfg["down"]["BLOCK_K"] - 128) / 64
    return 1.0 + c + (0.0 if cfg.get("GROUP_M") == 16 else 0.01)


@pytest.mark.parametrize("quick", [False, True])
def test_the_search_finds_the_cheapest_candidate(quick):
    current = {"BLOCK_M": 16, "gate_up": dict(BLOCK_N=64, BLOCK_K=128), "down": dict(BLOCK_N=64, BLOCK_K=128)}
    best, ms, current_ms = moe_tune.search(_cost, 64, 2, 8, current, quick=quick)
    assert (best["BLOCK_M"], best["tma"], best.get("GROUP_M")) == (32, False, 16)
    assert (best["gate_up"]["BLOCK_N"], best["gate_up"]["BLOCK_K"]) == (128, 64)
    assert (best["down"]["BLOCK_N"], best["down"]["BLOCK_K"]) == (64, 128)
    assert ms == pytest.approx(1.0) and current_ms == pytest.approx(_cost(current))
    every = [_cost({"BLOCK_M": bm, "tma": tma, "gate_up": t, "down": t}) for bm, tma, t in
             moe_tune.candidate_configs(64, 2, 8, quick=quick)]
    assert len(every) > 8 and ms <= min(every)


def test_the_current_entry_wins_when_nothing_beats_it():
    current = {"BLOCK_M": 48, "gate_up": dict(BLOCK_N=8, BLOCK_K=8), "down": dict(BLOCK_N=8, BLOCK_K=8)}
    best, ms, current_ms = moe_tune.search(lambda c: 0.5 if c["BLOCK_M"] == 48 else 1.0, 4096, 2, 8, current, quick=True)
    assert best["BLOCK_M"] == 48 and ms == current_ms == 0.5


def test_buckets():
    assert [moe_tune.bucket_of(t) for t in (1, 16, 17, 300, 8192, 100_000)] == [16, 16, 64, 1024, 8192, 8192]


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A private cache folder, and no tuning state from other tests (a new process)."""
    monkeypatch.setenv("MSC_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MSC_MOE_AUTOTUNE", raising=False)
    monkeypatch.setattr(moe_tune, "_memory", {})
    monkeypatch.setattr(moe_tune, "_announced", set())
    monkeypatch.setattr(moe_tune, "MIN_TUNED_BYTES", 0)  # the tiny layers below count as worth tuning
    calls = []
    tuned = {"BLOCK_M": 32, "tma": False, "gate_up": dict(BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
             "down": dict(BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4)}

    def search(timed, t, top_k, e, current, tma_only=False, quick=False):
        calls.append((t, top_k, e, quick))
        return {**tuned, "BLOCK_M": 16 if t <= 16 else 32}, 1.0, 2.0

    monkeypatch.setattr(moe_tune, "search", search)
    return tmp_path, calls


def _layer(e=4, h=32, i=16, dtype=torch.bfloat16):
    return torch.zeros(3, h, dtype=dtype), torch.zeros(e, 2 * i, h, dtype=dtype), torch.zeros(e, h, i, dtype=dtype)


def test_first_use_tunes_once_per_bucket_and_keeps_it_on_disk(fresh, caplog):
    import triton

    tmp_path, calls = fresh
    x, gate_up, down = _layer()
    with caplog.at_level(logging.INFO, logger="msc.backends.compute.moe_tune"):
        a = moe_tune.first_use_config(3, 2, x, gate_up, down, "Some_GPU")
        b = moe_tune.first_use_config(10, 2, x, gate_up, down, "Some_GPU")  # same bucket (16): no new tuning
        c = moe_tune.first_use_config(40, 2, x, gate_up, down, "Some_GPU")  # bucket 64
    assert calls == [(16, 2, 4, True), (64, 2, 4, True)]
    assert a == b and a["BLOCK_M"] == 16 and c["BLOCK_M"] == 32
    announced = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(announced) == 1 and "no fused-MoE tile table for Some_GPU" in announced[0].getMessage()
    path = tmp_path / "moe_tiles" / "Some_GPU" / f"triton-{triton.__version__}" / "E4_H32_I16_K2_bfloat16.json"
    stored = json.loads(path.read_text())
    assert stored["configs"] == {"16": a, "64": c} and stored["shape"] == {"E": 4, "H": 32, "I": 16, "K": 2,
                                                                         "dtype": "torch.bfloat16"}
    moe_tune._memory.clear()  # a new process: read from disk, nothing tuned
    assert moe_tune.first_use_config(12, 2, x, gate_up, down, "Some_GPU") == a
    assert len(calls) == 2
    # another shape, GPU or dtype is another entry
    moe_tune.first_use_config(12, 2, *_layer(h=64), "Some_GPU")
    moe_tune.first_use_config(12, 2, x, gate_up, down, "Other_GPU")
    moe_tune.first_use_config(12, 2, *_layer(dtype=torch.float16), "Some_GPU")
    assert len(calls) == 5


def test_autotune_off_runs_the_heuristic_and_says_so(fresh, monkeypatch, caplog):
    tmp_path, calls = fresh
    monkeypatch.setenv("MSC_MOE_AUTOTUNE", "0")
    with caplog.at_level(logging.WARNING, logger="msc.backends.compute.moe_tune"):
        assert moe_tune.first_use_config(3, 2, *_layer(), "Some_GPU") is None
    assert not calls and not (tmp_path / "moe_tiles").exists()
    assert "MSC_MOE_AUTOTUNE=0: the kernel runs untuned" in caplog.text


def test_a_damaged_cache_file_is_tuned_again(fresh):
    import triton

    tmp_path, calls = fresh
    path = tmp_path / "moe_tiles" / "G" / f"triton-{triton.__version__}" / "E4_H32_I16_K2_bfloat16.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert moe_tune.first_use_config(3, 2, *_layer(), "G")["BLOCK_M"] == 16
    assert len(calls) == 1 and json.loads(path.read_text())["configs"]["16"]["BLOCK_M"] == 16


def test_tiny_layers_and_failed_tunings_run_the_heuristic(fresh, monkeypatch):
    tmp_path, calls = fresh
    monkeypatch.setattr(moe_tune, "MIN_TUNED_BYTES", 64 << 20)
    assert moe_tune.first_use_config(3, 2, *_layer(), "G") is None and not calls  # 6 KB of weights: not tuned

    def broken(*a, **k):
        raise RuntimeError("no timer")

    monkeypatch.setattr(moe_tune, "MIN_TUNED_BYTES", 0)
    monkeypatch.setattr(moe_tune, "search", broken)
    from msc.backends.compute.triton_moe import default_config

    assert moe_tune.first_use_config(3, 2, *_layer(), "G") == default_config(16, 2, 4)


def test_tiles_tuned_earlier_are_used_where_tuning_is_off(fresh, monkeypatch):
    """A role process (tuning off: msc/runtime/worker.py) reads what the colocated engine or the benchmark tuned
    on this machine, and tunes nothing itself."""
    tmp_path, calls = fresh
    tuned = moe_tune.first_use_config(40, 2, *_layer(), "G")  # tuned by, say, msc profile
    monkeypatch.setenv("MSC_MOE_AUTOTUNE", "0")
    moe_tune._memory.clear()  # another process
    assert moe_tune.first_use_config(50, 2, *_layer(), "G") == tuned
    assert moe_tune.first_use_config(300, 2, *_layer(), "G") is None  # a bucket nobody tuned: the heuristic
    assert len(calls) == 1


def test_role_processes_do_not_tune_unless_told(monkeypatch):
    import os

    from msc.runtime import worker

    monkeypatch.setenv("MSC_MOE_AUTOTUNE", "x")  # recorded as it was, so the worker's setdefault is undone too
    monkeypatch.delenv("MSC_MOE_AUTOTUNE")
    monkeypatch.setattr(worker.lifecycle, "watch_parent", lambda: None)
    monkeypatch.setattr(worker.lifecycle, "exit_on_sigterm", lambda: None)
    seen = []
    monkeypatch.setattr(worker, "run_worker", lambda *a: seen.append(os.environ.get("MSC_MOE_AUTOTUNE")))
    assert worker.main(["--bundle", "unused"]) == 0
    assert seen == ["0"]
    monkeypatch.setenv("MSC_MOE_AUTOTUNE", "1")
    worker.main(["--bundle", "unused"])
    assert seen == ["0", "1"]

