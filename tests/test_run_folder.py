"""Tests for run_folder.py: which settings define a run, and checkpoint pruning. (train.py's runs into
folders, the same command twice, another run's folder, --resume and --overwrite: tests/test_train.py.)"""

import json

import run_folder
import train


def test_settings_that_do_not_define_a_run_may_differ():
    saved = json.loads(json.dumps(train.parse_config([]).as_dict()))  # as config.json holds it (NaN too)
    moved = train.parse_config(["--run_name", "x", "--output_dir", "elsewhere", "--resume", "--save_every", "5"])
    assert run_folder.settings_differences(saved, moved) == []
    other = train.parse_config(["--lr", "1e-4", "--task", "arith_chat"])
    assert run_folder.settings_differences(saved, other) == [
        'task: "arith" in the folder, "arith_chat" here',
        "lr: 3e-05 in the folder, 0.0001 here",
    ]


def test_a_setting_newer_than_the_saved_run_counts_there_as_its_default():
    saved = {k: v for k, v in json.loads(json.dumps(train.parse_config([]).as_dict())).items() if k != "keep_leaves"}
    assert run_folder.settings_differences(saved, train.parse_config([])) == []
    changed = train.parse_config(["--keep_leaves", "16"])
    assert run_folder.settings_differences(saved, changed) == ["keep_leaves: 0 in the folder, 16 here"]
    # A setting the code no longer has is a difference: nothing says the run did not depend on it.
    gone = dict(saved, bygone_flag=1)
    assert run_folder.settings_differences(gone, train.parse_config([])) == [
        'bygone_flag: 1 in the folder, "(absent)" here'
    ]


def test_pruning_keeps_the_checkpoint_written_and_the_one_before(tmp_path):
    for step in (20, 40, 60, 100, 120):  # 60 just written; 100 and 120 left by a longer schedule
        (tmp_path / f"step-{step:06d}").mkdir()
    run_folder.prune_checkpoints(tmp_path / "step-000060")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000040", "step-000060"]
    (tmp_path / "step-000020").mkdir()  # the one written is kept even when every other sorts after it
    run_folder.prune_checkpoints(tmp_path / "step-000020")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000020"]
