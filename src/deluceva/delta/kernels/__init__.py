"""Fast CPU kernels on PixelDeltas: sparse convs, pixel filter, activation deltas, merges, resampling, pooling.

Every kernel is exact against its dense reference (tests/test_kernels.py); bench/ops.py measures them.
"""

from deluceva.delta.kernels._jit import HAVE_NUMBA
from deluceva.delta.kernels.conv import SparseConv2d, SparseConvTranspose2d, conv_out_hw, conv_plan
from deluceva.delta.kernels.elementwise import ACTIVATIONS, SparseActivation, activation, conv_act
from deluceva.delta.kernels.filter import PixelFilter
from deluceva.delta.kernels.merge import add, concat
from deluceva.delta.kernels.phases import PhasePlan
from deluceva.delta.kernels.pool import SparseMaxPool2d
from deluceva.delta.kernels.resample import upsample_nearest2x
from deluceva.delta.kernels.scatter import ScatterConv, reachable

__all__ = [
    "ACTIVATIONS",
    "HAVE_NUMBA",
    "PixelFilter",
    "PhasePlan",
    "ScatterConv",
    "SparseActivation",
    "SparseConv2d",
    "SparseConvTranspose2d",
    "SparseMaxPool2d",
    "activation",
    "add",
    "concat",
    "conv_act",
    "conv_out_hw",
    "conv_plan",
    "reachable",
    "upsample_nearest2x",
]
