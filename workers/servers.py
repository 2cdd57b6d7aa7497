"""The parameter-server group: the k actors that hold a job's parameters.

`resources.parameter_servers: k` splits the flat parameter vector into k
contiguous slices, one ParameterServer each. This group starts them (from
parameters and an optimizer state, or from a checkpoint), restores them after
a failure, tells where they are and which version they hold, and joins their
slices back into one vector and one state — the only place that knows there
may be more than one.
"""

from __future__ import annotations

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from core.health import Bounds
from core.spec import JobSpec
from core.trainer import TrainingError
from workers.checkpoint import Checkpoint
from workers.parameter_server import ParameterServer, slice_bounds
from workers.protocol import ServerLocation, ServerState
from workers.runtime import ALIVE_TIMEOUT_S, kill_actor

STARTS_PER_GROUP = 3  # tries at starting the servers when they die starting


class ServerGroup:
    def __init__(self, spec: JobSpec, layers: Bounds = ()):
        self.spec = spec
        self.layers = list(layers)  # each server measures the step's health over these (core.health)
        self.actors: list = []
        self.locations: list[ServerLocation] = []
        self.epoch = 0  # the job's membership epoch, given to every server started (workers.fencing)

    def start(self, state: ServerState) -> None:
        """Start k servers holding the slices of `state` (killing any before).
        Servers lost while starting (their node cut off, say) are started
        again, elsewhere once Ray has declared that node dead, up to
        STARTS_PER_GROUP times."""
        for attempt in range(1, STARTS_PER_GROUP + 1):
            try:
                return self._start_once(state)
            except RayActorError as err:
                if err.actor_init_failed or attempt == STARTS_PER_GROUP:
                    raise TrainingError(f"the parameter servers could not start ({attempt} tries): "
                                        f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None

    def _start_once(self, state: ServerState) -> None:
        self.kill()
        bounds = slice_bounds(state.params.size, self.spec.resources.parameter_servers)
        parts = [state.slice(a, b) for a, b in bounds]
        self.actors = [ParameterServer.options(name=None).remote(
            self.spec, j, part.params, a, b, part.version, dict(part.optimizer) or None, self.layers, self.epoch)
            for j, ((a, b), part) in enumerate(zip(bounds, parts))]
        self.locations = ray.get([s.location.remote() for s in self.actors])

    def restore(self, ckpt: Checkpoint) -> None:
        self.start(ServerState(ckpt.params, ckpt.optimizer, ckpt.step))

    def publish(self) -> list:
        """Refs to the current parameter slices, in order."""
        return [s.publish.remote() for s in self.actors]

    @staticmethod
    def fetch(refs: list) -> np.ndarray:
        """The whole vector from refs to its slices."""
        slices = ray.get(refs)
        return np.concatenate(slices) if len(slices) > 1 else np.array(slices[0])

    def state(self) -> ServerState:
        """The whole vector's state (a round trip to every server)."""
        return ServerState.join(tuple(ray.get([s.state.remote() for s in self.actors])))

    def fence(self, epoch: int) -> list:
        """Tell every server the job's membership epoch; what they refused
        before (StaleRefused events). A server that does not answer is
        found by the next step; it still runs this call before that step's."""
        self.epoch = epoch
        return self._ask([s.fence.remote(epoch) for s in self.actors])

    def refusals(self) -> list:
        """What the servers refused since they were last asked."""
        return self._ask([s.refusals.remote() for s in self.actors])

    @staticmethod
    def _ask(refs: list) -> list:
        refused = []
        for ref in refs:
            try:
                refused.extend(ray.get(ref, timeout=ALIVE_TIMEOUT_S))
            except (RayActorError, RayTaskError, GetTimeoutError):
                pass
        return refused

    def node_ids(self) -> set[str]:
        return {loc.node_id for loc in self.locations}

    def alive(self) -> bool:
        try:
            ray.get(self.publish(), timeout=ALIVE_TIMEOUT_S)
            return True
        except (RayActorError, RayTaskError, GetTimeoutError):
            return False

    def ahead_of(self, version: int) -> bool:
        """Whether any server holds another version than `version` (it applied
        steps whose results were lost), or cannot say."""
        try:
            return any(loc.version != version for loc in
                       ray.get([s.location.remote() for s in self.actors], timeout=ALIVE_TIMEOUT_S))
        except (RayActorError, RayTaskError, GetTimeoutError):
            return True

    def kill(self) -> None:
        for s in self.actors:
            kill_actor(s)
        self.actors = []
