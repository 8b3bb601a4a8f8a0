"""A resumed torchtitan job goes on in the TensorBoard run it resumes, and its restart marker hides the stale
points there, for TensorBoard's Python loader and EventAccumulator readers alike (tensorboard_runs.py)."""

import os
import time

import pytest
from tensorboard.backend.event_processing import event_accumulator, plugin_event_accumulator
from tensorboard.util import tensor_util
from torch.utils.tensorboard import SummaryWriter

from nerve_plugin.report.data import load_loss
from nerve_plugin.torchtitan.tensorboard_runs import continue_run, earlier_run_dir


class Logger:  # what continue_run needs of torchtitan's TensorBoardLogger: its SummaryWriter
    def __init__(self, log_dir):
        self.writer = SummaryWriter(str(log_dir), max_queue=1000)


def points(folder, tag):
    """(step, value) of ``tag`` as each of TensorBoard's Python readers shows the run in ``folder``."""
    plain = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0})
    plain.Reload()
    plugin = plugin_event_accumulator.EventAccumulator(str(folder), size_guidance={"tensors": 0})
    plugin.Reload()
    return (
        [(e.step, e.value) for e in plain.Scalars(tag)],
        [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in plugin.Tensors(tag)],
    )


@pytest.mark.parametrize("same_minute", [False, True])
def test_a_resume_goes_on_in_the_earlier_run_and_hides_its_stale_points(tmp_path, same_minute):
    root = tmp_path / "tb"
    earlier = root / "20250101-1200" / "rank_0"
    old = SummaryWriter(str(earlier))  # an attempt that died after step 5; its last checkpoint: step 2
    for step in range(1, 6):
        old.add_scalar("loss", float(step), step)
    old.add_scalar("nerve/js/layer_000", 0.5, 4)
    old.close()
    (root / "20250101-1100").mkdir()  # an older folder of another layout: not the one resumed
    # A run's event files are read in name order, which starts with their creation second (then a counter of this
    # process, not zero-padded: 10 sorts before 9): the resumed job's file, which continue_run puts in the earlier
    # run in both cases, must be of a later second, as it is for real (another process, started later).
    time.sleep(1.1)
    resumed = Logger(earlier if same_minute else root / "20250101-1230" / "rank_0")  # torchtitan's new folder

    assert continue_run(resumed, str(root), 3) == (None if same_minute else str(earlier))
    for step in (3, 4):  # the resumed job logs from step 3 on
        resumed.writer.add_scalar("loss", 10.0 + step, step)
    resumed.writer.add_scalar("nerve/js/layer_000", 0.25, 4)
    resumed.writer.close()

    assert sorted(os.listdir(root)) == ["20250101-1100", "20250101-1200"]  # no empty run of the resumed job
    for shown in points(earlier, "loss"):
        assert shown == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]  # steps 3-5 of the dead attempt are gone
    for shown in points(earlier, "nerve/js/layer_000"):
        assert shown == [(4, 0.25)]
    assert load_loss(str(root), "loss") == {1: 1.0, 2: 2.0, 3: 13.0, 4: 14.0}


def test_earlier_run_dir_takes_the_latest_earlier_folder_of_the_same_layout(tmp_path):
    root = tmp_path / "tb"
    for stamp, layout in (
        ("20250101-1000", "rank_1"),
        ("20250101-1100", "rank_1"),
        ("20250101-1130", "rank_0"),
        ("20250101-1300", "rank_1"),
    ):
        SummaryWriter(str(root / stamp / layout)).close()
    (root / "notes-1200").mkdir()  # not one of torchtitan's run folders
    assert earlier_run_dir(str(root / "20250101-1200" / "rank_1"), str(root)) == str(root / "20250101-1100" / "rank_1")
    assert earlier_run_dir(str(root / "20250101-1000" / "rank_1"), str(root)) is None
