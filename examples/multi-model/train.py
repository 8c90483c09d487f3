"""Train two models on scikit-learn's bundled diabetes data: a Ridge and a Lasso.

Writes models/ridge.pkl and models/lasso.pkl beside this script (whatever the cwd).
Deterministic: same data, same fits, same files.

    python train.py
"""

from pathlib import Path

import joblib
from sklearn.datasets import load_diabetes
from sklearn.linear_model import Lasso, Ridge

HERE = Path(__file__).resolve().parent
MODELS = {
    "ridge": Ridge(alpha=0.1),
    "lasso": Lasso(alpha=0.1),
}


def main() -> None:
    X, y = load_diabetes(return_X_y=True)  # bundled with scikit-learn, no download
    out_dir = HERE / "models"
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, estimator in MODELS.items():
        model = estimator.fit(X, y)
        out = out_dir / f"{name}.pkl"
        joblib.dump(model, out)
        print(f"wrote {out} ({type(model).__name__}, R^2 on training data {model.score(X, y):.3f})")


if __name__ == "__main__":
    main()
