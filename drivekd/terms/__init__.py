"""Teacher terms as a registry: one module per kind of teacher signal, each a `Term` (drivekd.terms.base).

A new teacher signal is one new module here (its Term subclass, and the Recipe it adds to --recipe)
plus one entry in TERMS; the trainer and the planner look terms and recipes up here by name.
"""

from __future__ import annotations

from drivekd.losses.recipes import TermPlan
from drivekd.terms import attention
from drivekd.terms.attention import ATTENTION
from drivekd.terms.base import Recipe, Term, TermForward
from drivekd.terms.hidden import HIDDEN
from drivekd.terms.logits import LOGITS

# Every kind of teacher term, in the order their recipes are listed.
TERMS: tuple[Term, ...] = (ATTENTION, LOGITS, HIDDEN)

SFT = Recipe("sft", (), split_flag=True)  # CE only: the fine-tuning baseline, no store needed
RECIPES: dict[str, Recipe] = {r.name: r for r in (*attention.RECIPES, SFT, *(t.recipe for t in TERMS if t.recipe))}

_BY_NAME = {t.name: t for t in TERMS}
_BY_SIGNAL = {s: t for t in TERMS for s in t.signals}


def recipe(name: str) -> Recipe:
    """The --recipe of that name (KeyError naming the recipes otherwise; TrainConfig checks the flag)."""
    try:
        return RECIPES[name]
    except KeyError:
        raise KeyError(f"unknown recipe {name!r}; recipes are {', '.join(RECIPES)}") from None


def kinds(r: Recipe) -> list[Term]:
    """The term kinds a recipe trains."""
    return [_BY_NAME[n] for n in r.terms]


def term_of(plan: TermPlan) -> Term:
    """The kind that handles a resolved term (by its signal)."""
    return _BY_SIGNAL[plan.signal]


def flag_recipes(attribute: str) -> list[str]:
    """Names of the recipes for which a Recipe flag (split_flag, picks_role, mixes) is set."""
    return [n for n, r in RECIPES.items() if getattr(r, attribute)]


__all__ = ["ATTENTION", "HIDDEN", "LOGITS", "RECIPES", "Recipe", "SFT", "TERMS", "Term", "TermForward", "TermPlan",
           "flag_recipes", "kinds", "recipe", "term_of"]
