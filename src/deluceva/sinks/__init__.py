"""Result sinks: per-frame records to JSONL / Parquet, annotated video; all publish atomically on close."""

from deluceva.sinks.base import ResultSink
from deluceva.sinks.draw import draw_detections
from deluceva.sinks.factory import open_sink, read_results
from deluceva.sinks.jsonl import JsonlSink
from deluceva.sinks.parquet import ParquetSink
from deluceva.sinks.video import AnnotatedVideoSink

__all__ = [
    "AnnotatedVideoSink",
    "JsonlSink",
    "ParquetSink",
    "ResultSink",
    "draw_detections",
    "open_sink",
    "read_results",
]
