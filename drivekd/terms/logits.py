"""The KL term of the CE+KL baseline (--recipe kl, METHOD.md 3): tau^2 KL(teacher || student) at the
answer positions against the store's top-k next-token distribution (drivekd.losses.kl). Row name "kl".
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from drivekd.errors import AlignmentError, ConfigError
from drivekd.losses.kl import topk_kl
from drivekd.losses.recipes import TermPlan
from drivekd.store.targets import RoleInfo, SampleTargets
from drivekd.terms.base import Recipe, Term, TermForward, batch_offset


def check_vocabulary(info: RoleInfo, family, student: Path) -> None:
    """--recipe kl compares distributions over token ids: teacher and student must share the
    tokenizer, and the student's LM head must have a row for every id the teacher's top-k can name.
    Refused before any model loads. (LM heads padded to other sizes, as Qwen2.5-VL 3B's 151936 vs
    7B's 152064 rows, are fine: the store keeps padding rows out of the top-k.)"""
    from drivekd.store.signals import vocab_identity, vocab_rows

    lg = info.signals["logits"]
    mine = vocab_identity(family.tokenizer)
    rows = vocab_rows(json.loads((Path(student) / "config.json").read_text()))
    if mine["tokenizer_fingerprint"] != lg["tokenizer_fingerprint"]:
        raise AlignmentError(
            f"--recipe kl: the {info.role} teacher's vocabulary ({lg['tokenizer_size']} token ids) is not --student's "
            f"({mine['tokenizer_size']} token ids, another token -> id map); a KL between their next-token distributions "
            "needs one vocabulary: use a teacher of the student's tokenizer, or another recipe")
    if rows < lg["tokenizer_size"]:
        raise AlignmentError(
            f"--recipe kl: --student's LM head has {rows} rows (vocab_size in its config.json) but the {info.role} teacher's "
            f"vocabulary has {lg['tokenizer_size']} token ids (its LM head {lg['vocab_size']} rows); the vocabularies differ, "
            "so the stored top-k ids cannot all be scored by the student")


class LogitsTerm(Term):
    name = "kl"
    signals = ("logits",)
    store_signal = "logits"
    recipe = Recipe("kl", ("kl",), split_flag=True, picks_role=True)

    def check_student(self, cfg, infos: dict[str, RoleInfo], family, student) -> None:
        for info in infos.values():
            check_vocabulary(info, family, student)

    def resolve(self, cfg, roles: list[str], infos: dict[str, RoleInfo], student_L: int) -> list[TermPlan]:
        if cfg.layers or cfg.mid_range:
            raise ConfigError("--layers / --mid-range choose hidden or attention layers; --recipe kl compares next-token distributions")
        return [TermPlan(role, "logits", "kl", (), row=self.name) for role in roles]

    def collate(self, inputs, targets: list[SampleTargets], plan: TermPlan) -> dict[str, torch.Tensor]:
        """The stored top-k distributions placed at the batch's answer positions (the rows of the
        student's kept logits): logprobs, index (B, P, k), log_tail, mask (B, P)."""
        from drivekd.losses.attention import answer_positions
        from drivekd.store.signals import answer_rows

        keep, _ = answer_positions(inputs.padded("labels"))  # (P,)
        B, P, k = len(targets), keep.numel(), targets[0].logits.logprobs.shape[-1]
        out = {"logprobs": torch.zeros(B, P, k), "index": torch.zeros(B, P, k, dtype=torch.long), "log_tail": torch.zeros(B, P),
               "mask": torch.zeros(B, P, dtype=torch.bool)}
        for b, (lay, t) in enumerate(zip(inputs.layouts, targets)):
            rows = answer_rows(lay.labels)
            if not torch.equal(rows, t.logits.positions):
                raise AlignmentError(f"sample {lay.sample_id}: the store's {plan.role} logits are for positions "
                                     f"{t.logits.positions.tolist()[:5]}... but the student's answer positions are "
                                     f"{rows.tolist()[:5]}...; rebuild the store's logits for this --data/--student")
            j = torch.searchsorted(keep, rows + batch_offset(inputs, lay))
            out["logprobs"][b, j], out["index"][b, j], out["log_tail"][b, j] = t.logits.logprobs, t.logits.index, t.logits.log_tail
            out["mask"][b, j] = True
        return out

    def loss(self, plan: TermPlan, fw: TermForward, targets: dict) -> torch.Tensor:
        # The student's logits are those of the CE's answer positions, the rows the targets were placed at.
        return topk_kl(fw.out.logits, targets["logprobs"], targets["index"], targets["log_tail"], targets["mask"],
                       fw.cfg.kl_temperature)


LOGITS = LogitsTerm()
