"""Typed job records for tests: the builders ship in daemon.testing (bench/ uses them too)."""

from daemon.testing import PARAMS, make_model, make_params, make_record

__all__ = ["PARAMS", "make_model", "make_params", "make_record"]
