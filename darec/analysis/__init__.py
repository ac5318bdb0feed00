"""The paper's analyses as library functions (`darec analyze KIND`) and the report that gathers them."""
from darec.analysis.report import build_report, write_report
from darec.analysis.runner import ANALYSES, analyze

__all__ = ["ANALYSES", "analyze", "build_report", "write_report"]
