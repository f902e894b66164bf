"""Runs a bundle: the launcher starts role processes; each role executes its lowered program."""
