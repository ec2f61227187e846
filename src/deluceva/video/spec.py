"""Classify a source spec string: URL, camera device, image folder, image glob, or video file."""

from __future__ import annotations

import glob
import os
import re
from enum import Enum

URL_SCHEMES = ("http", "https", "rtsp", "rtsps", "rtmp", "rtmps", "rtp", "udp", "tcp", "srt", "hls")
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


class SpecKind(Enum):
    URL = "url"
    DEVICE = "device"
    FOLDER = "folder"
    GLOB = "glob"
    FILE = "file"


def classify(spec: str) -> SpecKind:
    """Kind of `spec`: '<scheme>://...' -> URL, '/dev/video*' -> DEVICE, an existing directory -> FOLDER,
    a pattern with * ? [ that is not an existing file -> GLOB, anything else -> FILE."""
    m = _URL.match(spec)
    if m and m.group(1).lower() in URL_SCHEMES:
        return SpecKind.URL
    if spec.startswith("/dev/video"):
        return SpecKind.DEVICE
    if os.path.isdir(spec):
        return SpecKind.FOLDER
    if glob.has_magic(spec) and not os.path.exists(spec):
        return SpecKind.GLOB
    return SpecKind.FILE
