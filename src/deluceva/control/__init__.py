"""Error control (DESIGN.md "Error and control"): dense probes measure the delta output's error on real frames, a PI
controller moves the one target filtering percentage so that the error stays under the user's target.

pi (PIController: percentage from measured errors), probe (ErrorProbe: which frames are probed, the error over the
last probes).
"""

from deluceva.control.pi import PIController
from deluceva.control.probe import ErrorProbe

__all__ = ["ErrorProbe", "PIController"]
