"""Video sources and timestamp sampling: `open_source(spec, fps=, start=, max_frames=)` yields `Frame`s."""

from deluceva.video.base import VideoSource
from deluceva.video.frame import Frame
from deluceva.video.open import open_source
from deluceva.video.pyav_source import SourceWarning
from deluceva.video.sampling import TimestampSampler

__all__ = ["Frame", "SourceWarning", "TimestampSampler", "VideoSource", "open_source"]
