"""Delta operator units: filter + sparse operator, one module per operator family.

pixels (PixelDelta, shared), base (Unit, delta conventions, argument templates), registry (operator -> unit),
filter, state (accumulated full values), conv, linear, norm, pool, activation, arith, shape, upsample, pad, linop
(generic linear ops), dense (recompute fallback), network (DeltaNetwork runtime), kernels_bridge (fast kernels of
`delta.kernels` with torch fallbacks).
"""
