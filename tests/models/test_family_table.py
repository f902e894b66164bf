"""The family table (docs/family_table.md, written by `python -m msc.models.survey`): it covers exactly the MoE
causal-LM families of the installed transformers, so a new family shows up here until the table is
regenerated, and no family compiles into a program that computes something else (status WRONG)."""
from __future__ import annotations

from pathlib import Path

import pytest

from msc.models.survey import moe_causal_lm_types, read_table, survey_one

TABLE = Path(__file__).resolve().parents[2] / "docs/family_table.md"
REGENERATE = "regenerate it: python -m msc.models.survey --out docs/family_table.md"


def test_the_table_lists_every_installed_moe_family():
    listed = read_table(TABLE)
    installed = moe_causal_lm_types()
    assert len(installed) > 40  # the walk finds transformers' MoE families (65 in 5.25), not an empty list
    missing, gone = sorted(set(installed) - set(listed)), sorted(set(listed) - set(installed))
    assert not missing and not gone, f"families not in the table: {missing}; in the table but not installed: {gone}; {REGENERATE}"


def test_no_family_compiles_into_wrong_output():
    wrong = [f for f, status in read_table(TABLE).items() if status == "WRONG"]
    assert not wrong, f"these families compile and give other tokens than transformers: {wrong}"


@pytest.mark.slow
@pytest.mark.parametrize("family", moe_causal_lm_types())
def test_each_family_still_has_its_status(family, tmp_path):
    """Re-run the survey of one family: the status the table records (slow: 65 families, ~10 s each)."""
    row = survey_one(family, tmp_path)
    assert row["status"] != "WRONG", row
    assert row["status"] == read_table(TABLE).get(family), f"{row}; {REGENERATE}"
