"""The options of `pathloop turing create`, free of heavy imports so the CLI builds its parser fast."""

from __future__ import annotations

from dataclasses import dataclass, field

from store.errors import PathloopError


@dataclass
class CampaignConfig:
    """What `pathloop turing create` builds: which tiles, how many, how mixed."""

    name: str = field(default="", metadata={"help": "create: the campaign's name, unique (required)"})
    model: str = field(default="", metadata={"metavar": "ID[,ID]",
                                             "help": "create: generator version ids whose samples are the synthetic items (required)"})
    per_class: int = field(default=10, metadata={"metavar": "K",
                                                 "help": "synthetic items per class and generator version"})
    real_share: float = field(default=0.5, metadata={"metavar": "S",
                                                     "help": "share of real val/test tiles among all items, in (0, 1)"})
    seed: int = field(default=0, metadata={"help": "seed of the draw and of the item positions"})
    round: int | None = field(default=None, metadata={"metavar": "R", "help": "round number the campaign belongs to"})

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise PathloopError("--name: expected a campaign name")
        if self.per_class < 1:
            raise PathloopError(f"per_class = {self.per_class}; expected at least 1")
        if not 0 < self.real_share < 1:
            raise PathloopError(f"real_share = {self.real_share}; expected a share between 0 and 1 (exclusive)")
        self.generator_ids()

    def generator_ids(self) -> list[int]:
        try:
            ids = [int(x) for x in self.model.split(",") if x.strip()]
        except ValueError:
            raise PathloopError(f"--model {self.model!r}; expected generator version ids such as 1 or 1,2") from None
        if not ids:
            raise PathloopError("--model: expected at least one generator version id")
        return sorted(set(ids))
