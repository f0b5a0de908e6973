"""fedjax-sim: federated-learning simulation where a round is one jitted program."""
from fedjax_sim.protocol import (ClientInfo, FederatedAlgorithm, ServerInfo, local_train,
                                 masked_cross_entropy, tree_weighted_mean)
from fedjax_sim.checks import AlgorithmError, check_algorithm
from fedjax_sim.client_data import ClientData, pack
from fedjax_sim.errors import CheckpointError, ConfigError, DivergedError, FedSimError
from fedjax_sim.round import SimState, init_state, make_mesh, make_round
from fedjax_sim.sampling import Sampler, uniform

__version__ = "0.1.0"

__all__ = [
    "AlgorithmError", "CheckpointError", "ClientData", "ClientInfo", "ConfigError",
    "DivergedError", "FedSimError", "FederatedAlgorithm", "Sampler", "ServerInfo", "SimState",
    "check_algorithm", "init_state", "local_train", "make_mesh", "make_round",
    "masked_cross_entropy", "pack", "tree_weighted_mean", "uniform",
]
