"""A checkpoint written through Ray Train is complete once every rank marked its part written: the newest such
checkpoint is where a run resumes when Ray Train never registered it (a worker that died before the controller
polled)."""

from __future__ import annotations

import json
from pathlib import Path

from robustfm.train.checkpoint import STATE_FILE
from robustfm.train.launchers import mark_part_written, newest_marked_checkpoint


def _checkpoint(run: Path, step: int, world_size: int, marked: list[int], state: bool = True) -> str:
    path = run / f"checkpoint_step_{step:09d}"
    path.mkdir(parents=True)
    if state:
        (path / STATE_FILE).write_text(json.dumps({"world_size": world_size}))
    for rank in marked:
        mark_part_written(None, str(path), rank)
    return str(path)


def test_the_newest_checkpoint_with_every_part_marked_is_chosen(tmp_path):
    older = _checkpoint(tmp_path, 6, 2, [0, 1])
    _checkpoint(tmp_path, 12, 2, [0])  # rank 1 died before its upload returned
    _checkpoint(tmp_path, 18, 2, [0, 1], state=False)  # rank 0's train_state.json never arrived
    assert newest_marked_checkpoint(None, str(tmp_path)) == older
    newest = _checkpoint(tmp_path, 24, 2, [1, 0])
    assert newest_marked_checkpoint(None, str(tmp_path)) == newest


def test_no_marked_checkpoint_means_none(tmp_path):
    assert newest_marked_checkpoint(None, str(tmp_path / "absent")) is None
    _checkpoint(tmp_path, 6, 1, [])
    assert newest_marked_checkpoint(None, str(tmp_path)) is None
    _checkpoint(tmp_path, 12, 1, [0])
    assert newest_marked_checkpoint(None, str(tmp_path)).endswith("checkpoint_step_000000012")
