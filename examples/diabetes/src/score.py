"""Entry script in Azure ML v1 style: init() once, run(raw_data) per request.

Request body: {"data": [[10 floats], ...]} -- the ten (scaled) features of
sklearn.datasets.load_diabetes. Response: a list of predicted disease progressions.
Exceptions propagate; the serving runtime turns them into a 500.
"""

import json
import os

import joblib
import numpy as np

model = None


def init():
    global model
    model_dir = os.getenv("MLBUILD_MODEL_DIR") or os.getenv("AZUREML_MODEL_DIR")
    model = joblib.load(os.path.join(model_dir, "sklearn_regression_model.pkl"))


def run(raw_data):
    data = np.array(json.loads(raw_data)["data"], dtype=float)
    return model.predict(data).tolist()
