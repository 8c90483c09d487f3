"""Train the demo model: a Ridge regression on scikit-learn's bundled diabetes data.

Writes models/sklearn_regression_model.pkl beside this script (whatever the cwd).
Deterministic: same data, same closed-form fit, same model.

    python train.py
"""

from pathlib import Path

import joblib
from sklearn.datasets import load_diabetes
from sklearn.linear_model import Ridge

HERE = Path(__file__).resolve().parent
OUT = HERE / "models" / "sklearn_regression_model.pkl"


def main() -> None:
    X, y = load_diabetes(return_X_y=True)  # bundled with scikit-learn, no download
    model = Ridge(alpha=0.1).fit(X, y)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, OUT)
    print(f"wrote {OUT} (Ridge alpha=0.1, R^2 on training data {model.score(X, y):.3f})")


if __name__ == "__main__":
    main()
