"""One run per out folder, and only that folder's run is resumed (flows/run_lifecycle.py):
two runs of the same spec in two folders on one shared store are two runs, never one."""

from __future__ import annotations

import pytest
import yaml

from flows.run_lifecycle import prepare_run
from tests.test_pipeline import tiny_spec


def _spec(small_warehouse_url, tmp_path):
    path = tiny_spec(small_warehouse_url, tmp_path)
    data = yaml.safe_load(path.read_text())
    data["store"] = {"url": f"sqlite:///{tmp_path / 'shared-store.db'}"}  # one store for all
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_a_folder_resumes_its_own_run_not_another_folders(small_warehouse_url, tmp_path):
    spec = _spec(small_warehouse_url, tmp_path)
    a = prepare_run(spec, str(tmp_path / "a"), {})
    with pytest.raises(RuntimeError, match="killed"), a.recorded():
        raise RuntimeError("killed")  # run a fails: unfinished, resumable from its folder
    b = prepare_run(spec, str(tmp_path / "b"), {})
    with b.recorded():
        assert not b.resumed and b.id != a.id  # same spec, shared store: still its own run
    again = prepare_run(spec, str(tmp_path / "a"), {})
    with again.recorded():
        assert again.resumed and again.id == a.id
    assert (tmp_path / "a" / ".posttrain-run").read_text().strip() == a.id


def test_a_folder_in_use_refuses_a_second_run(small_warehouse_url, tmp_path):
    spec = _spec(small_warehouse_url, tmp_path)
    first = prepare_run(spec, str(tmp_path / "out"), {})
    with first.recorded():
        second = prepare_run(spec, str(tmp_path / "out"), {})
        with pytest.raises(RuntimeError, match="in use by another posttrain run"), \
                second.recorded():
            pass
    third = prepare_run(spec, str(tmp_path / "out"), {})
    with third.recorded():  # released when the first ended (which never reached "completed")
        assert third.resumed and third.id == first.id
