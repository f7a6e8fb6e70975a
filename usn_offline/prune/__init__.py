"""USN pruning: neuron stability scores, the Wasserstein concentration loss, structural
pruning, baselines and progressive train-and-prune rounds (the comparison of methods is
in ``usn_offline.experiments``)."""

from usn_offline.prune.groups import NeuronGroup, neuron_groups
from usn_offline.prune.pipeline import METHODS, PruneConfig, PruneResult, RoundResult, prune_model, rounds_table
from usn_offline.prune.structural import masked, prune_structure
from usn_offline.prune.usn import UsnStats, UsnWeights, usn_from_samples, usn_scores
from usn_offline.prune.wasserstein import concentration_loss, two_point_target, wasserstein_1d

__all__ = ["METHODS", "NeuronGroup", "PruneConfig", "PruneResult", "RoundResult", "UsnStats", "UsnWeights",
           "concentration_loss", "masked", "neuron_groups", "prune_model", "prune_structure", "rounds_table",
           "two_point_target", "usn_from_samples", "usn_scores", "wasserstein_1d"]
