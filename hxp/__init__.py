"""hxp: the pure core of hxp-orchestration (models, planning, graphs, resource maths, rendering)."""

__version__ = "0.1.0"
