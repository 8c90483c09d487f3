"""Entry script for a service with two models, in Azure ML v1 style.

Each model is found by name through azureml.core.model.Model.get_model_path, which the
mlbuild runtime provides (under $MLBUILD_MODEL_DIR/NAME/VERSION/...).
Request body: {"data": [[10 floats], ...]}. Response: {"ridge": [...], "lasso": [...]}.
Exceptions propagate; the serving runtime turns them into a 500.
"""

import json
import os

import joblib
import numpy as np
from azureml.core.model import Model

models = {}


def _load(name):
    path = Model.get_model_path(model_name=name)
    if os.path.isdir(path):  # a folder: the model's one file is inside it
        path = os.path.join(path, f"{name}.pkl")
    return joblib.load(path)


def init():
    global models
    models = {name: _load(name) for name in ("ridge", "lasso")}


def run(raw_data):
    data = np.array(json.loads(raw_data)["data"], dtype=float)
    return {name: model.predict(data).tolist() for name, model in models.items()}
