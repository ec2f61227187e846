"""Logical plan: torch.fx capture (capture), canonical operator forms (ops) and the graph passes (passes)."""
