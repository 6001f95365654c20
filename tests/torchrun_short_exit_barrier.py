"""torchrun (python -m torch.distributed.run) whose agents wait EXIT_BARRIER_S seconds, not 300,
at their exit barrier for the other machines' agents: test_distributed.py shows with it that no
machine's torchrun has to wait there while rank 0 trains the prior."""
import os

from torch.distributed.elastic.agent.server import local_elastic_agent
from torch.distributed.run import main

real_init = local_elastic_agent.LocalElasticAgent.__init__


def init(self, *args, **kwargs):
    kwargs["exit_barrier_timeout"] = float(os.environ["EXIT_BARRIER_S"])
    real_init(self, *args, **kwargs)


local_elastic_agent.LocalElasticAgent.__init__ = init

if __name__ == "__main__":
    main()
