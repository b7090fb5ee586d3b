"""``l4compile plan``: expert-sharding planner over the full-size model's inventory (meta device)."""
from l4compile.plan.planner import Plan, PlanRequest, make_plan

__all__ = ["Plan", "PlanRequest", "make_plan"]
