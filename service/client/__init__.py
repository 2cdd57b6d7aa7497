"""The Python client of a shardprop service, for notebooks and scripts (the
`shardprop` command uses it too):

    from service.client import Client

    with Client("http://127.0.0.1:8470") as client:
        job = client.submit("examples/digits.yaml")
        job.wait()
        print(job.dataframe().tail())

`connection` is the HTTP client, `job` the handle on one job, `errors` the
typed exceptions, `specs` what a spec may be given as, `diff` the
comparison of two runs. docs/client.md has the whole API.
"""

from service.client.connection import DEFAULT_SERVER, Client
from service.client.diff import RunDiff
from service.client.errors import (Busy, Conflict, Forbidden, JobCancelled, JobEnded, JobFailed, NotFound, Refused,
                                   ShardpropError, Timeout, TooLarge, Unauthorized, Unavailable, Unreachable)
from service.client.job import Job
from service.client.specs import SpecFileError, load_spec
from service.client.sweep import Sweep

ClientError = ShardpropError  # the name before typed errors

__all__ = ["DEFAULT_SERVER", "Client", "Job", "Sweep", "RunDiff", "load_spec", "ShardpropError", "ClientError",
           "Unreachable", "Unauthorized", "Forbidden", "NotFound", "Conflict", "TooLarge", "Refused", "Busy",
           "Unavailable", "JobEnded", "JobFailed", "JobCancelled", "Timeout", "SpecFileError"]
