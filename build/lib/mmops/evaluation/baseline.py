"""The classical baseline every retrain fits on the same splits, and the check for a model that
learnt nothing.

Features: the image downsampled to `evaluate.baseline.image_size` pixels a side (RGB, in [0, 1])
and a binary bag of words and bigrams from the train texts; a missing image or text is all zeros.
Two scikit-learn candidates are fitted: a logistic regression (fast, as good as anything on
datasets a linear model can separate) and a one-hidden-layer MLP (which can model a label that
needs the image and the text together, where the linear model stays near chance). The one with
the better val accuracy is scored on the test split the model is evaluated on.
"""

from __future__ import annotations

import json
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score, f1_score

from mmops.config import BaselineConfig, Params
from mmops.data.dataset import load_splits, split_rows
from mmops.evaluation.records import BaselineResult, Underfit
from mmops.model.image_processing import ImageSpec
from mmops.model.preprocess import open_image
from mmops.training.history import CURVE_COLUMNS, HISTORY_FILE
from mmops.training.progress import chance_noise

CANDIDATES = ("logistic", "mlp")
# Rows each candidate is fitted on (and chosen on, from val), whatever the dataset's size: the
# whole baseline on 30k demo rows (20k fitted on) took under 30 s on one core, in 0.7 GB.
MAX_FIT_ROWS = 20_000
TEXT = "text"
_WORD = re.compile(r"\w")


def fit_baseline(data_dir: Path | str, params: Params) -> BaselineResult:
    """Fit both candidates on train, keep the better on val, score it on the test split."""
    cfg = params.evaluate.baseline
    start = time.perf_counter()
    frame = load_splits(data_dir, params)
    rng = np.random.default_rng(cfg.seed)
    train, val, test = (
        split_rows(frame, split, data_dir, needed_by="the baseline")
        for split in ("train", "val", "test")
    )
    train, val = _at_most(train, MAX_FIT_ROWS, rng), _at_most(val, MAX_FIT_ROWS, rng)
    x_train, x_val, x_test = (
        baseline_inputs(rows, data_dir, cfg.image_size) for rows in (train, val, test)
    )
    y_train, y_val, y_test = (rows["label"].astype(str) for rows in (train, val, test))
    with_text = any(isinstance(t, str) and _WORD.search(t) for t in train[TEXT])
    fitted, val_accuracy = {}, {}
    for kind in CANDIDATES:
        pipeline = build_pipeline(kind, cfg, pixel_columns(cfg.image_size), with_text)
        with warnings.catch_warnings():
            # Iterations are capped on purpose: a baseline, not a tuned model.
            warnings.simplefilter("ignore", ConvergenceWarning)
            fitted[kind] = pipeline.fit(x_train, y_train)
        val_accuracy[kind] = float(accuracy_score(y_val, pipeline.predict(x_val)))
    kind = max(CANDIDATES, key=lambda k: val_accuracy[k])  # a tie keeps the simpler model
    predicted = fitted[kind].predict(x_test)
    return BaselineResult(
        kind=kind,
        val_accuracy=val_accuracy[kind],
        test_accuracy=float(accuracy_score(y_test, predicted)),
        test_macro_f1=float(f1_score(y_test, predicted, average="macro", zero_division=0)),
        candidates=val_accuracy,
        train_examples=len(train),
        n_features=int(fitted[kind].named_steps["scale"].n_features_in_),
        seconds=time.perf_counter() - start,
        pipeline=fitted[kind],
    )


def _at_most(rows: pd.DataFrame, limit: int, rng: np.random.Generator) -> pd.DataFrame:
    if len(rows) <= limit:
        return rows
    keep = np.sort(rng.choice(len(rows), limit, replace=False))
    return rows.iloc[keep].reset_index(drop=True)


def pixel_columns(image_size: int) -> list[str]:
    return [f"px{i}" for i in range(image_size * image_size * 3)]


