"""Metrics: confusion-matrix metrics and the named protocols that give a number its meaning."""

from medseg.metrics.confusion import class_metrics, confusion_counts, predict_labels, summary_metrics
from medseg.metrics.protocols import PROTOCOLS, Protocol, case_scores, get_protocol, summarize

__all__ = ["PROTOCOLS", "Protocol", "case_scores", "class_metrics", "confusion_counts", "get_protocol",
           "predict_labels", "summarize", "summary_metrics"]
