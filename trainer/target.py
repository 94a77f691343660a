"""The exercise's target rule, written once: >= 99.40% test accuracy in each of the last 3 epochs, with
fewer than 8,000 parameters, in at most 15 epochs. Training, report, plots and `trainer models` use it."""

TARGET_ACC = 99.40  # % test accuracy
PARAM_LIMIT = 8000  # fewer than this many parameters
EPOCH_LIMIT = 15  # at most this many epochs
LAST_EPOCHS = 3  # "consistently": in each of the last this many epochs


def holds(test_acc: list[float], first_epoch: int) -> bool:
    """Test accuracy >= the target in every epoch from `first_epoch` to the last (a shorter run: no)."""
    return len(test_acc) >= first_epoch and min(test_acc[first_epoch - 1 :]) >= TARGET_ACC


def met(test_acc: list[float], num_params: int, epochs: int) -> bool:
    """The exercise's target: the last epochs at or above the line, under the budget, in time."""
    return (
        holds(test_acc, max(1, len(test_acc) - LAST_EPOCHS + 1)) and num_params < PARAM_LIMIT and epochs <= EPOCH_LIMIT
    )
