"""A job that keeps killing the service cannot crash-loop it: a job found
`running` at start is resumed at most max_resumes (3) times, then failed with
the reason, and the job queued behind it still runs."""

from __future__ import annotations

import httpx
import pytest

from service_helpers import ServiceProcess, tiny_spec, wait_for, wait_state


@pytest.mark.ray
@pytest.mark.slow
def test_a_job_running_at_each_of_four_deaths_is_failed_and_the_queue_goes_on(tmp_path, ray_local):
    store = tmp_path / "store" / "shardprop.db"
    store.parent.mkdir()
    args = ["--ray-address", ray_local, "--data-root", str(tmp_path)]
    poison = tiny_spec(steps=100000, checkpoint_every=20, eval_every=0)

    def running_job(url: str, job_id: str, resumes: int) -> bool:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
        return job["state"] == "running" and job["resumes"] == resumes

    first = ServiceProcess(store, *args).start()
    try:
        job = httpx.post(f"{first.url}/v1/jobs", json=poison).json()
        behind = httpx.post(f"{first.url}/v1/jobs", json=tiny_spec(steps=5)).json()
        wait_for(lambda: running_job(first.url, job["id"], 0), 90, what="the job to run")
    finally:
        first.kill()  # death 1
    for resumes in (1, 2, 3):
        again = ServiceProcess(store, *args).start()
        try:
            wait_for(lambda: running_job(again.url, job["id"], resumes), 90, what=f"resume {resumes}",
                     diagnose=again.diagnose)
        finally:
            again.kill()  # deaths 2, 3, 4
    last = ServiceProcess(store, *args).start()
    try:
        failed = wait_state(last.url, job["id"], timeout=60)
        assert failed["state"] == "failed" and failed["resumes"] == 3
        assert failed["error"] == ("the service stopped 4 times while running this job (it was resumed 3 times; "
                                   "max_resumes is 3)")
        assert [t["to"] for t in failed["transitions"]] == ["queued", "running", "failed"]
        assert wait_state(last.url, behind["id"], timeout=120)["state"] == "succeeded"
    finally:
        last.stop()
