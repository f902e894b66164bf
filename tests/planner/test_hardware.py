"""The GPU catalogue: built-in figures, extra catalogues, overrides and the errors for bad input."""
from __future__ import annotations

import pytest

from msc.errors import MscError
from msc.planner.hardware import GPU, get_gpu, load_catalogue

BUILTIN = ("A100-80GB", "H100-SXM", "H200", "H20", "L40S", "H800")
FIGURES = ("bf16_tflops", "mem_bw_gbs", "mem_gib", "nic_gbps", "nvlink_gbs", "price_per_hour")
NEW_GPU = dict(name="B200", bf16_tflops=2250, mem_bw_gbs=8000, mem_gib=180, nic_gbps=400, nvlink_gbs=900, price_per_hour=5.0)


def test_builtin_catalogue_has_the_six_gpus_with_positive_figures():
    cat = load_catalogue()
    assert set(BUILTIN) <= set(cat)
    for name in BUILTIN:
        gpu = cat[name]
        assert gpu.name == name
        for key in FIGURES:
            assert getattr(gpu, key) > 0, (name, key)


def test_datasheet_figures_and_si_helpers():
    cat = load_catalogue()
    a100, h100, h20, l40s = cat["A100-80GB"], cat["H100-SXM"], cat["H20"], cat["L40S"]
    assert (a100.bf16_tflops, a100.mem_bw_gbs, a100.mem_gib) == (312, 2039, 80)
    assert (h100.bf16_tflops, h100.mem_bw_gbs, cat["H200"].mem_bw_gbs) == (989, 3350, 4800)
    assert (h20.bf16_tflops, h20.mem_bw_gbs, h20.mem_gib) == (148, 4000, 96)
    assert (l40s.bf16_tflops, l40s.mem_bw_gbs, l40s.mem_gib, l40s.nvlink_gbs) == (362, 864, 48, 32)
    assert h100.flops == 989e12
    assert h100.mem_bw == 3350e9
    assert h100.mem_bytes == 80 * 2**30
    assert h100.nic_bw == 400e9 / 8  # Gb/s -> bytes/s
    assert h100.nvlink_bw == 450e9


def test_get_gpu_is_case_insensitive_and_unknown_names_list_the_known_ones():
    cat = load_catalogue()
    assert get_gpu("h100-sxm", cat) is cat["H100-SXM"]
    with pytest.raises(MscError) as err:
        get_gpu("V100", cat)
    msg = str(err.value)
    assert "V100" in msg and all(name in msg for name in BUILTIN)
    assert "\n" not in msg


def test_overrides_change_single_figures_only():
    cat = load_catalogue(overrides={"h20": {"price_per_hour": 1.1}, "L40S": {"nic_gbps": 400}})
    assert cat["H20"].price_per_hour == 1.1
    assert cat["H20"].bf16_tflops == 148  # the other figures stay
    assert cat["L40S"].nic_gbps == 400
    assert load_catalogue()["H20"].price_per_hour != 1.1  # the built-in catalogue is untouched


def test_override_of_an_unknown_gpu_is_an_error():
    with pytest.raises(MscError, match="unknown GPU 'V100'.*H100-SXM"):
        load_catalogue(overrides={"V100": {"price_per_hour": 1.0}})


def test_extra_yaml_file_adds_and_replaces_gpus(tmp_path):
    f = tmp_path / "gpus.yaml"
    f.write_text(
        "gpus:\n"
        "  - {name: B200, bf16_tflops: 2250, mem_bw_gbs: 8000, mem_gib: 180, nic_gbps: 400, nvlink_gbs: 900, price_per_hour: 5.0}\n"
        "  - {name: l40s, bf16_tflops: 362, mem_bw_gbs: 864, mem_gib: 48, nic_gbps: 100, nvlink_gbs: 32, price_per_hour: 0.8}\n"
    )
    cat = load_catalogue(f, overrides={"B200": {"price_per_hour": 4.5}})
    assert cat["B200"] == GPU(**{**NEW_GPU, "price_per_hour": 4.5})
    assert get_gpu("L40S", cat).nic_gbps == 100  # replaced whole, not duplicated
    assert sum(1 for k in cat if k.lower() == "l40s") == 1
    assert set(BUILTIN) - {"L40S"} <= set(cat)


def test_extra_dict_forms():
    assert load_catalogue({"gpus": [NEW_GPU]})["B200"].mem_gib == 180
    figures = {k: v for k, v in NEW_GPU.items() if k != "name"}
    assert load_catalogue({"gpus": {"B200": figures}})["B200"].nvlink_gbs == 900


@pytest.mark.parametrize("key, value, expected", [
    ("mem_bw_gbs", 0, "a number > 0"),
    ("price_per_hour", -1.5, "a number > 0"),
    ("bf16_tflops", "fast", "a number > 0"),
    ("nic_gbps", True, "a number > 0"),
    ("nvlink_gbs", float("nan"), "a number > 0"),
])
def test_bad_figure_names_the_gpu_the_key_and_what_was_expected(key, value, expected):
    with pytest.raises(MscError) as err:
        load_catalogue({"gpus": [{**NEW_GPU, key: value}]})
    msg = str(err.value)
    assert "B200" in msg and key in msg and expected in msg and "\n" not in msg


def test_bad_override_names_the_gpu_and_key():
    with pytest.raises(MscError, match=r"GPU 'H20': mem_gib = 0: expected a number > 0"):
        load_catalogue(overrides={"H20": {"mem_gib": 0}})


def test_unknown_and_missing_keys(tmp_path):
    with pytest.raises(MscError, match=r"GPU 'B200': unknown key 'fp8_tflops'"):
        load_catalogue({"gpus": [{**NEW_GPU, "fp8_tflops": 4500}]})
    with pytest.raises(MscError, match=r"GPU 'H20': unknown key 'tflops'"):
        load_catalogue(overrides={"H20": {"tflops": 1}})
    partial = {k: v for k, v in NEW_GPU.items() if k != "mem_gib"}
    with pytest.raises(MscError, match=r"GPU 'B200': missing key 'mem_gib'"):
        load_catalogue({"gpus": [partial]})


def test_unreadable_extra_catalogues(tmp_path):
    with pytest.raises(MscError, match="does not exist"):
        load_catalogue(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("gpus: [ {name: X\n")
    with pytest.raises(MscError, match="not valid YAML"):
        load_catalogue(bad)
    dup = tmp_path / "dup.yaml"
    dup.write_text("gpus:\n  - " + repr(NEW_GPU).replace("'", "") + "\n  - " + repr(NEW_GPU).replace("'", "") + "\n")
    with pytest.raises(MscError, match="listed twice"):
        load_catalogue(dup)
