"""Level-1 routing: semantic task groups from the instruction's text embedding (docs/DESIGN.md §3).

A sample's text query is ``q = LayerNorm(txt_feat)`` (no affine), where ``txt_feat`` is the frozen
text encoder's mean token embedding of the instruction; a task's query is the mean of its
samples' queries. Each group keeps a prototype, the sample-count-weighted running mean of the
queries of the tasks that joined it. A new task joins or opens a group by cosine similarity:

* no group yet: open one;
* one group: join it if ``s1 > join_sim``, else open a new one;
* two or more: join the most similar if ``s1 - s2 > theta`` *and* ``s1 > join_sim`` (our
  extension: a margin alone would let a dissimilar task join the least dissimilar group), else
  open a new one;
* when ``max_groups`` are open, join the most similar group.

At inference each sample goes to ``argmax_g cos(q, prototype_g)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F


def text_query(txt_feat: torch.Tensor) -> torch.Tensor:
    """(B, D) text features -> (B, D) LayerNorm'd queries (no affine), float32."""
    x = txt_feat.to(torch.float32)
    return F.layer_norm(x, (x.shape[-1],))


@dataclass
class GroupDecision:
    """Where a new task goes.

    Attributes:
        group: the group index (an existing one, or the index the new group will get).
        new: True when the task opens a new group.
        similarities: cosine similarity of the task query to every existing prototype.
        forced: True when the rule asked for a new group but ``max_groups`` were open.
    """

    group: int
    new: bool
    similarities: list[float] = field(default_factory=list)
    forced: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"group": self.group, "new": self.new, "similarities": self.similarities, "forced": self.forced}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "GroupDecision":
        return cls(int(raw["group"]), bool(raw["new"]), [float(s) for s in raw["similarities"]], bool(raw["forced"]))


class SemanticGroups:
    """Group prototypes and the join/open rule.

    Args:
        join_sim: similarity a task needs to join (the single-group rule, also required by ours
            in the multi-group rule).
        theta: margin ``s1 - s2`` needed to join when two or more groups exist.
        max_groups: at most this many groups are opened.
    """

    def __init__(self, join_sim: float = 0.8, theta: float = 0.1, max_groups: int = 8) -> None:
        if max_groups < 1:
            raise ValueError(f"SemanticGroups: max_groups must be >= 1, got {max_groups}")
        self.join_sim = join_sim
        self.theta = theta
        self.max_groups = max_groups
        self.sums: Optional[torch.Tensor] = None  # (G, D) float64 sums of sample queries
        self.counts: Optional[torch.Tensor] = None  # (G,) float64 sample counts

    def __len__(self) -> int:
        return 0 if self.sums is None else self.sums.shape[0]

    def prototypes(self) -> torch.Tensor:
        """(G, D) running means."""
        if self.sums is None:
            raise ValueError("SemanticGroups: no group yet")
        return (self.sums / self.counts[:, None]).to(torch.float32)

    def similarities(self, q: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of queries (B, D) or (D,) to every prototype -> (B, G) or (G,)."""
        return F.cosine_similarity(q.to(torch.float32).unsqueeze(-2), self.prototypes(), dim=-1)

    def decide(self, q: torch.Tensor) -> GroupDecision:
        """Where a task with query ``q`` (D,) goes; does not change the groups."""
        n = len(self)
        if n == 0:
            return GroupDecision(0, True)
        sims = self.similarities(q)  # (G,)
        order = sims.argsort(descending=True).tolist()
        s1 = float(sims[order[0]])
        if n == 1:
            join = s1 > self.join_sim
        else:
            s2 = float(sims[order[1]])
            join = (s1 - s2) > self.theta and s1 > self.join_sim
        sims_list = [float(s) for s in sims]
        if join:
            return GroupDecision(order[0], False, sims_list)
        if n >= self.max_groups:
            return GroupDecision(order[0], False, sims_list, forced=True)
        return GroupDecision(n, True, sims_list)

    def commit(self, decision: GroupDecision, query_sum: torch.Tensor, count: float) -> None:
        """Fold a task's queries (their sum (D,) over ``count`` samples) into its group."""
        if count <= 0:
            raise ValueError("SemanticGroups.commit: a task needs at least one text query")
        s = query_sum.to(torch.float64)
        if decision.new:
            if decision.group != len(self):
                raise ValueError(f"SemanticGroups.commit: new group {decision.group}, expected {len(self)}")
            c = torch.tensor([float(count)], dtype=torch.float64)
            self.sums = s[None].clone() if self.sums is None else torch.cat([self.sums, s[None]])
            self.counts = c if self.counts is None else torch.cat([self.counts, c])
        else:
            self.sums[decision.group] += s
            self.counts[decision.group] += float(count)

    def assign(self, q: torch.Tensor) -> torch.Tensor:
        """(B, D) queries -> (B,) group index (argmax cosine)."""
        return self.similarities(q).argmax(dim=-1)

    # -- state ------------------------------------------------------------------------------
    def state(self, prefix: str = "groups") -> dict[str, torch.Tensor]:
        if self.sums is None:
            return {}
        return {f"{prefix}.sums": self.sums.clone(), f"{prefix}.counts": self.counts.clone()}

    def load_state(self, tensors: dict[str, torch.Tensor], prefix: str = "groups") -> None:
        if f"{prefix}.sums" in tensors:
            self.sums = tensors[f"{prefix}.sums"].to(torch.float64).clone()
            self.counts = tensors[f"{prefix}.counts"].to(torch.float64).clone()
        else:
            self.sums = self.counts = None
