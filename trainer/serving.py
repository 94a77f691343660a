"""The logged model: raw digits in, the class and its probabilities out (an MLflow pyfunc model).

It takes digits as a user has them, MNIST-style (a light digit on a dark background, 28x28): uint8
or float, 0-255 or 0-1, shape (N, 28, 28) or (N, 1, 28, 28); it standardises them like training
does and returns {"class": int64 (N,), "probabilities": float32 (N, 10)}. A float batch whose largest
value is at most 1 is read as 0-1, any other as 0-255.

The network is saved as a torch.export program (a graph and its weights, no pickled Python classes),
the model object is built at load time by `logged_model.py` (MLflow's "models from code", no pickle
either), and this package travels inside the model (`code/trainer`), so loading it needs torch, numpy
and mlflow only. The signature declares the outputs; it declares no input schema because MLflow enforces
one dtype and one rank exactly, which would refuse the forms above (the MLmodel's metadata and the
input example, two real test digits, say what goes in). Models logged before this one (the pytorch
flavour: normalised float32 (N, 1, 28, 28) in, logits out) still load: `probabilities` handles both.
"""

import tempfile
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from trainer.data import MNIST_MEAN, MNIST_STD

PROGRAM = "program.pt2"
INPUT = "MNIST-style digits (light on dark, 28x28): uint8 or float, 0-255 or 0-1, shape (N, 28, 28) or (N, 1, 28, 28)"
OUTPUT = "class: int64 (N,); probabilities: float32 (N, 10), the softmax of the class scores"
SIGNATURE = ModelSignature(
    outputs=Schema(
        [TensorSpec(np.dtype(np.int64), (-1,), "class"), TensorSpec(np.dtype(np.float32), (-1, 10), "probabilities")]
    )
)


def standardize(digits) -> torch.Tensor:
    """Digits in any accepted form as the network's input: float32 (N, 1, 28, 28), standardised by
    the MNIST mean and std. Anything else raises a one-line MlflowException naming what was wrong."""
    x = np.asarray(digits)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1:] != (1, 28, 28) or len(x) == 0:
        raise MlflowException.invalid_parameter_value(
            f"expected digits of shape (N, 28, 28) or (N, 1, 28, 28), got {np.shape(digits)}"
        )
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise MlflowException.invalid_parameter_value(f"expected numbers (uint8 or float), got dtype {x.dtype}")
    low, high = x.min(), x.max()  # NaN compares false: refused below
    if not (low >= 0 and high <= 255):
        raise MlflowException.invalid_parameter_value(f"pixel values must lie in 0-255 or 0-1, got {low} to {high}")
    pixels = torch.from_numpy(np.ascontiguousarray(x)).float()
    if np.issubdtype(x.dtype, np.integer) or high > 1:
        pixels = pixels / 255.0
    return (pixels - MNIST_MEAN) / MNIST_STD


class DigitClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.network = torch.export.load(context.artifacts["program"]).module()

    def predict(self, context, model_input: np.ndarray, params=None):
        with torch.inference_mode():
            probabilities = torch.softmax(self.network(standardize(model_input)), dim=1).numpy()
        return {"class": probabilities.argmax(1), "probabilities": probabilities}


def log_model(model: torch.nn.Module, example: np.ndarray) -> None:
    """Log `model` (in eval mode; moved to the CPU in the default layout) as the run's `model`, with
    `example` (uint8 (N, 28, 28) real digits, N >= 2 so that the batch size stays dynamic) as its
    input example."""
    model = model.cpu().to(memory_format=torch.contiguous_format).eval()  # channels_last makes torch.export warn
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (standardize(example),), dynamic_shapes=({0: batch},))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / PROGRAM
        torch.export.save(program, path)
        mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__).with_name("logged_model.py")),
            artifacts={"program": str(path)},
            code_paths=[str(Path(__file__).parent)],
            signature=SIGNATURE,
            input_example=example,
            metadata={"input": INPUT, "output": OUTPUT},
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
        )


def model_uri(model: str) -> str:
    """A run id means that run's model; anything else (runs:/, models:/, a folder) is an MLflow model URI."""
    return model if ":/" in model or Path(model).is_dir() else f"runs:/{model}/model"


def probabilities(model: mlflow.pyfunc.PyFuncModel, digits: np.ndarray) -> np.ndarray:
    """Class probabilities (N, 10) for uint8 digits (N, 28, 28), from this module's model or from one
    logged before it with the pytorch flavour (normalised input, class scores out)."""
    if model.metadata.flavors["python_function"]["loader_module"] == "mlflow.pytorch":
        scores = torch.from_numpy(model.predict(standardize(digits).numpy()))
        return torch.softmax(scores.float(), dim=1).numpy()
    return model.predict(digits)["probabilities"]
