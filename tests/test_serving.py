"""The logged model as a user meets it: registered as models:/mnist8k-step5@best, served over HTTP by a
real `mlflow models serve`, loaded in Python, and behind `trainer predict` for image and IDX files.

One short run (step5 on the first 2,048 train and test images, 2 epochs, no EMA so that 2 epochs learn
something) is logged for the whole module; its logged test accuracy is over exactly the digits sent."""

import gzip
import json
import struct
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
import torch
from click.testing import CliRunner
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image

import models
from trainer.cli import cli
from trainer.data import idx_images, load_mnist, normalize
from trainer.serving import standardize

N = 2048
MLFLOW = Path(sys.executable).parent / "mlflow"


@pytest.fixture(scope="module")
def store(data_dir, tmp_path_factory):
    """(tracking URI, the run, its test digits, their labels), with the run registered as the best step5."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('serving') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", uri)
        env.setenv("MLFLOW_EXPERIMENT_NAME", "serving")
        env.delenv("MLFLOW_RUN_ID", raising=False)
        # --no-amp: the served model computes in float32, so its accuracy equals a float32 run's logged one
        args = [
            "train",
            "--model",
            "step5",
            "--subset",
            N,
            "--epochs",
            2,
            "--ema",
            0,
            "--no-amp",
            "--data-dir",
            data_dir,
        ]
        result = CliRunner().invoke(cli, list(map(str, args)))
        assert result.exit_code == 0, result.output
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("serving").experiment_id])
        # `trainer register` takes full-data runs only; a real one trains for minutes, so this smoke run stands in
        client.set_tag(run.info.run_id, "subset", "full")
        result = CliRunner().invoke(cli, ["register"])
        assert result.exit_code == 0, result.output
        assert "models:/mnist8k-step5@best" in result.output and run.info.run_id in result.output
        images, labels = load_mnist(data_dir, train=False, subset=N)
        mlflow.set_tracking_uri(uri)
        yield uri, client.get_run(run.info.run_id), images.numpy(), labels.numpy()


def accuracy(classes, labels) -> float:
    """Computed as the run computed its logged test_acc."""
    return 100.0 * (np.asarray(classes) == labels).sum() / len(labels)


FORMS = {
    "uint8 (N, 28, 28)": lambda x: x,
    "uint8 (N, 1, 28, 28)": lambda x: x[:, None],
    "float 0-1 (N, 28, 28)": lambda x: x / 255.0,
    "float 0-1 (N, 1, 28, 28)": lambda x: (x / 255.0)[:, None].astype(np.float32),
    "float 0-255 (N, 28, 28)": lambda x: x.astype(np.float64),
}


@pytest.fixture(scope="module")
def server(store, http_server):
    """`mlflow models serve` on the registered alias, as the README starts it."""
    uri = store[0]
    cmd = [MLFLOW, "models", "serve", "-m", "models:/mnist8k-step5@best", "--env-manager", "local"]
    with http_server(cmd, {"MLFLOW_TRACKING_URI": uri}) as url:
        yield url


@pytest.mark.parametrize("form", FORMS)
def test_served_model_takes_raw_digits_in_every_form(server, store, form):
    _, run, images, labels = store
    body = json.dumps({"inputs": FORMS[form](images).tolist()})  # uint8 travels as JSON integers
    response = requests.post(f"{server}/invocations", data=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text[:500]
    predictions = response.json()["predictions"]
    probabilities = np.array(predictions["probabilities"])
    assert probabilities.shape == (N, 10) and np.allclose(probabilities.sum(1), 1, atol=1e-5)
    assert predictions["class"] == probabilities.argmax(1).tolist()
    assert accuracy(predictions["class"], labels) == run.data.metrics["test_acc"]


def test_served_model_refuses_a_wrong_shape_without_echoing_it(server):
    digits = np.random.default_rng(0).integers(0, 256, (4, 32, 32)).tolist()
    response = requests.post(f"{server}/invocations", json={"inputs": digits})
    assert response.status_code == 400
    message = response.json()["message"]
    assert "expected digits of shape (N, 28, 28) or (N, 1, 28, 28), got (4, 32, 32)" in message
    assert len(message) < 1000  # MLflow's own prefix shows a summary of the array, not its 4,096 values


@pytest.fixture(scope="module")
def model(store):
    return mlflow.pyfunc.load_model(f"runs:/{store[1].info.run_id}/model")


@pytest.mark.parametrize(
    "dtype, scale", [(np.uint8, 255), (np.int64, 255), (np.float32, 255), (np.float32, 1), (np.float64, 1)]
)
def test_python_model_takes_numpy_digits_of_any_dtype(store, model, dtype, scale):
    _, run, images, labels = store
    digits = (images / (255 / scale)).astype(dtype)[:, None]
    assert accuracy(model.predict(digits)["class"], labels) == run.data.metrics["test_acc"]


@pytest.mark.parametrize(
    "digits, message",
    [
        (np.zeros((3, 32, 32)), "expected digits of shape (N, 28, 28) or (N, 1, 28, 28), got (3, 32, 32)"),
        (np.zeros((28, 28)), "expected digits of shape (N, 28, 28) or (N, 1, 28, 28), got (28, 28)"),
        (np.full((2, 28, 28), 300.0), "pixel values must lie in 0-255 or 0-1, got 300.0 to 300.0"),
        (np.full((1, 28, 28), np.nan), "pixel values must lie in 0-255 or 0-1, got nan to nan"),
    ],
)
def test_wrong_input_gets_one_short_line(model, digits, message):
    with pytest.raises(MlflowException) as error:
        model.predict(digits)
    assert error.value.message == message


def test_signature_and_input_example_say_what_goes_in_and_out(store, model, data_dir):
    example = mlflow.models.Model.load(f"runs:/{store[1].info.run_id}/model").load_input_example()
    assert np.array_equal(example, load_mnist(data_dir, train=False, subset=2)[0].numpy())  # real digits: 7, 2
    outputs = {spec.name: (spec.type, spec.shape) for spec in model.metadata.signature.outputs.inputs}
    assert outputs == {"class": (np.dtype("int64"), (-1,)), "probabilities": (np.dtype("float32"), (-1, 10))}
    assert "uint8 or float, 0-255 or 0-1" in model.metadata.metadata["input"]


@pytest.fixture(scope="module")
def pictures(store, tmp_path_factory):
    """The first 100 test digits as files: 28x28 PNGs either way round, 84x84 dark-on-light PNGs, and
    JPEG 'photos' (grey ink on a light grey 160x120 page, off centre)."""
    folder = tmp_path_factory.mktemp("pictures")
    for i, digit in enumerate(store[2][:100]):
        Image.fromarray(digit).save(folder / f"mnist-{i:03d}.png")
        Image.fromarray(255 - digit).save(folder / f"inverted-{i:03d}.png")
        Image.fromarray(255 - digit).resize((84, 84), Image.Resampling.BILINEAR).save(folder / f"big-{i:03d}.png")
        page = Image.new("L", (160, 120), 230)
        ink = Image.fromarray(255 - digit).resize((70, 70), Image.Resampling.BICUBIC)
        page.paste(ink.point(lambda v: 40 + v * 190 // 255), (60, 25))
        page.save(folder / f"photo-{i:03d}.jpg", quality=85)
    return folder


def predict(*args):
    result = CliRunner().invoke(cli, ["predict", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


def test_predict_reads_pngs_of_either_polarity_and_any_size(store, model, pictures):
    _, run, images, _ = store
    expected = model.predict(images[:100])["class"]
    rows = json.loads(predict(run.info.run_id, *sorted(pictures.iterdir()), "--json"))
    classes = {}
    for row in rows:
        kind = Path(row["file"]).name.split("-")[0]
        classes.setdefault(kind, []).append(row["class"])
        assert row["confidence"] == max(row["probabilities"]) and len(row["probabilities"]) == 10
    assert classes["mnist"] == classes["inverted"] == expected.tolist()  # 28x28 is taken as MNIST-framed
    for kind in ("big", "photo"):  # re-framed like MNIST: nearly always the same answer
        agree = np.mean(np.array(classes[kind]) == expected)
        assert agree >= 0.85, (kind, agree)


def test_predict_prints_class_and_confidence_per_file(store, pictures):
    output = predict("models:/mnist8k-step5@best", pictures / "mnist-000.png", pictures / "photo-001.jpg")
    first, second = output.splitlines()
    assert first.startswith(f"{pictures / 'mnist-000.png'}  7  (") and first.endswith("%)")
    assert second.startswith(f"{pictures / 'photo-001.jpg'}  2  (")


def test_predict_reads_idx_files_gzipped_or_not(store, model, tmp_path):
    _, run, images, _ = store
    (tmp_path / "digits-idx3-ubyte").write_bytes(idx_images(images[:50]))
    (tmp_path / "digits-idx3-ubyte.gz").write_bytes(gzip.compress(idx_images(images[50:100])))
    rows = json.loads(predict(f"runs:/{run.info.run_id}/model", *sorted(tmp_path.iterdir()), "--json"))
    assert [row["file"] for row in rows[:2]] == [f"{tmp_path / 'digits-idx3-ubyte'}[{i}]" for i in range(2)]
    assert [row["class"] for row in rows] == model.predict(images[:100])["class"].tolist()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not a picture", "neither an image nor an IDX image file"),
        (struct.pack(">IIII", 0x803, 2, 20, 20) + bytes(800), "an IDX file of 2 20x20 images in 816 bytes, not 28x28"),
    ],
)
def test_predict_names_a_bad_file_in_one_line(store, tmp_path, content, message):
    path = tmp_path / "digit.png"
    path.write_bytes(content)
    result = CliRunner().invoke(cli, ["predict", store[1].info.run_id, str(path)])
    assert result.exit_code == 1 and result.output == f"Error: {path}: {message}\n"


def test_predict_loads_a_model_logged_before_raw_digits(store, pictures):
    """Old runs logged the network itself (pytorch flavour): normalised float32 in, class scores out."""
    mlflow.set_experiment("old-style")
    network = models.get_model("step5").eval()
    example = normalize(torch.from_numpy(store[2][:2]))
    with mlflow.start_run() as run:
        signature = mlflow.models.infer_signature(example.numpy(), network(example).detach().numpy())
        mlflow.pytorch.log_model(network, name="model", signature=signature, input_example=example.numpy())
    files = [pictures / f"mnist-{i:03d}.png" for i in range(10)]
    rows = json.loads(predict(run.info.run_id, *files, "--json"))
    with torch.inference_mode():
        scores = network(normalize(torch.from_numpy(store[2][:10])))
    assert [row["class"] for row in rows] == scores.argmax(1).tolist()
    assert np.allclose([row["probabilities"] for row in rows], torch.softmax(scores, 1).numpy(), atol=1e-6)


def test_register_keeps_the_version_of_a_run_registered_before(store):
    first = CliRunner().invoke(cli, ["register"]).output
    assert CliRunner().invoke(cli, ["register"]).output == first
    client = MlflowClient(store[0])
    version = client.get_model_version_by_alias("mnist8k-step5", "best")
    assert str(version.version) == "1" and version.run_id == store[1].info.run_id


def test_standardize_matches_training(store):
    """uint8 digits reach the network exactly as the test set did during training."""
    images = store[2][:64]
    assert torch.equal(standardize(images), normalize(torch.from_numpy(images)))