def baseline_inputs(rows: pd.DataFrame, data_dir: Path | str, image_size: int) -> pd.DataFrame:
    """What the baseline pipeline takes: a `text` column ("" when missing) and the pixels of the
    image downsampled to `image_size` a side, RGB in [0, 1] (zeros when missing)."""
    root = Path(data_dir)
    pixels = np.zeros((len(rows), image_size * image_size * 3), dtype=np.float32)
    for i, source in enumerate(rows["image"]):
        if isinstance(source, str):
            # BOX: each feature pixel is the mean of the block it covers (of a big JPEG
            # decoded at reduced size, as the model's input is).
            image = open_image(root / source, spec=ImageSpec.default(image_size))
            small = image.resize((image_size, image_size), Image.Resampling.BOX)
            pixels[i] = np.asarray(small, dtype=np.float32).reshape(-1) / 255.0
    texts = [t if isinstance(t, str) else "" for t in rows[TEXT]]
    frame = pd.DataFrame(pixels, columns=pixel_columns(image_size))
    frame.insert(0, TEXT, texts)
    return frame


def build_pipeline(kind: str, cfg: BaselineConfig, pixels: list[str], with_text: bool) -> Any:
    """Features, standardised, then the classifier `kind` (one of CANDIDATES)."""
    from sklearn.compose import ColumnTransformer
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    parts: list[tuple[str, Any, Any]] = [("image", "passthrough", pixels)]
    if with_text:  # a vocabulary needs at least one word among the train texts
        # Single-character tokens too: digits and one-letter words carry meaning in instructions.
        words = CountVectorizer(
            binary=True,
            ngram_range=(1, 2),
            max_features=cfg.max_vocab,
            token_pattern=r"(?u)\b\w+\b",
            dtype=np.float32,  # with the float32 pixels: half the memory of a dense float64 matrix
        )
        parts.insert(0, ("text", words, TEXT))
    features = ColumnTransformer(parts, sparse_threshold=0.0)
    # Iterations capped so that MAX_FIT_ROWS fit in well under a minute: a baseline, not a tuned
    # model (on demo data, logistic at 100 iterations was as accurate as at 300).
    if kind == "logistic":
        model: Any = LogisticRegression(C=0.1, max_iter=100, random_state=cfg.seed)
    elif kind == "mlp":
        model = MLPClassifier(
            hidden_layer_sizes=(256,),
            alpha=1e-3,
            early_stopping=True,
            max_iter=60,
            random_state=cfg.seed,
        )
    else:
        raise ValueError(f"baseline kind {kind!r} is not one of {CANDIDATES}")
    return Pipeline([("features", features), ("scale", StandardScaler()), ("classify", model)])


def underfit(
    accuracy: float, label_counts: Mapping[str, int], curve: Sequence[Mapping[str, float]] = ()
) -> Underfit | None:
    """An Underfit record when `accuracy` is not clearly above the majority class's share.

    Clearly: by two binomial standard errors of an accuracy at that share on this many examples
    (what chance alone could add), and never by less than 2 points.
    """
    n = sum(label_counts.values())
    if n == 0:
        return None
    chance = max(label_counts.values()) / n
    margin = max(0.02, chance_noise(chance, n))
    if accuracy > chance + margin:
        return None
    epochs = [dict(epoch) for epoch in curve]
    return Underfit(accuracy, chance, margin, underfit_hint(epochs, chance + margin), epochs)


def underfit_hint(curve: Sequence[Mapping[str, float]], threshold: float) -> str:
    """What to try, read from the training curve where there is one."""
    lines = ["No better than always answering the most common class."]
    if curve:
        train_accuracy = curve[-1].get("train_accuracy", 0.0)
        after = f"train accuracy {train_accuracy:.3f} after {len(curve)} epoch(s)"
        if train_accuracy <= threshold:
            lines.append(f"It has not learnt even its training data ({after}).")
        else:
            lines.append(f"It fits its training data ({after}) but not new data.")
        val = [epoch.get("val_accuracy", 0.0) for epoch in curve]
        if len(val) > 1 and val[-1] > max(val[:-1]):
            lines.append("Val accuracy was still rising at the last epoch.")
    lines.append(
        "Try a hyperparameter search (train.search.enabled=true, or `mmops tune`), more epochs "
        "(train.epochs), or a pretrained backbone (model.vision_pretrained, "
        "model.text_pretrained)."
    )
    return " ".join(lines)


def training_curve(model_dir: Path | str) -> list[dict[str, float]]:
    """The per-epoch history training wrote beside the model folder, or [] when there is none."""
    path = Path(model_dir).parent / HISTORY_FILE
    if not path.is_file():
        return []
    epochs = json.loads(path.read_text()).get("history", [])
    return [{k: float(e[k]) for k in CURVE_COLUMNS if k in e} for e in epochs]
