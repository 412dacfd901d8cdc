"""The registered model as MLflow loads it: raw rows (or images) in, labels and probabilities out.

An MLflow "model from code" file: MLflow copies it into the model and runs it when the model is
loaded. The model holds three things, none of them pickled: this file and tasks/rowcodec.py (the
encoding's code, shipped with `code_paths`), the training run's schema.json (the fitted encoding,
as data) and network.pt2 (the trained network as a torch.export program, which torch loads
without the Python class that defined it). So `mlflow.pyfunc.load_model(uri).predict(frame)` works
where Trainyard is not installed, with the model's pinned requirements (torch, numpy, pandas,
mlflow) alone, and `mlflow models serve` serves it as it is.

A table model takes a DataFrame of raw rows (the training file's feature columns; others are
ignored) and returns `prediction` (the label, in the target's own classes) with one
`probability_<class>` column per class, or `prediction` in the target's unit. An image model takes
28x28 images (uint8 0-255, or floats 0-1; with or without the channel axis; a batch or one image)
and returns the digit and ten probabilities.
"""

from __future__ import annotations

import json
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel

try:  # inside the logged model: code/rowcodec.py is on the path
    import rowcodec
except ImportError:  # in Trainyard's own process (logging, tests)
    from tasks import rowcodec

BATCH_ROWS = 65536  # rows per forward pass: bounds the memory of a large frame


class TrainyardModel(PythonModel):
    """The network between the training run's encoding and the decoding of its outputs."""

    def load_context(self, context) -> None:
        with open(context.artifacts["schema"], encoding="utf-8") as f:
            self.schema: dict[str, Any] = json.load(f)
        self.network = torch.export.load(context.artifacts["network"]).module()
        if self.schema.get("source") == "mnist":
            self.kind = "image"
            self.columns, self.column_types = [], {}
            self.output_columns = [rowcodec.PREDICTION, *(f"{rowcodec.PROBABILITY}{d}" for d in range(10))]
        else:
            self.kind = "table"
            self.codec = rowcodec.RowCodec(self.schema)
            self.columns, self.column_types = self.codec.columns, self.codec.column_types
            self.output_columns = self.codec.output_columns

    # The signature is the model's own (the raw columns); a DataFrame hint is one MLflow infers nothing from, so
    # it neither validates by the hint nor warns for want of one. An image model takes arrays as well.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if self.kind == "image":
            return self._images(model_input)
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        return self.score(frame)[0]

    def score(self, frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any]]:
        """A table's predictions and what the encoding met (rows with missing values, unseen categories)."""
        x, report = self.codec.encode(frame)
        return self.codec.decode(self._forward(x)), report.to_dict()

    def _forward(self, x: np.ndarray) -> np.ndarray:
        """The network's outputs, BATCH_ROWS rows at a time."""
        outputs = []
        with torch.no_grad():
            for start in range(0, max(len(x), 1), BATCH_ROWS):
                batch = torch.from_numpy(np.ascontiguousarray(x[start : start + BATCH_ROWS]))
                outputs.append(self.network(batch).to(torch.float64).numpy())
        return np.concatenate(outputs) if len(x) else np.empty((0, int(self.schema["output_size"])))

    def _images(self, images: Any) -> pd.DataFrame:
        """Digits and their probabilities for 28x28 images, normalised as the training data were."""
        x = _image_batch(images)
        norm = self.schema["normalize"]
        scale = norm["scale"] if x.dtype != torch.float32 else 1.0  # integers are 0-255, floats 0-1
        std, mean = float(norm["std"][0]), float(norm["mean"][0])
        a = torch.tensor(scale / std, dtype=torch.float64).to(torch.float32)
        b = torch.tensor(-mean / std, dtype=torch.float64).to(torch.float32)
        inputs = torch.addcmul(b, x.to(torch.float32), a)  # as tasks/data.py's Normalize
        outputs = self._forward(inputs.numpy())
        probabilities = rowcodec.softmax(outputs)
        frame = pd.DataFrame({rowcodec.PREDICTION: outputs.argmax(axis=1).astype(np.int64)})
        for digit in range(probabilities.shape[1]):
            frame[f"{rowcodec.PROBABILITY}{digit}"] = probabilities[:, digit]
        return frame


def _image_batch(images: Any) -> torch.Tensor:
    """Images as an (N, 1, 28, 28) tensor: uint8 (integers 0-255) or float32 (0-1); one line when they are not."""
    if isinstance(images, pd.DataFrame):
        images = images.to_numpy()
    array = np.asarray(images)
    if array.ndim >= 1 and array.shape[-1] == 784 and array.ndim <= 2:  # flattened rows of pixels
        array = array.reshape(-1, 28, 28)
    if array.shape[-2:] != (28, 28) or array.ndim not in (2, 3, 4) or (array.ndim == 4 and array.shape[1] != 1):
        raise rowcodec.InputError(
            f"expected 28x28 images, shaped (28, 28), (N, 28, 28) or (N, 1, 28, 28); got shape {array.shape}"
        )
    array = array.reshape(-1, 1, 28, 28)
    if array.dtype.kind in "iub":
        if array.size and (array.min() < 0 or array.max() > 255):
            raise rowcodec.InputError(
                f"expected pixel values 0-255 in integer images; got {array.min()}..{array.max()}"
            )
        return torch.from_numpy(array.astype(np.uint8))
    if array.dtype.kind != "f":
        raise rowcodec.InputError(f"expected images of numbers (uint8 0-255 or floats 0-1); got dtype {array.dtype}")
    if array.size and (np.nanmin(array) < 0 or np.nanmax(array) > 1 or np.isnan(array).any()):
        raise rowcodec.InputError(
            f"expected float pixel values 0-1 (or uint8 0-255); got {np.nanmin(array)}..{np.nanmax(array)}"
        )
    return torch.from_numpy(array.astype(np.float32))


mlflow.models.set_model(TrainyardModel())
