"""Real-shape run planner: `drivekd-train --dry-run` and `drivekd-cache build --dry-run`.

The real model (from config.json only) and the real step code run on fake tensors; an allocation
tracker reports peak memory by category and the FLOPs. See plan.py."""

from drivekd.planner.plan import dry_run, format_report, parse_bytes

__all__ = ["dry_run", "format_report", "parse_bytes"]
