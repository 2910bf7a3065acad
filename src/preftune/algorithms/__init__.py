"""The algorithm table: name -> Algorithm class. Explicit on purpose (greppable, no registration magic)."""

from __future__ import annotations

from preftune.algorithms.best_of_n import BestOfN
from preftune.algorithms.dpo import (
    CDPO,
    DPO,
    DPOP,
    IPO,
    ORPO,
    RPO,
    Hinge,
    ReferenceFreeDPO,
    RobustDPO,
    SimPO,
    Unlikelihood,
)
from preftune.algorithms.grdpo import GroupRobustDPO
from preftune.algorithms.grpo import GRPO, GSPO
from preftune.algorithms.kto import KTO
from preftune.algorithms.mdpo import MDPO
from preftune.algorithms.ppo import PPO
from preftune.algorithms.reinforce import Reinforce
from preftune.algorithms.reinforce_pp import ReinforcePP
from preftune.algorithms.reward import RewardModelAlgorithm
from preftune.algorithms.rloo import RLOO
from preftune.algorithms.sft import SFT

ALGORITHMS = {
    "sft": SFT,
    "dpo": DPO,
    "cdpo": CDPO,
    "robust_dpo": RobustDPO,
    "ipo": IPO,
    "hinge": Hinge,
    "ref_free_dpo": ReferenceFreeDPO,
    "simpo": SimPO,
    "orpo": ORPO,
    "unlikelihood": Unlikelihood,
    "kto": KTO,
    "mdpo": MDPO,
    "reward": RewardModelAlgorithm,
    "best_of_n": BestOfN,
    "reinforce": Reinforce,
    "rloo": RLOO,
    "ppo": PPO,
    "grpo": GRPO,
    "gspo": GSPO,
    "reinforce_pp": ReinforcePP,
    "rpo": RPO,
    "dpop": DPOP,
    "grdpo": GroupRobustDPO,
}
