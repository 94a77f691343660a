"""The file MLflow runs to load a model logged by `trainer.serving.log_model` ("models from code": the
model is built by this code, not unpickled)."""

import mlflow

from trainer.serving import DigitClassifier

mlflow.models.set_model(DigitClassifier())
