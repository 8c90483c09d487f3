"""Train the example model and convert it to ONNX: iris flowers, logistic regression.

Writes models/iris.onnx beside this script (whatever the cwd). Needs scikit-learn and
skl2onnx; the service itself needs only onnxruntime. Deterministic: same data, same fit
(lbfgs from zero), same model.

    python train.py
"""

from pathlib import Path

import numpy as np
from skl2onnx import to_onnx
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

HERE = Path(__file__).resolve().parent
OUT = HERE / "models" / "iris.onnx"
OPSET = 17  # understood by every onnxruntime since 1.14


def main() -> None:
    X, y = load_iris(return_X_y=True)  # bundled with scikit-learn, no download
    model = LogisticRegression(max_iter=500).fit(X, y)
    # NOTE: zipmap=False gives the probabilities as an [N, 3] array rather than one
    # {class: probability} map per row: simpler JSON for the clients.
    onx = to_onnx(model, X[:1].astype(np.float32), target_opset=OPSET,
                  options={id(model): {"zipmap": False}})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_bytes(onx.SerializeToString())
    print(f"wrote {OUT} (LogisticRegression, accuracy on training data {model.score(X, y):.3f})")


if __name__ == "__main__":
    main()
