"""Engine, data and model defaults shared by every config; a config file overrides what it needs.

Knob names follow the literature: E = local_epochs, B = batch_size, K =
clients_per_round, eta_l = client_lr, eta = server_lr, tau = server_tau.

A method's own knobs are not here: they sit in the sub-dict named after it
(``c.fedprox.mu``, ``c.corefed.beta``, ...), passed as keyword arguments to its
constructor, whose signature holds the defaults
(``fedjax_sim.launch.experiment.complete_config`` fills the sub-dict from it,
so ``--config.<algorithm>.<knob>`` works for every knob).
"""
import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.algorithm = "fedavg"
  c.rounds = 100
  c.clients_per_round = 20  # K
  c.sampler = "uniform"  # cohort sampler (fedjax_sim.sampling.build_sampler); poisson: q = K / C
  c.cohort_bound = 0  # poisson: K_max slots (0 = sampling.poisson_bound)
  c.local_epochs = 1  # E
  c.local_steps = 0  # > 0: fixed local steps instead of epochs
  c.batch_size = 10  # B
  c.client_lr = 0.1  # eta_l
  c.client_momentum = 0.0
  c.lr_decay = 1.0  # client lr * lr_decay**round
  c.server_optimizer = "sgd"  # sgd | adam | yogi | adagrad (FedOpt)
  c.server_lr = 1.0  # eta; FedAvg = sgd with 1.0
  c.server_b1 = 0.9
  c.server_b2 = 0.99
  c.server_tau = 1e-3  # FedOpt's adaptivity epsilon tau
  # Unequal participation (sampler availability | schedule; fedjax_sim/sampling.py)
  c.availability = ml_collections.ConfigDict({
      "distribution": "power_law", "beta_a": 1.0, "beta_b": 1.0, "power": 0.75, "seed": 0,
      "schedule_period": 50})

  c.model = "mlp"
  # Model pools (model-heterogeneous algorithms): MODEL_ZOO names, clients round-robin.
  c.archs = ("mlp_s", "mlp_m", "cnn_s")
  c.model_kwargs = ml_collections.ConfigDict({"hidden": (200, 200)})

  c.data = ml_collections.ConfigDict()
  # digits | mnist1d | synthetic | tfds:<mnist|fashion_mnist|cifar10|cifar100> | leaf:<dir> |
  # sqlite:<path> | parquet:<path>
  c.data.dataset = "digits"
  c.data.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.data.num_clients = 100  # C
  c.data.partition = "dirichlet"  # iid | dirichlet (PRA) | pathological (PAT) | quantity_skew
  c.data.alpha = 0.5  # Dirichlet concentration
  c.data.classes_per_client = 2  # pathological k
  c.data.min_examples = 2
  c.data.client_test_fraction = 0.2
  c.data.storage = "padded"  # padded ([C, N, ...]) | flat ([T, ...]: memory follows examples)
  c.data.synthetic_alpha = 1.0
  c.data.synthetic_beta = 1.0
  # MNIST-1D (data/mnist1d.py)
  c.data.num_samples = 5000  # 4,000 train + 1,000 test as in the paper; more for client scale
  c.data.mnist1d_seed = 42  # the generator's seed (the dataset is the same for every run seed)
  # Natural partitions (leaf:<dir>, sqlite:<path>, parquet:<path>; data/natural.py)
  c.data.min_client_size = 1  # drop clients with fewer training examples
  c.data.max_client_size = 0  # keep each client's first that many examples (0 = all)
  c.data.max_clients = 0  # a uniform sample of that many clients (0 = all)
  c.data.sequence_length = 80  # T of the next-character task
  c.data.client_column = ""  # Parquet client-id column ("" = auto)

  # Client-level differential privacy (fedjax_sim/dp.py, fedjax_sim/privacy.py): DP-FedAvg
  # (arXiv 1710.06963) around fedavg / fedprox / fedadam / fedyogi / fedadagrad.
  c.dp = ml_collections.ConfigDict({
      "enabled": False,
      "noise_multiplier": 1.0,  # z: noise std z * C on the clipped sum
      "clip_norm": 1.0,  # C (with adaptive clipping, C_0)
      "adaptive": False,  # adaptive clipping (arXiv 1905.03871)
      "target_quantile": 0.5,  # gamma
      "clip_lr": 0.2,  # eta_C
      "clipped_count_stddev": 0.0,  # sigma_b (0 = expected cohort / 20)
      "target_epsilon": 0.0,  # > 0: calibrate z for this epsilon after `rounds` rounds
      "delta": 0.0,  # 0 = num_clients ** -1.1
      "accountant": "rdp",  # rdp | pld (dp_accounting)
  })

  # Engine
  c.rounds_per_call = 10  # rounds fused with lax.scan per jitted call
  c.chunk_size = 5  # clients vmapped together (0 = whole cohort per device); 5 was fastest on CPU (bench/RESULTS.md)
  # chunked: size-sorted chunks (the fastest for this default run, K=20: bench/RESULTS.md);
  # stream: continuous client batching (fedjax_sim/stream.py; faster at K=100 on digits);
  # auto: stream for the algorithms it supports, else chunked.
  c.schedule = "chunked"  # chunked | stream | auto
  c.slots = 0  # W, clients streamed side by side per device (0 = stream.default_slots: ceil(K/4) <= 20)
  c.num_devices = 0  # 0 = all visible devices
  c.eval_every = 10
  c.checkpoint_every = 50
  c.max_checkpoints = 3
  c.progress = True
  return c
