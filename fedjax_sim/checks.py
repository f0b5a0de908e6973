"""Early checks of a user-written algorithm, with messages that point to the guide.

:func:`check_algorithm` traces one client update and one server update with
abstract values (``jax.eval_shape``: no compute) before the round is compiled,
and turns the usual tracing failures into one-paragraph errors naming the
mistake and the section of ``docs/writing_an_algorithm.md`` that explains it.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.protocol import ClientInfo, FederatedAlgorithm, ServerInfo
from fedjax_sim.client_data import ClientData, gather_clients
from fedjax_sim.errors import FedSimError


def concrete(x: Any) -> bool:
  """Whether ``x`` is a concrete value (a number or array, not a traced array).

  Constructors check their knobs' ranges only on concrete values: inside a
  vectorized sweep the knobs arrive as traced arrays (each point's value was
  checked on its own before the sweep traced them).
  """
  return not isinstance(x, jax.core.Tracer)

GUIDE = "docs/writing_an_algorithm.md"


class AlgorithmError(FedSimError, TypeError):
  """A FederatedAlgorithm breaks the contract (see the guide)."""


def _non_arrays(tree: Any, what: str) -> None:
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if not isinstance(leaf, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
      raise AlgorithmError(
          f"{what}{jax.tree_util.keystr(path)} is a {type(leaf).__name__}, not an array: "
          "states must be pytrees of arrays so they can be jitted, sharded and checkpointed "
          f"(wrap numbers with jnp.asarray; keep config in the factory's closure). See {GUIDE}, "
          "'The contract'.")


_TRACING_ERRORS = (jax.errors.ConcretizationTypeError, jax.errors.TracerBoolConversionError,
                   jax.errors.TracerArrayConversionError, jax.errors.TracerIntegerConversionError,
                   jax.errors.UnexpectedTracerError)


def _first_line(err: BaseException) -> str:
  """The first non-empty line of an exception's message (the whole error stays chained)."""
  lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
  return lines[0] if lines else type(err).__name__


def _eval_shape(fn, args, tracing_msg, other_msg):
  """jax.eval_shape(fn, *args); JAX's value-as-Python-value errors become an
  AlgorithmError with ``tracing_msg + "JAX said: ..."``, other ValueErrors and
  TypeErrors one with ``other_msg(err)``; our own FedSimErrors pass through."""
  try:
    return jax.eval_shape(fn, *args)
  except _TRACING_ERRORS as err:
    raise AlgorithmError(f"{tracing_msg} JAX said: {_first_line(err)}") from err
  except FedSimError:  # our own errors already name the problem and the fix
    raise
  except (ValueError, TypeError) as err:
    raise AlgorithmError(other_msg(err)) from err


def _shapes(tree):
  return jax.tree.map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype)), tree)


def _abstract_query(client_query, k, cstate, cdata):
  """A stand-in for ``ServerInfo.query`` over k zero-filled clients (for tracing only)."""
  def ask(q):
    zeros = lambda t: jax.tree.map(lambda a: jnp.zeros((k, *a.shape), a.dtype), t)
    infos = ClientInfo(jnp.zeros((k,), jnp.int32), jnp.zeros((k,), jnp.int32),
                       jnp.ones((k,), bool))
    return jax.vmap(client_query, in_axes=(None, 0, 0, 0))(q, zeros(cstate), zeros(cdata), infos)
  return ask


