"""/v1/jobs/{id}/model and /predict: a succeeded job's trained model, as a
file and as predictions."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import FileResponse

from core.mlp import MLP
from core.trainer import predicted_labels
from service.bodies import Predict, RawJSON, documented, validated
from service.deps import JobDep, SettingsDep, require_token
from service.jsonable import json_safe
from service.settings import Settings

router = APIRouter(prefix="/v1/jobs", tags=["models"], dependencies=[Depends(require_token)])


def _model_file(job: dict, settings: Settings, needs: str) -> Path:
    path = settings.model_path(job["id"])
    if job["state"] != "succeeded" or not path.exists():
        raise HTTPException(409, f"job {job['id']} is {job['state']}; {needs}")
    return path


@lru_cache(maxsize=32)
def _load(path: Path) -> MLP:
    return MLP.load(path)


def trained_model(job: JobDep, settings: SettingsDep) -> MLP:
    """The succeeded job's network (kept loaded: the last 32 used), or a 409."""
    return _load(_model_file(job, settings, "predictions need a succeeded job"))


@router.get("/{job_id}/model", summary="The trained model file (MLP.save format)")
def model(job_id: str, job: JobDep, settings: SettingsDep):
    path = _model_file(job, settings, "a model exists only once it has succeeded")
    return FileResponse(path, media_type="application/octet-stream", filename=f"{job_id}.npz")


@router.post("/{job_id}/predict", openapi_extra=documented(Predict),
             summary='Predict: {"rows": [[...], ...]} -> {"outputs", "labels"}')
def predict(job_id: str, _: JobDep, raw: RawJSON, net: Annotated[MLP, Depends(trained_model)], settings: SettingsDep):
    sizes = net.config["sizes"]
    rows = validated(Predict, raw, width=sizes[0], widest=max(sizes), max_values=settings.max_predict_values).rows
    outputs = np.asarray(net.predict(np.asarray(rows, dtype=np.float64)), dtype=float)
    result = {"outputs": outputs.tolist(), "labels": None}
    if net.config.get("loss") == "cross_entropy":
        result["labels"] = predicted_labels(outputs).tolist()
    return json_safe(result)
