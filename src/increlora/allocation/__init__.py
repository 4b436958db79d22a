"""Allocation: who gets rank, and when (importance scores, growth schedule, controllers)."""

from .allocator import IncreLoRAAllocator
from .schedule import GrowthPlan, ModuleSlot, make_plan, select_growth

__all__ = ["GrowthPlan", "IncreLoRAAllocator", "ModuleSlot", "make_plan", "select_growth"]