def check_algorithm(algorithm: FederatedAlgorithm, state: Any, data: ClientData,
                    clients_per_round: int = 2) -> None:
  """Traces ``client_update`` and ``server_update`` abstractly and checks the contract.

  Args:
    algorithm: the algorithm (single pool; pooled algorithms are checked per pool).
    state: a SimState from ``init_state``.
    data: ClientData [C, N, ...].
    clients_per_round: K, the stacked cohort size the server update is traced
      with. Pass the sampler's K (``sampler.clients_per_round``) for
      algorithms whose server state has [K]-shaped arrays (FedMDFG); the
      default 2 suits algorithms that accept any cohort size.

  Raises:
    AlgorithmError: a non-array in a state; Python control flow or shapes that
      depend on a client's values; a client update that changes the shape of
      the client state; non-scalar metrics; a server update that changes the
      server state's structure; a ValueError or TypeError raised while
      tracing ``client_update`` (e.g. data shapes it rejects) or
      ``server_update`` (e.g. a cohort of ``clients_per_round`` slots that
      does not match the K the algorithm was built with), with the original
      message.
  """
  _non_arrays(state.server, "server state")
  _non_arrays(state.clients, "client state")
  if algorithm.pools:
    return
  one = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), t)
  cstate = one(state.clients)
  cdata = jax.eval_shape(lambda d: gather_clients(d, jnp.int32(0)), data)  # either storage
  info = ClientInfo(jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32),
                    jax.ShapeDtypeStruct((), jnp.bool_))
  key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  upload, new_cstate, metrics = _eval_shape(
      algorithm.client_update, (algorithm.broadcast(state.server), cstate, cdata, key, info),
      f"client_update of '{algorithm.name}' uses a client's VALUES where JAX needs static "
      "Python values (an `if` on an array, a shape from num_examples, float()/int() of an "
      "array, or a tracer stored outside the function). Every client runs the same "
      "program under vmap: use jnp.where / lax.cond for branches, masks for sizes, and "
      f"return values instead of storing them. See {GUIDE}, 'The contract'.",
      lambda err: f"client_update of '{algorithm.name}' raised {type(err).__name__} when traced "
      f"with one client's data {_shapes(cdata)}: {_first_line(err).rstrip('.')}. Fix the data "
      f"layout or the algorithm's settings the message names. See {GUIDE}, 'The contract'.")
  if _shapes(new_cstate) != _shapes(cstate):
    raise AlgorithmError(
        f"client_update of '{algorithm.name}' returns a client state of shapes "
        f"{_shapes(new_cstate)} but receives {_shapes(cstate)}: per-client state is stacked "
        f"[C, ...], so its shape and dtype must not change. See {GUIDE}, 'Per-client state'.")
  bad = {k: v.shape for k, v in metrics.items() if v.shape != ()}
  if bad:
    raise AlgorithmError(f"client_update of '{algorithm.name}' returns non-scalar metrics {bad};"
                         f" return float32 scalars. See {GUIDE}, 'The contract'.")
  k = max(int(clients_per_round), 1)
  stack = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct((k, *a.shape), a.dtype), t)
  ask = (None if algorithm.client_query is None
         else _abstract_query(algorithm.client_query, k, new_cstate, cdata))
  sinfo = ServerInfo(jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((k,), jnp.int32),
                     jax.ShapeDtypeStruct((k,), jnp.int32), jax.ShapeDtypeStruct((k,), jnp.bool_))
  server_update = lambda s, u, w, si, r: algorithm.server_update(s, u, w, si._replace(query=ask), r)
  new_server, _ = _eval_shape(
      server_update, (state.server, stack(upload), jax.ShapeDtypeStruct((k,), jnp.float32),
                      sinfo, key),
      f"server_update of '{algorithm.name}' uses array values as Python values; see {GUIDE}, "
      "'The contract'.",
      lambda err: f"server_update of '{algorithm.name}' raised {type(err).__name__} when traced "
      f"with a cohort of {k} slots (check_algorithm's clients_per_round={clients_per_round}): "
      f"{_first_line(err).rstrip('.')}. If the algorithm was built for another cohort size "
      "K, call check_algorithm(..., clients_per_round=K) with the sampler's K "
      f"(sampler.clients_per_round); otherwise fix the server update. See {GUIDE}, "
      "'The contract'.")
  if _shapes(new_server) != _shapes(state.server):
    raise AlgorithmError(
        f"server_update of '{algorithm.name}' changes the server state's structure or shapes "
        f"(was {_shapes(state.server)}, now {_shapes(new_server)}); it must return the same "
        f"pytree. See {GUIDE}, 'The contract'.")
