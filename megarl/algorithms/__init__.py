"""RL and preference math as pure tensor functions, each with its formula and source in the
docstring, selected by the recipe's names through small registries:

- `advantages`: gae, grpo (Dr. GRPO via norm_adv_by_std=false), rloo, reinforce_pp,
  reinforce_pp_baseline, remax                                   -> ADVANTAGE_ESTIMATORS
- `losses`: ppo (asymmetric + dual clip), gspo, cispo            -> POLICY_LOSSES;
  loss aggregation modes, entropy bonus, clipped value loss, SFT loss
- `kl`: k1/k2/k3 estimators (KL_ESTIMATORS), KL-in-reward, fixed/adaptive controllers
- `correction`: rollout/train mismatch correction (TIS, sequence IS, token/sequence masking) + metrics
- `preference`: DPO sigmoid/hinge/IPO/robust, ORPO, SimPO, KTO (PREFERENCE_LOSSES), Bradley-Terry

Nothing here holds state besides the KL controllers, and nothing imports megatron.
"""

from megarl.algorithms.advantages import ADVANTAGE_ESTIMATORS, AdvantageInputs
from megarl.algorithms.kl import KL_ESTIMATORS
from megarl.algorithms.losses import LOSS_AGGREGATIONS, POLICY_LOSSES
from megarl.algorithms.preference import PREFERENCE_LOSSES

__all__ = ["ADVANTAGE_ESTIMATORS", "AdvantageInputs", "KL_ESTIMATORS", "LOSS_AGGREGATIONS", "POLICY_LOSSES",
           "PREFERENCE_LOSSES"]
